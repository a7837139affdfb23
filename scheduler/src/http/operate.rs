//! What operators and their tools read: `/healthz`, `/metrics`, and the
//! fleet's `/api/v1/status`.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::extract::{Authed, Operate};
use crate::context::Context;
use crate::error::{AppResult, ErrorBody};
use crate::operate::reviewers;
use crate::operate::status::{self, FleetStatus};

pub async fn healthz(State(ctx): State<Context>) -> Response {
    match ctx.db.ping().await {
        Ok(()) => Json(json!({ "status": "ok" })).into_response(),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "database": err.to_string() })),
        )
            .into_response(),
    }
}

pub async fn metrics(State(ctx): State<Context>) -> impl IntoResponse {
    // Gauges read from the database are refreshed at the scrape; if that
    // fails the rest is still served (with the accuracy gauges as they were).
    if let Err(err) = status::record_accuracy_metrics(&ctx).await {
        tracing::warn!(error = %err, "machine-label accuracy gauges not refreshed");
    }
    if let Err(err) = status::record_second_opinion_metrics(&ctx).await {
        tracing::warn!(error = %err, "second-opinion gauges not refreshed");
    }
    if let Err(err) = status::record_face_audit_metrics(&ctx).await {
        tracing::warn!(error = %err, "face audit gauges not refreshed");
    }
    if let Err(err) = reviewers::record_reviewer_metrics(&ctx).await {
        tracing::warn!(error = %err, "reviewer gauges not refreshed");
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        sieve_shared::telemetry::prometheus().render(),
    )
}

/// `/metrics` on the API port: the scrape runs database queries and names
/// every project and class, so it takes an `ops` or `admin` token for every
/// project.
pub async fn metrics_with_token(
    State(ctx): State<Context>,
    caller: Authed<Operate>,
) -> AppResult<Response> {
    caller
        .who
        .require_unscoped("read the metrics of every project")?;
    Ok(metrics(State(ctx)).await.into_response())
}

/// Queues, workers and every project: for an `ops` or `admin` token for
/// every project.
#[utoipa::path(
    get,
    path = "/status",
    tag = "operate",
    responses(
        (status = 200, body = FleetStatus),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not operate, or only one project"),
    )
)]
pub async fn fleet_status(
    State(ctx): State<Context>,
    caller: Authed<Operate>,
) -> AppResult<Response> {
    caller
        .who
        .require_unscoped("read the status of every project")?;
    Ok(Json(status::fleet_status(&ctx).await?).into_response())
}
