//! Training runs cannot get stuck, and a project can always get a model.
//!
//! The one-run-per-project index means a run left `queued` or `running`
//! forever refuses every retrain after it. Runs get stuck when the scheduler
//! dies between a run's commit and its job's publish, when a train job is
//! dead-lettered (a worker crash loop past the delivery limit), or when a
//! worker dies mid-run without reporting. Every [`INTERVAL`], `sieve serve`
//! sweeps the runs that made no progress for `training.stuck_after_seconds`:
//! - `queued`, the train queue holding no job: the job was lost; it is
//!   published again, once (its version was allocated up front, so a second
//!   copy registers nothing twice);
//! - `queued` again after that, or `running` without progress: failed, with
//!   the reason, and any worker still on it told to stop.
//!
//! A project with no active version whose last run failed gets its first
//! model queued again, after a backoff that doubles with each failed run
//! in a row (one minute, two, four, … at most an hour), so a worker's fault
//! never leaves a project with no way forward and a permanent fault does not
//! make a run every few seconds.

use std::time::Duration;

use chrono::Utc;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use sieve_shared::broker;
use sieve_shared::ids::{ModelVersionId, ProjectId, TrainingRunId};
use sieve_shared::messages::{
    ControlCommand, ControlMessage, SCHEMA_VERSION, TrainJob, TrainParams,
};
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::entities::model_version;
use crate::entities::training_run::{self, RunState};
use crate::lease::{self, Held};
use crate::projects::{self, Project};
use crate::{dispatch, training};

/// How often `sieve serve` sweeps.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// Who the first-model runs this queues are requested by.
pub const REQUESTER: &str = "watchdog";

/// The first retry of a failed first model waits this long; each further
/// failure in a row doubles it, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(60);
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Queued runs whose lost job was published again.
    pub republished: Vec<uuid::Uuid>,
    /// Runs failed for want of progress.
    pub failed: Vec<uuid::Uuid>,
    /// Projects without a model whose first model was queued again.
    pub first_models: Vec<ProjectId>,
}

/// One sweep over every project's runs.
pub async fn sweep(ctx: &Context) -> anyhow::Result<Swept> {
    let stuck_after = Duration::from_secs(ctx.settings.training.stuck_after_seconds);
    let cutoff = Utc::now().fixed_offset()
        - chrono::Duration::from_std(stuck_after).unwrap_or(chrono::Duration::MAX);
    let mut swept = Swept::default();
    let silent = training_run::Entity::find()
        .filter(training_run::Column::State.is_in([RunState::Queued, RunState::Running]))
        .filter(training_run::Column::UpdatedAt.lt(cutoff))
        .all(&ctx.db)
        .await?;
    if !silent.is_empty() {
        let (waiting, _) =
            broker::queue_counts(&ctx.connection, &ctx.topology().train_queue()).await?;
        for run in silent {
            // Published again already if it was touched after its creation.
            let republished_before = run.updated_at > run.created_at;
            match run.state {
                RunState::Queued if waiting > 0 => tracing::info!(
                    run = %run.id,
                    waiting,
                    "a training run waits in a queue with jobs: is a train worker running?"
                ),
                RunState::Queued if !republished_before => {
                    republish(ctx, &run).await?;
                    swept.republished.push(run.id);
                }
                _ => {
                    let reason = match run.state {
                        RunState::Queued => format!(
                            "not started within {} s of its job being published again: no train worker takes it",
                            stuck_after.as_secs()
                        ),
                        _ => format!(
                            "no progress for {} s: its worker stopped without reporting, or its job was dead-lettered (sieve failed list)",
                            stuck_after.as_secs()
                        ),
                    };
                    if fail(ctx, run.id, reason).await? {
                        swept.failed.push(run.id);
                    }
                }
            }
        }
    }
    for project in projects::list(&ctx.db).await? {
        if project.active_model_version_id.is_none() && first_model_due(ctx, &project).await? {
            match training::request(ctx, &project, REQUESTER, project.train_params(), true).await {
                Ok(run) => {
                    tracing::warn!(project = %project.name, run = %run.run_id, "the project's last run failed and it has no model: first model queued again");
                    swept.first_models.push(project.id);
                }
                Err(err) => {
                    tracing::warn!(project = %project.name, error = %err, "could not queue a first model again")
                }
            }
        }
    }
    Ok(swept)
}

