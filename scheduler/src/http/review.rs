//! `/review`: claim the next task, and every step of a claim (show, submit,
//! renew, skip, undo, release); an item's image for the page.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use sea_orm::EntityTrait;
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::extract::{Authed, AuthedTask, JsonBody, Review, bearer, project_on};
use crate::auth::{self, Action};
use crate::context::Context;
use crate::entities::item;
use crate::error::{AppError, AppResult, ErrorBody};
use crate::review::{
    self, ClaimedTask, Lease, Skip, Skipped, Submission, SubmittedLabel, TaskView,
};

fn lease(ctx: &Context) -> Duration {
    Duration::from_secs(ctx.settings.review.lease_seconds)
}

/// The hot path: everything a claim reads goes through the claim pool, so a
/// reviewer waiting for the next item never queues behind durable writes.
/// That is why it authorizes by hand rather than through the extractors,
/// which read through the main pool.
#[utoipa::path(
    post,
    path = "/projects/{project}/review/next",
    tag = "review",
    params(("project" = String, Path, description = "Project name or id")),
    responses(
        (status = 200, body = ClaimedTask, description = "The task is yours until the lease runs out"),
        (status = 204, description = "Nothing to review"),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not review"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
    )
)]
pub async fn claim_next(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
) -> AppResult<Response> {
    let who = auth::authorize(&ctx.claims, bearer(&headers), Action::Review).await?;
    let project = project_on(&ctx.claims, &who, &project).await?;
    Ok(
        match review::claim_next(&ctx.claims, &project, who.reviewer(), lease(&ctx)).await? {
            Some(task) => Json(task).into_response(),
            None => StatusCode::NO_CONTENT.into_response(),
        },
    )
}

/// A review task, its item and the model's proposal.
#[utoipa::path(
    get,
    path = "/review/{task}",
    tag = "review",
    params(("task" = String, Path, description = "Review task id")),
    responses(
        (status = 200, body = TaskView),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not review"),
        (status = 404, body = ErrorBody, description = "No such task (or not in the token's project)"),
    )
)]
pub async fn show(State(ctx): State<Context>, at: AuthedTask<Review>) -> AppResult<Response> {
    Ok(Json(review::show(&ctx.db, at.task, at.who.reviewer()).await?).into_response())
}

/// Label the item of a claimed task.
#[utoipa::path(
    post,
    path = "/review/{task}/submit",
    tag = "review",
    params(("task" = String, Path, description = "Review task id")),
    request_body = Submission,
    responses(
        (status = 200, body = SubmittedLabel),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not review"),
        (status = 404, body = ErrorBody, description = "No such task (or not in the token's project)"),
        (status = 409, body = ErrorBody, description = "The lease is not yours any more, or the item has a human label"),
        (status = 422, body = ErrorBody, description = "Not one of the project's classes"),
    )
)]
pub async fn submit(
    State(ctx): State<Context>,
    at: AuthedTask<Review>,
    JsonBody(body): JsonBody<Submission>,
) -> AppResult<Response> {
    if body.force {
        at.who.require(Action::ForceLabel)?;
    }
    let label = review::submit(&ctx.db, at.task, at.who.reviewer(), &body).await?;
    Ok(Json(label).into_response())
}

#[derive(Deserialize, ToSchema)]
pub struct Release {
    fencing_token: i64,
}

/// Give a claimed task back, unlabeled, for someone else.
#[utoipa::path(
    post,
    path = "/review/{task}/release",
    tag = "review",
    params(("task" = String, Path, description = "Review task id")),
    request_body = Release,
    responses(
        (status = 204, description = "Released"),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not review"),
        (status = 404, body = ErrorBody, description = "No such task (or not in the token's project)"),
        (status = 409, body = ErrorBody, description = "The lease is not yours any more"),
    )
)]
pub async fn release(
    State(ctx): State<Context>,
    at: AuthedTask<Review>,
    JsonBody(body): JsonBody<Release>,
) -> AppResult<Response> {
    review::release(&ctx.db, at.task, at.who.reviewer(), body.fencing_token).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The body of the steps that only need the claim's token.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Fenced {
    fencing_token: i64,
}

