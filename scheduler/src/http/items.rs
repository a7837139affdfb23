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
use crate::error::{AppError, AppResult};
use crate::items::{self, ListRequest, reopen};

/// `GET /projects/{p}/items?state=&class=&source=&max_confidence=&cursor=&limit=`
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

/// `GET /items/{id}`
pub async fn show(
    State(ctx): State<Context>,
    caller: Authed<Read>,
    Path(item): Path<String>,
) -> AppResult<Response> {
    let item = item_id(&item)?;
    Ok(Json(items::show(&ctx.db, &caller.who, item).await?).into_response())
}

/// `POST /items/{id}/reopen` (`{"reason": "...", "force": false}`)
pub async fn reopen(
    State(ctx): State<Context>,
    caller: Authed<Review>,
    Path(item): Path<String>,
    JsonBody(body): JsonBody<reopen::Reopen>,
) -> AppResult<Response> {
    let item = item_id(&item)?;
    let reporter = reopen::Reporter::from(&caller.who);
    let reopened = reopen::reopen(&ctx.db, item, Some(&caller.who), reporter, &body).await?;
    Ok(Json(reopened).into_response())
}
