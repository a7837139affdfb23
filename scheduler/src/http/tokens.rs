//! `/tokens`: API tokens, for admins.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::extract::{Authed, JsonBody, ManageTokens};
use crate::auth;
use crate::context::Context;
use crate::entities::api_token::Role;
use crate::error::AppResult;
use crate::projects;

pub async fn list(State(ctx): State<Context>, _: Authed<ManageTokens>) -> AppResult<Response> {
    Ok(Json(auth::list_tokens(&ctx.db).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    name: String,
    role: Role,
    /// The only project it may act on (name or id); every project without.
    #[serde(default)]
    project: Option<String>,
    /// Seconds until it stops working; never without.
    #[serde(default)]
    expires_in_seconds: Option<u64>,
}

/// 201 with the secret, shown this once, and the token's id.
pub async fn create(
    State(ctx): State<Context>,
    caller: Authed<ManageTokens>,
    JsonBody(body): JsonBody<NewToken>,
) -> AppResult<Response> {
    let project = match &body.project {
        Some(name) => Some(projects::get(&ctx.db, name).await?),
        None => None,
    };
    let (token, id) = auth::create_expiring_token(
        &ctx.db,
        &body.name,
        body.role,
        project.as_ref(),
        body.expires_in_seconds.map(std::time::Duration::from_secs),
    )
    .await?;
    tracing::info!(token = %id, name = %body.name, by = %caller.who.name, "token created");
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "token": token })),
    )
        .into_response())
}

pub async fn revoke(
    State(ctx): State<Context>,
    _: Authed<ManageTokens>,
    Path(token): Path<String>,
) -> AppResult<Response> {
    Ok(Json(auth::revoke_token(&ctx.db, &token).await?).into_response())
}
