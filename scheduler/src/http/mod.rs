//! The HTTP API (`/api/v1`), the review page (`/review`), health and
//! metrics.
//!
//! Handlers are thin: authorize, parse, call the same domain function the CLI
//! calls, serialize. One file per resource; what every handler begins with
//! (the caller, the project or task in the path, the JSON body) is an
//! extractor in [`extract`]. Errors become JSON bodies through
//! [`AppError`].

pub mod extract;

mod dispatch;
mod export;
mod ingest;
mod items;
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
use axum::routing::{get, post};

use crate::context::Context;
use crate::error::AppError;

pub fn router(ctx: Context) -> Router {
    let body_limit = ctx.settings.http.body_limit;
    let api = Router::new()
        .route("/projects", get(projects::list).post(projects::create))
        .route("/projects/{project}", get(projects::show))
        .route(
            "/projects/{project}/policy",
            get(projects::get_policy)
                .put(projects::change_policy)
                .patch(projects::change_policy),
        )
        .route("/projects/{project}/review/next", post(review::claim_next))
        .route("/projects/{project}/retrain", post(training::retrain))
        .route("/projects/{project}/retrain/cancel", post(training::cancel))
        .route("/projects/{project}/models", get(training::list_models))
        .route(
            "/projects/{project}/models/{version}",
            get(training::show_model),
        )
        .route("/projects/{project}/export", get(export::export))
        .route("/projects/{project}/ingest", post(ingest::start))
        .route("/projects/{project}/ingests", get(ingest::list))
        .route("/projects/{project}/pause", post(dispatch::pause))
        .route("/projects/{project}/resume", post(dispatch::resume))
        .route(
            "/projects/{project}/dispatch",
            get(dispatch::get).put(dispatch::put),
        )
        .route("/ingests/{ingest}", get(ingest::show))
        .route("/status", get(operate::fleet_status))
        .route("/tokens", get(tokens::list).post(tokens::create))
        .route("/tokens/{token}/revoke", post(tokens::revoke))
        .route("/review/{task}", get(review::show))
        .route("/review/{task}/submit", post(review::submit))
        .route("/review/{task}/release", post(review::release))
        .route("/review/{task}/renew", post(review::renew))
        .route("/review/{task}/skip", post(review::skip))
        .route("/review/{task}/undo", post(review::undo))
        .route("/projects/{project}/items", get(items::list))
        .route("/projects/{project}/reviewers", get(reviewers::list))
        .route("/items/{item}", get(items::show))
        .route("/items/{item}/reopen", post(items::reopen))
        .route("/items/{item}/image", get(review::item_image));
    let mut root = Router::new()
        .nest("/api/v1", api)
        .merge(review_page::routes())
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
