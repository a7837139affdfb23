//! `GET /projects/{p}/export?format=csv|jsonl|coco&source=&state=&min_confidence=&class=&since=`:
//! the labeled dataset, streamed page by page from one snapshot (`ml`,
//! `admin`). What the body cannot say before it ends travels in headers:
//! `x-sieve-export-cursor` (the `since` for next time) and
//! `x-sieve-export-left-out` (`in_review=3,failed=1`: items left out for
//! their state).

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::extract::{AuthedProject, Export as ExportAction};
use crate::context::Context;
use crate::error::{AppError, AppResult, ErrorBody};
use crate::export::{Export, Request};

/// The labeled dataset, streamed from one snapshot.
#[utoipa::path(
    get,
    path = "/projects/{project}/export",
    tag = "export",
    params(
        ("project" = String, Path, description = "Project name or id"),
        ("format" = String, Query, description = "csv, jsonl or coco (imagefolder is for the CLI)"),
        ("source" = Option<Vec<String>>, Query, explode, description = "Label source: human, machine, import"),
        ("state" = Option<Vec<String>>, Query, explode, description = "Item state (in_review and failed are left out unless named)"),
        ("min_confidence" = Option<f32>, Query, description = "The prediction behind the label at least this sure (0 to 1)"),
        ("class" = Option<Vec<String>>, Query, explode, description = "Label class"),
        ("since" = Option<String>, Query, description = "The cursor an earlier export gave: only what changed since"),
    ),
    responses(
        (status = 200, description = "The export; rows follow the format", content(
            (String = "text/csv; charset=utf-8"),
            (String = "application/x-ndjson"),
            (String = "application/json"),
        ), headers(
            ("x-sieve-export-cursor" = String, description = "Pass as `since` next time"),
            ("x-sieve-export-left-out" = String, description = "Items left out for their state, as `in_review=3,failed=1`"),
        )),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not export (ml and admin may)"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
        (status = 422, body = ErrorBody, description = "An unknown format, filter or value (the message names the allowed ones)"),
    )
)]
pub async fn export(
    State(ctx): State<Context>,
    at: AuthedProject<ExportAction>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> AppResult<Response> {
    let Query(pairs) = query.map_err(|e| AppError::Invalid(e.body_text()))?;
    let request = Request::from_query(&pairs)?;
    let format = request.format;
    if format.is_folder() {
        return Err(AppError::Invalid(format!(
            "format {} writes a directory and is for `sieve export --out DIR`; over HTTP use csv, jsonl or coco",
            format.name()
        )));
    }
    let export = Export::begin(&ctx.db, &at.project, request).await?;
    let summary = export.summary().clone();
    let project = at.project.name.clone();
    let body = futures_util::stream::try_unfold(export, move |mut export| {
        let project = project.clone();
        async move {
            match export.next_chunk().await {
                Ok(Some(chunk)) => Ok(Some((bytes::Bytes::from(chunk), export))),
                Ok(None) => Ok(None),
                Err(err) => {
                    // The status has gone out: the body ends short instead.
                    tracing::error!(project, error = format!("{err:#}"), "export failed mid-way");
                    Err(err)
                }
            }
        }
    });
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    let file = format!("{}.{}", at.project.name, format.extension());
    for (name, value) in [
        (
            "content-disposition",
            format!("attachment; filename=\"{file}\""),
        ),
        ("x-sieve-export-cursor", summary.cursor.clone()),
        ("x-sieve-export-left-out", summary.left_out_header()),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    Ok(response)
}