/// Whether `project` (no active version) should get its first model queued
/// again: no run on, the last one failed, and the backoff for the failures
/// in a row has passed since it ended.
async fn first_model_due(ctx: &Context, project: &Project) -> anyhow::Result<bool> {
    let runs = training_run::Entity::find()
        .filter(training_run::Column::ProjectId.eq(project.id.as_uuid()))
        .order_by_desc(training_run::Column::CreatedAt)
        .all(&ctx.db)
        .await?;
    let Some(last) = runs.first() else {
        return Ok(false);
    };
    if last.state != RunState::Failed {
        return Ok(false);
    }
    let failures = runs
        .iter()
        .take_while(|r| r.state == RunState::Failed)
        .count() as u32;
    let backoff = FIRST_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let ended = last.finished_at.unwrap_or(last.updated_at);
    let since = Utc::now().fixed_offset() - ended;
    Ok(since.to_std().unwrap_or_default() >= backoff)
}

/// Publish `run`'s train job again, rebuilt from its row, and mark the run
/// touched so it is not published a third time.
async fn republish(ctx: &Context, run: &training_run::Model) -> anyhow::Result<()> {
    let project = projects::get(&ctx.db, &run.project_id.to_string()).await?;
    let version = model_version::Entity::find_by_id(run.model_version_id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("run {} has no version row", run.id))?;
    let base = match run.base_version_id {
        Some(id) => model_version::Entity::find_by_id(id)
            .one(&ctx.db)
            .await?
            .map(|v| dispatch::model_ref(&v))
            .transpose()?,
        None => None,
    };
    let params: TrainParams = serde_json::from_value(run.params.clone())?;
    let job = TrainJob {
        schema: SCHEMA_VERSION,
        run_id: TrainingRunId::from_uuid(run.id),
        project_id: project.id,
        version_id: ModelVersionId::from_uuid(version.id),
        version: version.version,
        base,
        snapshot_key: run.snapshot_key.clone(),
        class_names: project.class_names.clone(),
        params,
    };
    ctx.publisher.publish(&job).await?;
    training_run::Entity::update_many()
        .col_expr(
            training_run::Column::UpdatedAt,
            sea_orm::sea_query::Expr::value(Utc::now().fixed_offset()),
        )
        .filter(training_run::Column::Id.eq(run.id))
        .filter(training_run::Column::State.eq(RunState::Queued))
        .exec(&ctx.db)
        .await?;
    metrics::counter!("sieve_training_runs_republished_total").increment(1);
    tracing::warn!(project = %project.name, run = %run.id, "a queued training run's job was lost: published again");
    Ok(())
}

/// Fail `run` with `reason` and tell any worker still on it to stop.
async fn fail(ctx: &Context, run: uuid::Uuid, reason: String) -> anyhow::Result<bool> {
    let ended = training::finish(ctx, run, RunState::Failed, Some(reason.clone())).await?;
    if ended {
        metrics::counter!("sieve_training_runs_stuck_total").increment(1);
        tracing::warn!(run = %run, %reason, "training run failed by the watchdog");
        ctx.publisher
            .publish(&ControlMessage {
                schema: SCHEMA_VERSION,
                command: ControlCommand::CancelTraining {
                    run_id: TrainingRunId::from_uuid(run),
                },
            })
            .await?;
    }
    Ok(ended)
}

/// Sweep every [`INTERVAL`], while this scheduler holds the background
/// lease, until `stop`.
pub async fn run(ctx: Context, held: Held, stop: CancellationToken) -> anyhow::Result<()> {
    lease::every(INTERVAL, &held, &stop, || async {
        if let Err(err) = sweep(&ctx).await {
            tracing::warn!(
                error = format!("{err:#}"),
                "training watchdog sweep failed; will retry"
            );
        }
        if let Err(err) = training::retention::sweep(&ctx).await {
            tracing::warn!(
                error = format!("{err:#}"),
                "snapshot retention sweep failed; will retry"
            );
        }
        if let Err(err) = crate::routing::reroute::sweep(&ctx.db).await {
            tracing::warn!(
                error = format!("{err:#}"),
                "re-routing after a policy change failed; will retry"
            );
        }
    })
    .await
}
