//! `/projects/{p}/ingest`, `/projects/{p}/ingests`, `/ingests/{id}`:
//! ingests started over HTTP and their progress.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::extract::{Authed, AuthedProject, JsonBody, Operate};
use crate::auth::{self, Action};
use crate::context::Context;
use crate::error::{AppError, AppResult, ErrorBody};
use crate::ingest::runs::IngestRun;
use crate::ingest::{self, Source, prefix::Prefix, sources};

/// What to ingest over HTTP: exactly one of a prefix (`store:PREFIX` or
/// `s3://BUCKET/PREFIX`) or a manifest in sieve's store (`store:KEY`).
/// Never a path on the server.
#[derive(Deserialize, ToSchema)]
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

/// Start an ingest in the background; its progress is at the `Location`.
#[utoipa::path(
    post,
    path = "/projects/{project}/ingest",
    tag = "ingest",
    params(("project" = String, Path, description = "Project name or id")),
    request_body = IngestRequest,
    responses(
        (status = 202, body = IngestRun, headers(("location" = String, description = "Where its progress is"))),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not operate, or (scoped to the project) may not read from there"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
        (status = 422, body = ErrorBody, description = "Not exactly one source, or one sieve cannot read"),
        (status = 429, body = ErrorBody, description = "Too many ingests running; try again later"),
    )
)]
pub async fn start(
    State(ctx): State<Context>,
    at: AuthedProject<Operate>,
    JsonBody(body): JsonBody<IngestRequest>,
) -> AppResult<Response> {
    let source = body.source()?;
    // A token scoped to this project reads only where the project allows
    // it; one for every project reads anywhere the server can.
    let allowed = match at.who.project {
        Some(_) => {
            let allowed = sources::load(&ctx.db, &at.project).await?;
            let inside = match &source {
                Source::Prefix(prefix) => allowed.covers(prefix),
                Source::ManifestInStore { key } => allowed.covers_key(key),
                Source::Folder(_) | Source::ManifestFile { .. } | Source::Annotations { .. } => {
                    false
                }
            };
            if !inside {
                return Err(AppError::Forbidden(allowed.outside(&source.to_string())));
            }
            Some(allowed)
        }
        None => None,
    };
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
    let run = ingest::runs::start(
        &ctx,
        &at.project,
        source,
        &at.who.name,
        labels_refused,
        allowed,
    )
    .await?;
    let location = format!("/api/v1/ingests/{}", run.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(run),
    )
        .into_response())
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// How many, newest first (default 20, at most 1000).
    limit: Option<u64>,
}

/// A project's ingests, newest first.
#[derive(Serialize, ToSchema)]
pub struct IngestList {
    ingests: Vec<IngestRun>,
}

#[utoipa::path(
    get,
    path = "/projects/{project}/ingests",
    tag = "ingest",
    params(("project" = String, Path, description = "Project name or id"), ListQuery),
    responses(
        (status = 200, body = IngestList),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not operate"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
        (status = 422, body = ErrorBody, description = "A bad limit or an unknown parameter"),
    )
)]
pub async fn list(
    State(ctx): State<Context>,
    at: AuthedProject<Operate>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> AppResult<Response> {
    let Query(query) = query.map_err(|e| AppError::Invalid(e.body_text()))?;
    let limit = query.limit.unwrap_or(20).min(1000);
    let runs = ingest::runs::list(&ctx.db, &at.project, limit).await?;
    Ok(Json(IngestList { ingests: runs }).into_response())
}

/// One ingest and its progress.
#[utoipa::path(
    get,
    path = "/ingests/{ingest}",
    tag = "ingest",
    params(("ingest" = String, Path, description = "Ingest id")),
    responses(
        (status = 200, body = IngestRun),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not operate"),
        (status = 404, body = ErrorBody, description = "No such ingest (or not the token's project's)"),
    )
)]
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
