//! Publishing prediction jobs.
//!
//! An item gets a job when it is ingested (if its project has a model), when
//! a new model is activated (rescore), and from the sweeper when it has sat
//! `queued` without a prediction for too long (a crash between insert and
//! publish). Duplicated jobs are harmless: a prediction is unique per item and
//! model version.

use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use sea_orm::{
    ColumnTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder, QuerySelect, Statement,
    TransactionTrait, sea_query::Expr,
};
use sieve_shared::ids::{ItemId, JobId, ModelVersionId};
use sieve_shared::messages::{ModelRef, PrelabelJob, SCHEMA_VERSION};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::app::Context;
use crate::entities::{item, model_version, project};
use crate::projects::Project;

/// Jobs published per confirm round.
const PUBLISH_CHUNK: usize = 1000;

/// The model reference jobs of a project carry, if it has an active model.
pub async fn active_model(ctx: &Context, project: &Project) -> anyhow::Result<Option<ModelRef>> {
    let Some(version_id) = project.active_model_version_id else {
        return Ok(None);
    };
    let version = model_version::Entity::find_by_id(version_id)
        .one(&ctx.db)
        .await?
        .with_context(|| format!("active model version {version_id} is missing"))?;
    Ok(Some(model_ref(&version)?))
}

pub fn model_ref(version: &model_version::Model) -> anyhow::Result<ModelRef> {
    Ok(ModelRef {
        version_id: ModelVersionId::from_uuid(version.id),
        version: version.version,
        artifact_key: version
            .artifact_key
            .clone()
            .with_context(|| format!("model version {} has no artifact", version.version))?,
        checksum: version
            .checksum
            .clone()
            .with_context(|| format!("model version {} has no checksum", version.version))?,
    })
}

/// Publish one job per item with `model`, then stamp `dispatched_at`.
pub async fn publish_jobs(
    ctx: &Context,
    project: &Project,
    model: &ModelRef,
    items: &[(Uuid, String)],
) -> anyhow::Result<usize> {
    for chunk in items.chunks(PUBLISH_CHUNK) {
        let jobs: Vec<PrelabelJob> = chunk
            .iter()
            .map(|(id, key)| PrelabelJob {
                schema: SCHEMA_VERSION,
                job_id: JobId::new(),
                project_id: project.id,
                item_id: ItemId::from_uuid(*id),
                object_key: key.clone(),
                model: model.clone(),
            })
            .collect();
        ctx.publisher.publish_all(&jobs).await?;
        let mut ids: Vec<Uuid> = chunk.iter().map(|(id, _)| *id).collect();
        ids.sort();
        // Lock in id order, like the result consumer, so the two never deadlock.
        let txn = ctx.db.begin().await?;
        item::Entity::find()
            .filter(item::Column::Id.is_in(ids.clone()))
            .order_by_asc(item::Column::Id)
            .lock_exclusive()
            .all(&txn)
            .await?;
        item::Entity::update_many()
            .col_expr(
                item::Column::DispatchedAt,
                Expr::value(Utc::now().fixed_offset()),
            )
            .filter(item::Column::Id.is_in(ids))
            .exec(&txn)
            .await?;
        txn.commit().await?;
    }
    metrics::counter!("sieve_jobs_published_total").increment(items.len() as u64);
    Ok(items.len())
}

#[derive(FromQueryResult)]
struct PendingItem {
    id: Uuid,
    object_key: String,
}

/// Which pending items a sweep may re-publish.
#[derive(Clone, Copy, Debug)]
pub struct Sweep {
    /// Items never published that were created before this (a crash between
    /// insert and publish; younger ones may be an ingest still running).
    pub created_before: chrono::DateTime<Utc>,
    /// Items published before this, too; `None` while the prediction queue
    /// still holds work (their jobs are most likely waiting there, and
    /// publishing again would only duplicate a backlog).
    pub dispatched_before: Option<chrono::DateTime<Utc>>,
}

/// Items that need a prediction by the project's active model: queued ones,
/// ones whose review task nobody holds, and machine-labeled ones, that the
/// active version has not predicted yet. Human-labeled items and claimed
/// tasks are never touched. `sweep` narrows the choice to items whose jobs
/// look lost (the sweeper's use).
pub async fn dispatch_pending(
    ctx: &Context,
    project: &Project,
    sweep: Option<Sweep>,
) -> anyhow::Result<usize> {
    let Some(model) = active_model(ctx, project).await? else {
        return Ok(0);
    };
    let mut total = 0;
    let mut after = Uuid::nil();
    loop {
        let rows = PendingItem::find_by_statement(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            r#"
            SELECT i.id, i.object_key FROM items i
            WHERE i.project_id = $1 AND i.id > $2
              AND i.state IN ('queued', 'in_review', 'auto_labeled')
              AND ($3::timestamptz IS NULL
                   OR (i.dispatched_at IS NULL AND i.created_at < $3)
                   OR i.dispatched_at < $6)
              AND NOT EXISTS (SELECT 1 FROM predictions p
                              WHERE p.item_id = i.id AND p.model_version_id = $4)
              AND NOT EXISTS (SELECT 1 FROM review_tasks t
                              WHERE t.item_id = i.id AND t.state = 'claimed')
            ORDER BY i.id LIMIT $5
            "#,
            [
                project.id.as_uuid().into(),
                after.into(),
                sweep.map(|s| s.created_before.fixed_offset()).into(),
                model.version_id.as_uuid().into(),
                (PUBLISH_CHUNK as i64).into(),
                sweep
                    .and_then(|s| s.dispatched_before)
                    .map(|t| t.fixed_offset())
                    .into(),
            ],
        ))
        .all(&ctx.db)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.id;
        let items: Vec<(Uuid, String)> = rows.into_iter().map(|r| (r.id, r.object_key)).collect();
        total += publish_jobs(ctx, project, &model, &items).await?;
    }
    if total > 0 {
        tracing::info!(project = %project.name, model_version = model.version, jobs = total, "dispatched pending items");
    }
    Ok(total)
}

/// Re-publish jobs for items that have waited too long (a crash between the
/// insert and the publish, a lost message). Runs in `sieve serve`.
pub async fn run_sweeper(
    ctx: Context,
    every: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(every) => {}
        }
        let now = Utc::now();
        // Jobs can only be lost when the queue is empty yet items still wait.
        let queue = ctx.topology().prelabel_queue();
        let backlog = match sieve_shared::broker::queue_counts(&ctx.connection, &queue).await {
            Ok((ready, _)) => {
                metrics::gauge!("sieve_queue_ready_messages", "queue" => queue.clone())
                    .set(f64::from(ready));
                ready
            }
            Err(err) => {
                tracing::warn!(error = %err, "sweeper could not read the queue; will retry");
                continue;
            }
        };
        let sweep = Sweep {
            created_before: now - chrono::Duration::from_std(every).unwrap_or_default(),
            dispatched_before: (backlog == 0)
                .then(|| now - chrono::Duration::from_std(every * 10).unwrap_or_default()),
        };
        let projects = match project::Entity::find().all(&ctx.db).await {
            Ok(p) => p,
            Err(err) => {
                tracing::warn!(error = %err, "sweeper could not list projects; will retry");
                continue;
            }
        };
        for model in projects {
            let Ok(project) = Project::from_model(model) else {
                continue;
            };
            if let Err(err) = dispatch_pending(&ctx, &project, Some(sweep)).await {
                tracing::warn!(project = %project.name, error = format!("{err:#}"), "sweep failed; will retry");
            }
        }
    }
}
