//! `/projects/{p}/retrain` and `/projects/{p}/models`: training runs and
//! the versions they made.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::extract::{AuthedProject, Read, Train};
use crate::context::Context;
use crate::error::{AppError, AppResult};
use crate::training::{self, RetrainRequest, registry};

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

pub async fn cancel(State(ctx): State<Context>, at: AuthedProject<Train>) -> AppResult<Response> {
    let run_id = training::cancel(&ctx, &at.project, &at.who.name).await?;
    Ok(Json(json!({ "run_id": run_id, "state": "cancelled" })).into_response())
}

pub async fn list_models(
    State(ctx): State<Context>,
    at: AuthedProject<Read>,
) -> AppResult<Response> {
    Ok(Json(registry::list(&ctx, &at.project).await?).into_response())
}

pub async fn show_model(
    State(ctx): State<Context>,
    at: AuthedProject<Read>,
    Path((_, version)): Path<(String, i32)>,
) -> AppResult<Response> {
    Ok(Json(registry::show(&ctx, &at.project, version).await?).into_response())
}
