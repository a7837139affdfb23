//! `/tokens`: API tokens, for admins.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::extract::{Authed, JsonBody, ManageTokens};
use crate::auth::{self, TokenInfo};
use crate::context::Context;
use crate::entities::api_token::Role;
use crate::error::{AppResult, ErrorBody};
use crate::projects;

/// Every API token: names, roles, scopes and states, never secrets.
#[utoipa::path(
    get,
    path = "/tokens",
    tag = "tokens",
    responses(
        (status = 200, body = Vec<TokenInfo>),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "Not an admin token"),
    )
)]
pub async fn list(State(ctx): State<Context>, _: Authed<ManageTokens>) -> AppResult<Response> {
    Ok(Json(auth::list_tokens(&ctx.db).await?).into_response())
}

#[derive(Deserialize, ToSchema)]
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

/// A new token: its secret is in this answer and nowhere else.
#[derive(Serialize, ToSchema)]
pub struct CreatedToken {
    id: Uuid,
    /// The secret, to send as `Authorization: Bearer ...`.
    token: String,
}

/// 201 with the secret, shown this once, and the token's id.
#[utoipa::path(
    post,
    path = "/tokens",
    tag = "tokens",
    request_body = NewToken,
    responses(
        (status = 201, body = CreatedToken),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "Not an admin token"),
        (status = 404, body = ErrorBody, description = "No such project"),
        (status = 422, body = ErrorBody, description = "A bad name, role or expiry"),
    )
)]
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
    Ok((StatusCode::CREATED, Json(CreatedToken { id, token })).into_response())
}

/// Revoke a token (by id or name): it gets 401 from now on.
#[utoipa::path(
    post,
    path = "/tokens/{token}/revoke",
    tag = "tokens",
    params(("token" = String, Path, description = "Token id or name")),
    responses(
        (status = 200, body = TokenInfo),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "Not an admin token"),
        (status = 404, body = ErrorBody, description = "No such token"),
        (status = 409, body = ErrorBody, description = "A name more than one token has: give the id"),
    )
)]
pub async fn revoke(
    State(ctx): State<Context>,
    _: Authed<ManageTokens>,
    Path(token): Path<String>,
) -> AppResult<Response> {
    Ok(Json(auth::revoke_token(&ctx.db, &token).await?).into_response())
}
