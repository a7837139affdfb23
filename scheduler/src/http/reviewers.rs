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
use crate::error::{AppError, AppResult};
use crate::operate::reviewers;

/// `GET /projects/{p}/reviewers?since=24h` (`since`: a duration back from
/// now or an RFC 3339 instant; absent: all time). Answers
/// [`reviewers::ReviewerFiguresReport`].
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
