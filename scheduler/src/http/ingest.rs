//! `/projects/{p}/ingest`, `/projects/{p}/ingests`, `/ingests/{id}`:
//! ingests started over HTTP and their progress.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::extract::{Authed, AuthedProject, JsonBody, Operate};
use crate::auth::{self, Action};
use crate::context::Context;
use crate::error::{AppError, AppResult};
use crate::ingest::{self, Source, prefix::Prefix};

/// What to ingest over HTTP: exactly one of a prefix (`store:PREFIX` or
/// `s3://BUCKET/PREFIX`) or a manifest in sieve's store (`store:KEY`).
/// Never a path on the server.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestRequest {
    prefix: Option<String>,
    manifest: Option<String>,
}

impl IngestRequest {
    fn source(self) -> AppResult<Source> {
        match (self.prefix, self.manifest) {
            (Some(prefix), None) => Prefix::parse(&prefix)
                .map(Source::Prefix)
                .map_err(|e| AppError::Invalid(e.to_string())),
            (None, Some(manifest)) => match manifest.strip_prefix("store:") {
                Some(key) => Ok(Source::ManifestInStore {
                    key: key.to_owned(),
                }),
                None => Err(AppError::Invalid(format!(
                    "manifest {manifest:?}: name a manifest uploaded to sieve's object store as store:KEY"
                ))),
            },
            _ => Err(AppError::Invalid(
                "give exactly one of \"prefix\" (store:PREFIX or s3://BUCKET/PREFIX) or \"manifest\" (store:KEY)"
                    .into(),
            )),
        }
    }
}

pub async fn start(
    State(ctx): State<Context>,
    at: AuthedProject<Operate>,
    JsonBody(body): JsonBody<IngestRequest>,
) -> AppResult<Response> {
    let source = body.source()?;
    if let Source::Prefix(prefix) = &source {
        // A bucket the settings cannot reach is said now, not in the run.
        prefix
            .open(&ctx)
            .map_err(|e| AppError::Invalid(format!("{e:#}")))?;
    }
    let labels_refused = (!auth::allows(at.who.role, Action::ImportLabels)).then(|| {
        format!(
            "importing labels takes an ml or admin token, not {:?}",
            at.who.role
        )
    });
    let run = ingest::runs::start(&ctx, &at.project, source, &at.who.name, labels_refused).await?;
    let location = format!("/api/v1/ingests/{}", run.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(run),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<u64>,
}

pub async fn list(
    State(ctx): State<Context>,
    at: AuthedProject<Operate>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> AppResult<Response> {
    let Query(query) = query.map_err(|e| AppError::Invalid(e.body_text()))?;
    let limit = query.limit.unwrap_or(20).min(1000);
    let runs = ingest::runs::list(&ctx.db, &at.project, limit).await?;
    Ok(Json(json!({ "ingests": runs })).into_response())
}

pub async fn show(
    State(ctx): State<Context>,
    caller: Authed<Operate>,
    Path(id): Path<String>,
) -> AppResult<Response> {
    // One answer for "no such ingest" and "another project's", so a
    // scoped token learns nothing from it.
    let missing = || AppError::NotFound(format!("no ingest {id:?}"));
    let uuid: Uuid = id.parse().map_err(|_| missing())?;
    let run = match ingest::runs::show(&ctx.db, uuid).await {
        Err(AppError::NotFound(_)) => return Err(missing()),
        found => found?,
    };
    if caller
        .who
        .project
        .is_some_and(|scope| scope != run.project_id)
    {
        return Err(missing());
    }
    Ok(Json(run).into_response())
}
