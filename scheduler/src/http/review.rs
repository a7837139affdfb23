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
use uuid::Uuid;

use super::extract::{Authed, AuthedTask, JsonBody, Review, bearer, project_on};
use crate::auth::{self, Action};
use crate::context::Context;
use crate::entities::item;
use crate::error::{AppError, AppResult};
use crate::review;

fn lease(ctx: &Context) -> Duration {
    Duration::from_secs(ctx.settings.review.lease_seconds)
}

/// The hot path: everything a claim reads goes through the claim pool, so a
/// reviewer waiting for the next item never queues behind durable writes.
/// That is why it authorizes by hand rather than through the extractors,
/// which read through the main pool.
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

pub async fn show(State(ctx): State<Context>, at: AuthedTask<Review>) -> AppResult<Response> {
    Ok(Json(review::show(&ctx.db, at.task, at.who.reviewer()).await?).into_response())
}

pub async fn submit(
    State(ctx): State<Context>,
    at: AuthedTask<Review>,
    JsonBody(body): JsonBody<review::Submission>,
) -> AppResult<Response> {
    if body.force {
        at.who.require(Action::ForceLabel)?;
    }
    let label = review::submit(&ctx.db, at.task, at.who.reviewer(), &body).await?;
    Ok(Json(label).into_response())
}

#[derive(Deserialize)]
pub struct Release {
    fencing_token: i64,
}

pub async fn release(
    State(ctx): State<Context>,
    at: AuthedTask<Review>,
    JsonBody(body): JsonBody<Release>,
) -> AppResult<Response> {
    review::release(&ctx.db, at.task, at.who.reviewer(), body.fencing_token).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The body of the steps that only need the claim's token.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fenced {
    fencing_token: i64,
}

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

pub async fn skip(
    State(ctx): State<Context>,
    at: AuthedTask<Review>,
    JsonBody(body): JsonBody<review::Skip>,
) -> AppResult<Response> {
    Ok(Json(review::skip(&ctx.db, at.task, at.who.reviewer(), &body).await?).into_response())
}

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
