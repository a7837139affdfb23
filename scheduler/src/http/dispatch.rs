//! `/projects/{p}/pause|resume|dispatch`: how a project's jobs go out.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::{AuthedProject, JsonBody, Operate, Read};
use crate::context::Context;
use crate::dispatch::{self, Control};
use crate::error::{AppResult, ErrorBody};
use crate::patch::present;

/// Stop sending the project's jobs to workers (they wait, unpublished).
#[utoipa::path(
    post,
    path = "/projects/{project}/pause",
    tag = "dispatch",
    params(("project" = String, Path, description = "Project name or id")),
    responses(
        (status = 200, body = Control),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not operate"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
    )
)]
pub async fn pause(State(ctx): State<Context>, at: AuthedProject<Operate>) -> AppResult<Response> {
    Ok(Json(dispatch::pause(&ctx, &at.project).await?).into_response())
}

/// A resume: the control now, and how many waiting jobs it published.
#[derive(Serialize, ToSchema)]
pub struct Resumed {
    control: Control,
    published: usize,
}

/// Send the project's jobs again, the ones that waited first.
#[utoipa::path(
    post,
    path = "/projects/{project}/resume",
    tag = "dispatch",
    params(("project" = String, Path, description = "Project name or id")),
    responses(
        (status = 200, body = Resumed),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not operate"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
    )
)]
pub async fn resume(State(ctx): State<Context>, at: AuthedProject<Operate>) -> AppResult<Response> {
    let published = dispatch::resume(&ctx, &at.project).await?;
    let control = dispatch::control(&ctx.db, at.project.id).await?;
    Ok(Json(Resumed { control, published }).into_response())
}

/// Whether the project's jobs go out, how fast and in what priority.
#[utoipa::path(
    get,
    path = "/projects/{project}/dispatch",
    tag = "dispatch",
    params(("project" = String, Path, description = "Project name or id")),
    responses(
        (status = 200, body = Control),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
    )
)]
pub async fn get(State(ctx): State<Context>, at: AuthedProject<Read>) -> AppResult<Response> {
    Ok(Json(dispatch::control(&ctx.db, at.project.id).await?).into_response())
}

/// A change of rate limit and priority; an absent field stays as it is,
/// `"rate_limit": null` lifts the limit. Pausing has its own endpoints,
/// since resuming also publishes what waited.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DispatchChange {
    /// Jobs per second; `null` lifts the limit.
    #[serde(default, deserialize_with = "present")]
    rate_limit: Option<Option<f64>>,
    /// 0 to 9, higher first.
    priority: Option<i16>,
}

#[utoipa::path(
    put,
    path = "/projects/{project}/dispatch",
    tag = "dispatch",
    params(("project" = String, Path, description = "Project name or id")),
    request_body = DispatchChange,
    responses(
        (status = 200, body = Control),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not operate"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
        (status = 422, body = ErrorBody, description = "A rate or priority out of range"),
    )
)]
pub async fn put(
    State(ctx): State<Context>,
    at: AuthedProject<Operate>,
    JsonBody(body): JsonBody<DispatchChange>,
) -> AppResult<Response> {
    let change = dispatch::ControlChange {
        paused: None,
        rate_limit: body.rate_limit,
        priority: body.priority,
    };
    let control = dispatch::set_control(&ctx.db, at.project.id, &change).await?;
    tracing::info!(project = %at.project.name, by = %at.who.name, ?control, "dispatch control changed");
    Ok(Json(control).into_response())
}
