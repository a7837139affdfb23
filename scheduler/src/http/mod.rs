//! The HTTP API (`/api/v1`, described at `/api/v1/openapi.json`), the
//! review page (`/review`), the browse page (`/browse`), health and
//! metrics.
//!
//! Handlers are thin: authorize, parse, call the same domain function the CLI
//! calls, serialize. One file per resource; what every handler begins with
//! (the caller, the project or task in the path, the JSON body) is an
//! extractor in [`extract`]. Errors become JSON bodies through
//! [`AppError`].

pub mod extract;

mod browse_page;
mod dispatch;
mod export;
mod ingest;
mod items;
mod openapi;
mod operate;
mod projects;
mod review;
mod review_page;
mod reviewers;
mod tokens;
mod training;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::context::Context;
use crate::error::AppError;

/// The API under `/api/v1`, with its OpenAPI description: each `routes!`
/// registers its handlers on the router and their `#[utoipa::path]` in the
/// description, so no route can be missing from it.
pub fn api() -> (Router<Context>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(projects::list, projects::create))
        .routes(routes!(projects::show))
        .routes(routes!(projects::get_policy, projects::change_policy))
        .routes(routes!(projects::get_boxes, projects::change_boxes))
        .routes(routes!(review::claim_next))
        .routes(routes!(training::retrain))
        .routes(routes!(training::cancel))
        .routes(routes!(training::list_models))
        .routes(routes!(training::show_model))
        .routes(routes!(export::export))
        .routes(routes!(ingest::start))
        .routes(routes!(ingest::list))
        .routes(routes!(dispatch::pause))
        .routes(routes!(dispatch::resume))
        .routes(routes!(dispatch::get, dispatch::put))
        .routes(routes!(ingest::show))
        .routes(routes!(operate::fleet_status))
        .routes(routes!(tokens::list, tokens::create))
        .routes(routes!(tokens::revoke))
        .routes(routes!(review::show))
        .routes(routes!(review::submit))
        .routes(routes!(review::release))
        .routes(routes!(review::renew))
        .routes(routes!(review::skip))
        .routes(routes!(review::undo))
        .routes(routes!(items::list))
        .routes(routes!(items::show))
        .routes(routes!(items::reopen))
        .routes(routes!(review::item_image))
        .routes(routes!(reviewers::list))
        .split_for_parts()
}

pub fn router(ctx: Context) -> Router {
    let body_limit = ctx.settings.http.body_limit;
    let (api, description) = api();
    let api = api.route("/openapi.json", openapi::serve(&description));
    let mut root = Router::new()
        .nest("/api/v1", api)
        .merge(review_page::routes())
        .merge(browse_page::routes())
        .route("/healthz", get(operate::healthz));
    if ctx.settings.http.metrics_bind.is_none() {
        root = root.route("/metrics", get(operate::metrics_with_token));
    }
    root.layer(middleware::from_fn_with_state(body_limit, limit_body))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(ctx)
}

/// Read the whole body, up to `http.body_limit`, before any handler runs: a
/// larger one gets 413 whether its length was declared or it came chunked,
/// and whether or not the endpoint reads a body, so nothing acts on it.
async fn limit_body(State(limit): State<usize>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(_) => too_large(limit).into_response(),
    }
}

fn too_large(limit: usize) -> AppError {
    AppError::TooLarge(format!(
        "the request body is over the limit of {limit} bytes (http.body_limit)"
    ))
}

/// `/metrics` alone, without a token, for the listener on
/// `http.metrics_bind`: a port that only the monitoring network reaches.
pub fn metrics_router(ctx: Context) -> Router {
    Router::new()
        .route("/metrics", get(operate::metrics))
        .with_state(ctx)
}
