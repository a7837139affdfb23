//! Retraining without anyone asking: a project whose policy sets
//! `retrain_every_labels = N` gets a training run once N human labels have
//! arrived since the snapshot of its last run.
//!
//! The check runs in `sieve serve` on an interval. It goes through
//! [`training::request`], so everything a requested run guarantees holds
//! here too: one run at a time per project (the unique index refuses a
//! second, and this check skips projects with a run queued or running), the
//! minimum labels per class, and the snapshot's hash split.

use std::time::Duration;

use sea_orm::{ColumnTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder, Statement};
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::entities::training_run::{self, RunState};
use crate::error::AppError;
use crate::lease::{self, Held};
use crate::projects::{self, Project};
use crate::training::{self, RunSummary};

/// Who the runs this starts are requested by.
pub const REQUESTER: &str = "auto-retrain";

#[derive(FromQueryResult)]
struct Count {
    n: i64,
}

/// What the check decided for one project.
#[derive(Debug)]
pub enum Outcome {
    /// Not configured, or not enough new labels yet.
    NotDue {
        new_labels: i64,
    },
    /// A run is queued or running already.
    Busy,
    /// The last run failed and no label has arrived since: the same run
    /// would fail the same way. The next new label lifts it.
    BackedOff {
        failed_run: uuid::Uuid,
    },
    /// Due, but refused (typically too few labels for some class).
    Refused(String),
    Requested(RunSummary),
}

/// Check one project and request a run when it is due.
pub async fn check(ctx: &Context, project: &Project) -> anyhow::Result<Outcome> {
    let Some(every) = project.policy.retrain_every_labels else {
        return Ok(Outcome::NotDue { new_labels: 0 });
    };
    let runs = training_run::Entity::find()
        .filter(training_run::Column::ProjectId.eq(project.id.as_uuid()))
        .order_by_desc(training_run::Column::CreatedAt)
        .all(&ctx.db)
        .await?;
    if runs
        .iter()
        .any(|r| matches!(r.state, RunState::Queued | RunState::Running))
    {
        return Ok(Outcome::Busy);
    }
    // Labels in the newest snapshot that trained (a failed run's labels
    // are still waiting to be learned from).
    let learned = runs
        .iter()
        .find(|r| r.state == RunState::Succeeded)
        .map_or(0, |r| i64::from(r.label_count));
    let labels = Count::find_by_statement(Statement::from_sql_and_values(
        ctx.db.get_database_backend(),
        r#"
        SELECT count(DISTINCT l.item_id) AS n
        FROM labels l JOIN items i ON i.id = l.item_id
        WHERE i.project_id = $1 AND l.source IN ('human', 'import')
        "#,
        [project.id.as_uuid().into()],
    ))
    .one(&ctx.db)
    .await?
    .map_or(0, |c| c.n);
    if let Some(failed) = runs
        .first()
        .filter(|r| r.state == RunState::Failed && i64::from(r.label_count) >= labels)
    {
        return Ok(Outcome::BackedOff {
            failed_run: failed.id,
        });
    }
    let new_labels = labels - learned;
    if new_labels < i64::from(every) {
        return Ok(Outcome::NotDue { new_labels });
    }
    match training::request(ctx, project, REQUESTER, project.train_params(), false).await {
        Ok(run) => Ok(Outcome::Requested(run)),
        Err(AppError::Invalid(reason)) => Ok(Outcome::Refused(reason)),
        Err(AppError::Conflict(_)) => Ok(Outcome::Busy),
        Err(err) => Err(err.into()),
    }
}

/// Check every project each `every`, while this scheduler holds the
/// background lease, until `stop`.
pub async fn run(
    ctx: Context,
    every: Duration,
    held: Held,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    lease::every(every, &held, &stop, || check_all(&ctx)).await
}

/// One round: every project whose policy retrains automatically.
async fn check_all(ctx: &Context) {
    let projects = match projects::list(&ctx.db).await {
        Ok(projects) => projects,
        Err(err) => {
            tracing::warn!(error = %err, "auto-retrain could not list projects; will retry");
            return;
        }
    };
    for project in projects
        .iter()
        .filter(|p| p.policy.retrain_every_labels.is_some())
    {
        match check(ctx, project).await {
            Ok(Outcome::Requested(run)) => tracing::info!(
                project = %project.name,
                run = %run.run_id,
                "auto-retrain: enough new human labels, training run queued"
            ),
            Ok(Outcome::Refused(reason)) => {
                tracing::debug!(project = %project.name, %reason, "auto-retrain not possible yet");
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(project = %project.name, error = %err, "auto-retrain check failed; will retry");
            }
        }
    }
}
