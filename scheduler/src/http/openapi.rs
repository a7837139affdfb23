//! The API's OpenAPI 3.1 description, served at `/api/v1/openapi.json`.
//!
//! Nothing here is written by hand but the title and the security scheme:
//! every path comes from a handler's `#[utoipa::path]`, registered on the
//! router and in the description by the same `routes!` call (see
//! [`super::router`]), and every schema from the `ToSchema` derive of the
//! type the handler serializes. `tests/it/openapi.rs` checks the answers
//! of every operation against it.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, get};
use bytes::Bytes;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{OpenApi as Description, SecurityRequirement};
use utoipa::{Modify, OpenApi};

use crate::context::Context;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sieve",
        description = "Active-learning image labeling: projects, ingest, the review queue, models, export. \
                       Every operation takes `Authorization: Bearer TOKEN` (see `sieve token create`).",
    ),
    servers((url = "/api/v1")),
    modifiers(&BearerToken),
    tags(
        (name = "projects", description = "Projects and their routing policy"),
        (name = "ingest", description = "Images in"),
        (name = "dispatch", description = "How a project's jobs go out to workers"),
        (name = "review", description = "The human review queue"),
        (name = "items", description = "Items, their history, reports of wrong labels"),
        (name = "models", description = "Training runs and model versions"),
        (name = "export", description = "The labeled dataset out"),
        (name = "tokens", description = "API tokens (admin)"),
        (name = "operate", description = "The fleet's status"),
    )
)]
pub struct ApiDoc;

/// Every operation takes a bearer token.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut Description) {
        openapi
            .components
            .get_or_insert_default()
            .add_security_scheme(
                "token",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        openapi.security = Some(vec![SecurityRequirement::new(
            "token",
            Vec::<String>::new(),
        )]);
    }
}

/// `GET /api/v1/openapi.json`: public, like any API's description; it
/// names no project and no data.
/// Rendered once, when the router is built.
pub fn serve(description: &Description) -> MethodRouter<Context> {
    let body = Bytes::from(
        serde_json::to_vec(description).expect("an OpenAPI description always serializes"),
    );
    get(move || async move { ([(header::CONTENT_TYPE, "application/json")], body).into_response() })
}
