//! `/projects/{p}/reviewers`: per-reviewer figures of a project.
//!
//! Figures about people: `ml` (label quality), `ops` (staffing) and `admin`
//! tokens may read them, `reviewer` tokens may not (403), since they would
//! see their colleagues'. A token scoped to another project gets 404.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use chrono::Utc;

use super::extract::{AuthedProject, ReviewerFigures};
use crate::context::Context;
use crate::error::{AppError, AppResult, ErrorBody};
use crate::operate::reviewers::{self, ReviewerFiguresReport};

/// Per-reviewer figures of a project: labels, pace, skips, undos, and
/// agreement with second opinions, reports and audits.
#[utoipa::path(
    get,
    path = "/projects/{project}/reviewers",
    tag = "review",
    params(
        ("project" = String, Path, description = "Project name or id"),
        ("since" = Option<String>, Query, description = "A duration back from now (`24h`) or an RFC 3339 instant; all time without"),
    ),
    responses(
        (status = 200, body = ReviewerFiguresReport),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "A reviewer token: figures about colleagues are for ml, ops and admin"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
        (status = 422, body = ErrorBody, description = "A bad or repeated since, or an unknown parameter"),
    )
)]
pub async fn list(
    State(ctx): State<Context>,
    at: AuthedProject<ReviewerFigures>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> AppResult<Response> {
    let Query(pairs) = query.map_err(|e| AppError::Invalid(e.body_text()))?;
    let mut since = None;
    for (key, value) in &pairs {
        match key.as_str() {
            "since" if since.is_none() => {
                since = Some(reviewers::parse_since(value, Utc::now())?);
            }
            "since" => {
                return Err(AppError::Invalid("since is given more than once".into()));
            }
            other => {
                return Err(AppError::Invalid(format!(
                    "unknown parameter {other:?}: the only one is since"
                )));
            }
        }
    }
    let report = reviewers::reviewer_figures(&ctx.db, &at.project, since).await?;
    Ok(Json(report).into_response())
}
