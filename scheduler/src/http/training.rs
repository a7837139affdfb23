//! `/projects/{p}/retrain` and `/projects/{p}/models`: training runs and
//! the versions they made.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::extract::{AuthedProject, Read, Train};
use crate::context::Context;
use crate::error::{AppError, AppResult, ErrorBody};
use crate::training::registry::{VersionDetail, VersionSummary};
use crate::training::{self, RetrainRequest, RunSummary, registry};

/// Queue a training run (an empty body: the project's defaults).
#[utoipa::path(
    post,
    path = "/projects/{project}/retrain",
    tag = "models",
    params(("project" = String, Path, description = "Project name or id")),
    request_body(content = Option<RetrainRequest>, description = "What to train; empty for the defaults"),
    responses(
        (status = 202, body = RunSummary),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not train"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
        (status = 409, body = ErrorBody, description = "A run is in progress already"),
        (status = 422, body = ErrorBody, description = "A bad body, or too few labels to train on"),
    )
)]
pub async fn retrain(
    State(ctx): State<Context>,
    at: AuthedProject<Train>,
    body: axum::body::Bytes,
) -> AppResult<Response> {
    // An empty body asks for nothing beyond the project's defaults.
    let asked: RetrainRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RetrainRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| AppError::Invalid(format!("bad request body: {e}")))?
    };
    let params = asked.params(&at.project)?;
    let run = training::request(&ctx, &at.project, &at.who.name, params, false).await?;
    Ok((StatusCode::ACCEPTED, Json(run)).into_response())
}

/// The run a cancel stopped.
#[derive(Serialize, ToSchema)]
pub struct Cancelled {
    run_id: Uuid,
    /// Always `cancelled`.
    state: &'static str,
}

/// Cancel the project's run in progress.
#[utoipa::path(
    post,
    path = "/projects/{project}/retrain/cancel",
    tag = "models",
    params(("project" = String, Path, description = "Project name or id")),
    responses(
        (status = 200, body = Cancelled),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not train"),
        (status = 404, body = ErrorBody, description = "No such project, or no run in progress"),
    )
)]
pub async fn cancel(State(ctx): State<Context>, at: AuthedProject<Train>) -> AppResult<Response> {
    let run_id = training::cancel(&ctx, &at.project, &at.who.name).await?;
    Ok(Json(Cancelled {
        run_id,
        state: "cancelled",
    })
    .into_response())
}

/// Every model version of the project, newest first.
#[utoipa::path(
    get,
    path = "/projects/{project}/models",
    tag = "models",
    params(("project" = String, Path, description = "Project name or id")),
    responses(
        (status = 200, body = Vec<VersionSummary>),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
    )
)]
pub async fn list_models(
    State(ctx): State<Context>,
    at: AuthedProject<Read>,
) -> AppResult<Response> {
    Ok(Json(registry::list(&ctx, &at.project).await?).into_response())
}

/// One version with its holdout quality.
#[utoipa::path(
    get,
    path = "/projects/{project}/models/{version}",
    tag = "models",
    params(
        ("project" = String, Path, description = "Project name or id"),
        ("version" = i32, Path, description = "Version number"),
    ),
    responses(
        (status = 200, body = VersionDetail),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 404, body = ErrorBody, description = "No such project or version"),
    )
)]
pub async fn show_model(
    State(ctx): State<Context>,
    at: AuthedProject<Read>,
    Path((_, version)): Path<(String, i32)>,
) -> AppResult<Response> {
    Ok(Json(registry::show(&ctx, &at.project, version).await?).into_response())
}
