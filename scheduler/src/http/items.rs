//! `/projects/{p}/items` (a filtered list, a page at a time),
//! `/items/{id}` (one item's history) and `/items/{id}/reopen` (a label
//! reported as wrong, back to review).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use super::extract::{Authed, AuthedProject, JsonBody, Read, Review};
use crate::context::Context;
use crate::error::{AppError, AppResult, ErrorBody};
use crate::items::reopen::{Reopen, Reopened};
use crate::items::{self, ItemHistory, ItemPage, ListRequest, reopen};

/// A page of a project's items, oldest first, filtered. Every filter but
/// `max_confidence`, `cursor` and `limit` may repeat (or take a comma list):
/// an item matches one of its values.
#[utoipa::path(
    get,
    path = "/projects/{project}/items",
    tag = "items",
    params(
        ("project" = String, Path, description = "Project name or id"),
        ("state" = Option<Vec<String>>, Query, explode, description = "Item state: pending, dispatched, auto_labeled, in_review, human_labeled, failed"),
        ("class" = Option<Vec<String>>, Query, explode, description = "Class of the current label"),
        ("source" = Option<Vec<String>>, Query, explode, description = "Source of the current label: human, machine, import"),
        ("max_confidence" = Option<f32>, Query, description = "Newest prediction's confidence at most this (0 to 1)"),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the page before"),
        ("limit" = Option<u32>, Query, description = "Items per page (default 100, at most 1000)"),
    ),
    responses(
        (status = 200, body = ItemPage),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
        (status = 422, body = ErrorBody, description = "An unknown parameter or value (the message names the allowed ones)"),
    )
)]
pub async fn list(
    State(ctx): State<Context>,
    at: AuthedProject<Read>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> AppResult<Response> {
    let Query(pairs) = query.map_err(|e| AppError::Invalid(e.body_text()))?;
    let request = ListRequest::from_query(&pairs)?;
    Ok(Json(items::list(&ctx.db, &at.project, &request).await?).into_response())
}

fn item_id(raw: &str) -> AppResult<Uuid> {
    raw.parse()
        .map_err(|_| AppError::NotFound(format!("no item {raw:?} (not an item id)")))
}

/// An item with its whole history: every prediction, label and review task.
#[utoipa::path(
    get,
    path = "/items/{item}",
    tag = "items",
    params(("item" = String, Path, description = "Item id")),
    responses(
        (status = 200, body = ItemHistory),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 404, body = ErrorBody, description = "No such item (or not in the token's project)"),
    )
)]
pub async fn show(
    State(ctx): State<Context>,
    caller: Authed<Read>,
    Path(item): Path<String>,
) -> AppResult<Response> {
    let item = item_id(&item)?;
    Ok(Json(items::show(&ctx.db, &caller.who, item).await?).into_response())
}

/// Report an item's label as wrong: it goes back to review, at the top,
/// with the reason `reported`. A human label takes `force` (ml, admin).
#[utoipa::path(
    post,
    path = "/items/{item}/reopen",
    tag = "items",
    params(("item" = String, Path, description = "Item id")),
    request_body = Reopen,
    responses(
        (status = 200, body = Reopened),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not review, or may not force"),
        (status = 404, body = ErrorBody, description = "No such item (or not in the token's project)"),
        (status = 409, body = ErrorBody, description = "Already in review, unlabeled, or labeled by a person without force"),
        (status = 422, body = ErrorBody, description = "No reason given"),
    )
)]
pub async fn reopen(
    State(ctx): State<Context>,
    caller: Authed<Review>,
    Path(item): Path<String>,
    JsonBody(body): JsonBody<Reopen>,
) -> AppResult<Response> {
    let item = item_id(&item)?;
    let reporter = reopen::Reporter::from(&caller.who);
    let reopened: Reopened =
        reopen::reopen(&ctx.db, item, Some(&caller.who), reporter, &body).await?;
    Ok(Json(reopened).into_response())
}
