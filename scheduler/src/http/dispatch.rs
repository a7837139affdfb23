//! `/projects/{p}/pause|resume|dispatch`: how a project's jobs go out.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::extract::{AuthedProject, JsonBody, Operate, Read};
use crate::context::Context;
use crate::dispatch;
use crate::error::AppResult;
use crate::patch::present;

pub async fn pause(State(ctx): State<Context>, at: AuthedProject<Operate>) -> AppResult<Response> {
    Ok(Json(dispatch::pause(&ctx, &at.project).await?).into_response())
}

pub async fn resume(State(ctx): State<Context>, at: AuthedProject<Operate>) -> AppResult<Response> {
    let published = dispatch::resume(&ctx, &at.project).await?;
    let control = dispatch::control(&ctx.db, at.project.id).await?;
    Ok(Json(json!({ "control": control, "published": published })).into_response())
}

pub async fn get(State(ctx): State<Context>, at: AuthedProject<Read>) -> AppResult<Response> {
    Ok(Json(dispatch::control(&ctx.db, at.project.id).await?).into_response())
}

/// A change of rate limit and priority; an absent field stays as it is,
/// `"rate_limit": null` lifts the limit. Pausing has its own endpoints,
/// since resuming also publishes what waited.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchChange {
    #[serde(default, deserialize_with = "present")]
    rate_limit: Option<Option<f64>>,
    priority: Option<i16>,
}

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