/// Extend the lease of a claimed task.
#[utoipa::path(
    post,
    path = "/review/{task}/renew",
    tag = "review",
    params(("task" = String, Path, description = "Review task id")),
    request_body = Fenced,
    responses(
        (status = 200, body = Lease),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not review"),
        (status = 404, body = ErrorBody, description = "No such task (or not in the token's project)"),
        (status = 409, body = ErrorBody, description = "The lease is not yours any more"),
    )
)]
pub async fn renew(
    State(ctx): State<Context>,
    at: AuthedTask<Review>,
    JsonBody(body): JsonBody<Fenced>,
) -> AppResult<Response> {
    let renewed = review::renew(
        &ctx.db,
        at.task,
        at.who.reviewer(),
        body.fencing_token,
        lease(&ctx),
    )
    .await?;
    Ok(Json(renewed).into_response())
}

/// Give a claimed task back with a reason; it goes behind the others.
#[utoipa::path(
    post,
    path = "/review/{task}/skip",
    tag = "review",
    params(("task" = String, Path, description = "Review task id")),
    request_body = Skip,
    responses(
        (status = 200, body = Skipped),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not review"),
        (status = 404, body = ErrorBody, description = "No such task (or not in the token's project)"),
        (status = 409, body = ErrorBody, description = "The lease is not yours any more"),
        (status = 422, body = ErrorBody, description = "No reason given"),
    )
)]
pub async fn skip(
    State(ctx): State<Context>,
    at: AuthedTask<Review>,
    JsonBody(body): JsonBody<Skip>,
) -> AppResult<Response> {
    Ok(Json(review::skip(&ctx.db, at.task, at.who.reviewer(), &body).await?).into_response())
}

/// Take back the last submit, while its lease runs: the task is claimed
/// again by the same reviewer.
#[utoipa::path(
    post,
    path = "/review/{task}/undo",
    tag = "review",
    params(("task" = String, Path, description = "Review task id")),
    request_body = Fenced,
    responses(
        (status = 200, body = ClaimedTask),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not review"),
        (status = 404, body = ErrorBody, description = "No such task (or not in the token's project)"),
        (status = 409, body = ErrorBody, description = "Too late to undo, or another reviewer holds its second opinion"),
    )
)]
pub async fn undo(
    State(ctx): State<Context>,
    at: AuthedTask<Review>,
    JsonBody(body): JsonBody<Fenced>,
) -> AppResult<Response> {
    let reopened = review::undo(
        &ctx.db,
        at.task,
        at.who.reviewer(),
        body.fencing_token,
        lease(&ctx),
    )
    .await?;
    Ok(Json(reopened).into_response())
}

/// An item's image, as ingested (PNG, JPEG, WebP...): the body is the
/// file's bytes (OpenAPI 3.1 describes a binary body as a string of its
/// media type).
#[utoipa::path(
    get,
    path = "/items/{item}/image",
    tag = "items",
    params(("item" = String, Path, description = "Item id")),
    responses(
        (status = 200, description = "The image bytes", content(
            (String = "image/png"),
            (String = "image/jpeg"),
            (String = "image/webp"),
            (String = "application/octet-stream"),
        )),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not review"),
        (status = 404, body = ErrorBody, description = "No such item (or not in the token's project)"),
    )
)]
pub async fn item_image(
    State(ctx): State<Context>,
    caller: Authed<Review>,
    Path(item_id): Path<String>,
) -> AppResult<Response> {
    let id: Uuid = item_id
        .parse()
        .map_err(|_| AppError::NotFound(format!("no item {item_id:?}")))?;
    let item = item::Entity::find_by_id(id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no item {id}")))?;
    caller.who.check_item_project(id, item.project_id)?;
    // Streamed: an image may be as large as ingest.max_file_bytes, and a
    // page of reviewers must not hold that many in memory at once. The type
    // comes from the first chunk's magic bytes.
    let mut stream = ctx
        .store
        .get_stream(&item.object_key)
        .await
        .map_err(|e| AppError::NotFound(e.to_string()))?;
    let first = match stream.next().await {
        Some(chunk) => chunk.map_err(|e| AppError::Internal(e.into()))?,
        None => bytes::Bytes::new(),
    };
    let content_type = match image::guess_format(&first) {
        Ok(image::ImageFormat::Png) => "image/png",
        Ok(image::ImageFormat::Jpeg) => "image/jpeg",
        Ok(image::ImageFormat::WebP) => "image/webp",
        _ => "application/octet-stream",
    };
    let body = futures_util::stream::once(async move { Ok(first) }).chain(stream);
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            // The bytes are whatever was ingested: never let a browser guess.
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}
