//! Publishing prediction jobs, and the per-project controls over it.
//!
//! An item gets a job when it is ingested (if its project has a model), when
//! a new model is activated (rescore), when a paused project resumes, and
//! from the sweeper when it has sat `queued` without a prediction for too
//! long (a crash between insert and publish). Duplicated jobs are harmless:
//! a prediction is unique per item and model version.
//!
//! Each project has a [`Control`]: paused (no job is published; items wait
//! with `dispatched_at` NULL and go out on resume), a rate limit in jobs per
//! second (paced per process, see [`pace`]), and a priority. RabbitMQ 3.10
//! quorum queues have no message priorities, so the priority is carried by
//! each job as the `sieve-priority` header and honoured by the dispatcher:
//! the sweeper serves projects in priority order.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use lapin::types::{AMQPValue, FieldTable};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, EntityTrait, FromQueryResult,
    Statement,
};
use serde::Serialize;
use sieve_shared::ids::{ItemId, JobId, ModelVersionId, ProjectId};
use sieve_shared::messages::{ModelRef, PrelabelJob, SCHEMA_VERSION, encode};
use sieve_shared::topology::Route;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::context::Context;
use crate::entities::{model_version, project};
use crate::lease::{self, Held};
use crate::projects::Project;

/// Jobs published per confirm round.
const PUBLISH_CHUNK: usize = 1000;

/// The header a job's project priority travels in.
pub const PRIORITY_HEADER: &str = "sieve-priority";

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

/// The model reference jobs of a project carry, as the database says now
/// (a [`Project`] read earlier may name a version since replaced).
pub async fn current_model(ctx: &Context, project: ProjectId) -> anyhow::Result<Option<ModelRef>> {
    let version = model_version::Model::find_by_statement(Statement::from_sql_and_values(
        ctx.db.get_database_backend(),
        r#"
        SELECT v.* FROM model_versions v
        JOIN projects p ON p.active_model_version_id = v.id
        WHERE p.id = $1
        "#,
        [project.as_uuid().into()],
    ))
    .one(&ctx.db)
    .await?;
    version.as_ref().map(model_ref).transpose()
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

/// How a project's jobs are dispatched. A project without a row in
/// `project_dispatch` has the default: running, unlimited, priority 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, FromQueryResult, utoipa::ToSchema)]
pub struct Control {
    pub paused: bool,
    /// Jobs per second; `None`: as fast as the broker takes them.
    pub rate_limit: Option<f64>,
    /// 0 to 9, higher first.
    pub priority: i16,
}

/// A change to a project's [`Control`]; `None` fields stay as they are.
#[derive(Clone, Debug, Default)]
pub struct ControlChange {
    pub paused: Option<bool>,
    /// `Some(None)` removes the limit.
    pub rate_limit: Option<Option<f64>>,
    pub priority: Option<i16>,
}

pub async fn control(db: &impl ConnectionTrait, project: ProjectId) -> anyhow::Result<Control> {
    let found = Control::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        "SELECT paused, rate_limit, priority::smallint AS priority FROM project_dispatch WHERE project_id = $1",
        [project.as_uuid().into()],
    ))
    .one(db)
    .await?;
    Ok(found.unwrap_or_default())
}

/// Apply `change` and return the control now in force.
pub async fn set_control(
    db: &DatabaseConnection,
    project: ProjectId,
    change: &ControlChange,
) -> crate::error::AppResult<Control> {
    use crate::error::AppError;
    if let Some(Some(rate)) = change.rate_limit
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(AppError::Invalid(format!(
            "rate limit {rate} must be a positive number of jobs per second"
        )));
    }
    if let Some(priority) = change.priority
        && !(0..=9).contains(&priority)
    {
        return Err(AppError::Invalid(format!(
            "priority {priority} must be 0 to 9 (higher first)"
        )));
    }
    let before = control(db, project).await?;
    let after = Control {
        paused: change.paused.unwrap_or(before.paused),
        rate_limit: change.rate_limit.unwrap_or(before.rate_limit),
        priority: change.priority.unwrap_or(before.priority),
    };
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        r#"
        INSERT INTO project_dispatch (project_id, paused, rate_limit, priority, updated_at)
        VALUES ($1, $2, $3, $4, now())
        ON CONFLICT (project_id) DO UPDATE
           SET paused = EXCLUDED.paused, rate_limit = EXCLUDED.rate_limit,
               priority = EXCLUDED.priority, updated_at = now()
        "#,
        [
            project.as_uuid().into(),
            after.paused.into(),
            after.rate_limit.into(),
            after.priority.into(),
        ],
    ))
    .await
    .map_err(anyhow::Error::from)?;
    Ok(after)
}

/// Pause a project: from now on no job is published for it (jobs already
/// in the queue stay there); ingest still records items.
pub async fn pause(ctx: &Context, project: &Project) -> crate::error::AppResult<Control> {
    let control = set_control(
        &ctx.db,
        project.id,
        &ControlChange {
            paused: Some(true),
            ..Default::default()
        },
    )
    .await?;
    tracing::info!(project = %project.name, "dispatch paused");
    Ok(control)
}

/// Resume a paused project and publish, once, every item that waited
/// unpublished. Returns how many jobs that was.
pub async fn resume(ctx: &Context, project: &Project) -> crate::error::AppResult<usize> {
    set_control(
        &ctx.db,
        project.id,
        &ControlChange {
            paused: Some(false),
            ..Default::default()
        },
    )
    .await?;
    let published = dispatch_unpublished(ctx, project).await?;
    tracing::info!(project = %project.name, jobs = published, "dispatch resumed");
    Ok(published)
}

/// Per process, per project: when the next job may go out under its rate
/// limit. One `sieve` process (an ingest, or `serve` with its sweeper)
/// paces all its publishers for a project together.
static PACERS: LazyLock<Mutex<HashMap<ProjectId, Instant>>> = LazyLock::new(Default::default);

/// Reserve `jobs` jobs at `rate` per second starting no earlier than
/// `now`: returns when they may be sent, and advances the project's
/// schedule past them.
fn reserve(next_free: &mut Instant, now: Instant, jobs: usize, rate: f64) -> Instant {
    let start = (*next_free).max(now);
    *next_free = start + Duration::from_secs_f64(jobs as f64 / rate);
    start
}

/// Wait until `jobs` jobs of `project` may be published at `rate` per
/// second.
async fn pace(project: ProjectId, jobs: usize, rate: f64) {
    let start = {
        let now = Instant::now();
        let mut pacers = PACERS.lock().unwrap_or_else(|p| p.into_inner());
        let next_free = pacers.entry(project).or_insert(now);
        reserve(next_free, now, jobs, rate)
    };
    tokio::time::sleep_until(start.into()).await;
}

/// Jobs sent in one go under a rate limit: a tenth of a second's worth, so
/// the rate holds over short spans too.
fn paced_chunk(rate: Option<f64>) -> usize {
    match rate {
        None => PUBLISH_CHUNK,
        Some(rate) => ((rate / 10.0).ceil() as usize).clamp(1, PUBLISH_CHUNK),
    }
}

/// Publish one job per item with `model`, then stamp `dispatched_at`,
/// under the project's control as read now. A paused project gets no job
/// (returns 0); its items keep waiting for resume.
pub async fn publish_jobs(
    ctx: &Context,
    project: &Project,
    model: &ModelRef,
    items: &[JobItem],
) -> anyhow::Result<usize> {
    if items.is_empty() {
        return Ok(0);
    }
    let control = control(&ctx.db, project.id).await?;
    if control.paused {
        return Ok(0);
    }
    publish_controlled(ctx, project, model, items, &control).await
}

/// [`publish_jobs`] with the control already read.
pub(crate) async fn publish_controlled(
    ctx: &Context,
    project: &Project,
    model: &ModelRef,
    items: &[JobItem],
    control: &Control,
) -> anyhow::Result<usize> {
    let headers = job_headers(control);
    for chunk in items.chunks(paced_chunk(control.rate_limit)) {
        if let Some(rate) = control.rate_limit {
            pace(project.id, chunk.len(), rate).await;
        }
        send_jobs(ctx, project, model, chunk, headers.clone()).await?;
        stamp(
            &ctx.db,
            chunk.iter().map(|item| item.id).collect(),
            Some(Utc::now()),
        )
        .await?;
    }
    Ok(items.len())
}

/// Publish one job per item, confirmed, with no rate limit and no stamp:
/// for items whose `dispatched_at` their own (uncommitted) insert already
/// set, see [`lock_for_ingest`].
pub(crate) async fn publish_unstamped(
    ctx: &Context,
    project: &Project,
    model: &ModelRef,
    items: &[JobItem],
    control: &Control,
) -> anyhow::Result<usize> {
    let headers = job_headers(control);
    for chunk in items.chunks(PUBLISH_CHUNK) {
        send_jobs(ctx, project, model, chunk, headers.clone()).await?;
    }
    Ok(items.len())
}

/// The headers every job of a project carries: its priority, if any.
fn job_headers(control: &Control) -> Option<FieldTable> {
    (control.priority > 0).then(|| {
        let mut headers = FieldTable::default();
        headers.insert(
            PRIORITY_HEADER.into(),
            AMQPValue::ShortShortUInt(control.priority.clamp(0, 9) as u8),
        );
        headers
    })
}

/// Encode and publish one job per item, and wait for the confirms.
async fn send_jobs(
    ctx: &Context,
    project: &Project,
    model: &ModelRef,
    items: &[JobItem],
    headers: Option<FieldTable>,
) -> anyhow::Result<()> {
    let payloads: Vec<Vec<u8>> = items
        .iter()
        .map(|item| {
            encode(&PrelabelJob {
                schema: SCHEMA_VERSION,
                job_id: JobId::new(),
                project_id: project.id,
                item_id: ItemId::from_uuid(item.id),
                object_key: item.object_key.clone(),
                model: model.clone(),
                size_bytes: u64::try_from(item.size_bytes).ok(),
            })
        })
        .collect();
    ctx.publisher
        .publish_payloads(Route::Prelabel, &payloads, headers)
        .await?;
    metrics::counter!("sieve_jobs_published_total").increment(items.len() as u64);
    Ok(())
}

/// What an ingest batch's transaction needs to know about its project,
/// read under a share lock on the project's row.
pub struct IngestTarget {
    /// The active model; `None`: the items wait for the first activation.
    pub model: Option<ModelRef>,
    pub control: Control,
}

impl IngestTarget {
    /// Whether the batch's jobs go out inside its transaction (before the
    /// commit): only when nothing holds them back. A rate limit would keep
    /// the transaction, and the lock, open while it paces.
    pub fn publishes_in_transaction(&self) -> bool {
        self.model.is_some() && !self.control.paused && self.control.rate_limit.is_none()
    }
}

/// Lock `project`'s row in share mode for the rest of `txn` and read its
/// active model and dispatch control.
///
/// The lock is what makes publishing before the commit safe. An
/// activation locks the row exclusively, so it waits for every ingest
/// batch in flight, and a batch that starts after it reads the new model;
/// either way the activation's rescore sees the batch's items. The result
/// consumer, given a result for an item it cannot see, takes a
/// conflicting lock on the row to wait for the batch that is inserting it
/// (see `results::apply`).
pub async fn lock_for_ingest(
    txn: &DatabaseTransaction,
    project: ProjectId,
) -> anyhow::Result<IngestTarget> {
    // A statement of its own: a later one sees what an activation that
    // this lock waited for committed.
    let active = txn
        .query_one_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            "SELECT active_model_version_id FROM projects WHERE id = $1 FOR SHARE",
            [project.as_uuid().into()],
        ))
        .await?
        .with_context(|| format!("project {project} is missing"))?
        .try_get::<Option<Uuid>>("", "active_model_version_id")?;
    let version = match active {
        Some(id) => Some(
            model_version::Entity::find_by_id(id)
                .one(txn)
                .await?
                .with_context(|| format!("active model version {id} is missing"))?,
        ),
        None => None,
    };
    Ok(IngestTarget {
        model: version.as_ref().map(model_ref).transpose()?,
        control: control(txn, project).await?,
    })
}

/// Set (or clear) `dispatched_at` of `ids` in one statement. The rows are
/// locked in id order first, like the result consumer locks them, so the
/// two never deadlock. The ids travel as one JSON parameter.
pub(crate) async fn stamp(
    db: &impl ConnectionTrait,
    ids: Vec<Uuid>,
    at: Option<chrono::DateTime<Utc>>,
) -> anyhow::Result<()> {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        r#"
        UPDATE items SET dispatched_at = $1
        WHERE id IN (SELECT id FROM items
                     WHERE id IN (SELECT value::uuid FROM jsonb_array_elements_text($2::jsonb))
                     ORDER BY id FOR UPDATE)
        "#,
        [
            at.map(|t| t.fixed_offset()).into(),
            serde_json::to_string(&ids)?.into(),
        ],
    ))
    .await?;
    Ok(())
}

/// An item as its prediction job names it.
#[derive(Clone, Debug, FromQueryResult)]
pub struct JobItem {
    pub id: Uuid,
    pub object_key: String,
    /// The image's size, for the worker's byte cap on a batch.
    pub size_bytes: i64,
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

/// Which items [`dispatch_where`] publishes.
#[derive(Clone, Copy, Debug)]
enum Pending {
    /// Everything the active model has not predicted (retry).
    All,
    /// The same, among the items that existed when the model was activated
    /// (ids up to `through`; `None`: the project had none): those inserted
    /// after went out with the new model already, by their ingest.
    Rescore { through: Option<Uuid> },
    /// What looks lost (the sweeper).
    Sweep(Sweep),
    /// Items never published (resume).
    Unpublished,
}

/// Items that need a prediction by the project's active model: queued ones,
/// ones whose review task nobody holds, and machine-labeled ones, that the
/// active version has not predicted yet. Human-labeled items and claimed
/// tasks are never touched. `sweep` narrows the choice to items whose jobs
/// look lost (the sweeper's use).
///
/// While the project is paused nothing is published; the items chosen
/// (outside a sweep) are marked unpublished, so resume sends them.
pub async fn dispatch_pending(
    ctx: &Context,
    project: &Project,
    sweep: Option<Sweep>,
) -> anyhow::Result<usize> {
    dispatch_where(ctx, project, sweep.map_or(Pending::All, Pending::Sweep)).await
}

/// [`dispatch_pending`] after an activation: only items up to `through`,
/// the newest item id when the activation committed (see
/// `training::registry::activate`). An ingest running meanwhile publishes
/// its items with the new model itself; a rescore walking the project a
/// page at a time for seconds would otherwise send them again.
pub async fn dispatch_rescore(
    ctx: &Context,
    project: &Project,
    through: Option<Uuid>,
) -> anyhow::Result<usize> {
    dispatch_where(ctx, project, Pending::Rescore { through }).await
}

/// Publish the items of `project` that were never published (or held back
/// while paused): pending, no prediction by the active model,
/// `dispatched_at` NULL; in id order.
pub async fn dispatch_unpublished(ctx: &Context, project: &Project) -> anyhow::Result<usize> {
    dispatch_where(ctx, project, Pending::Unpublished).await
}

async fn dispatch_where(
    ctx: &Context,
    project: &Project,
    pending: Pending,
) -> anyhow::Result<usize> {
    let Some(model) = current_model(ctx, project.id).await? else {
        return Ok(0);
    };
    let control = control(&ctx.db, project.id).await?;
    if control.paused && matches!(pending, Pending::Sweep(_) | Pending::Unpublished) {
        return Ok(0);
    }
    let (sweep_created, sweep_dispatched, unpublished) = match pending {
        Pending::All | Pending::Rescore { .. } => (None, None, false),
        Pending::Sweep(s) => (Some(s.created_before), s.dispatched_before, false),
        Pending::Unpublished => (None, None, true),
    };
    let through = match pending {
        Pending::Rescore { through: None } => return Ok(0),
        Pending::Rescore { through } => {
            let retried = requeue_failed(&ctx.db, project, through).await?;
            if retried > 0 {
                tracing::info!(project = %project.name, items = retried, "failed items get another try with the new version");
            }
            through
        }
        _ => None,
    };
    let mut total = 0;
    let mut held = 0;
    let mut after = Uuid::nil();
    loop {
        let items = JobItem::find_by_statement(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            r#"
            SELECT i.id, i.object_key, i.size_bytes FROM items i
            WHERE i.project_id = $1 AND i.id > $2
              AND i.state IN ('queued', 'in_review', 'auto_labeled')
              AND i.dead_lettered_at IS NULL
              AND ($3::timestamptz IS NULL
                   OR (i.dispatched_at IS NULL AND i.created_at < $3)
                   OR i.dispatched_at < $6)
              AND (NOT $7 OR i.dispatched_at IS NULL)
              AND ($8::uuid IS NULL OR i.id <= $8)
              AND NOT EXISTS (SELECT 1 FROM predictions p
                              WHERE p.item_id = i.id AND p.model_version_id = $4)
              AND NOT EXISTS (SELECT 1 FROM review_tasks t
                              WHERE t.item_id = i.id AND t.state = 'claimed')
            ORDER BY i.id LIMIT $5
            "#,
            [
                project.id.as_uuid().into(),
                after.into(),
                sweep_created.map(|t| t.fixed_offset()).into(),
                model.version_id.as_uuid().into(),
                (PUBLISH_CHUNK as i64).into(),
                sweep_dispatched.map(|t| t.fixed_offset()).into(),
                unpublished.into(),
                through.into(),
            ],
        ))
        .all(&ctx.db)
        .await?;
        let Some(last) = items.last() else { break };
        after = last.id;
        if control.paused {
            // Rescore or retry while paused: leave them for resume.
            held += items.len();
            stamp(
                &ctx.db,
                items.into_iter().map(|item| item.id).collect(),
                None,
            )
            .await?;
        } else {
            total += publish_controlled(ctx, project, &model, &items, &control).await?;
        }
    }
    if total > 0 {
        tracing::info!(project = %project.name, model_version = model.version, jobs = total, "dispatched pending items");
    }
    if held > 0 {
        tracing::info!(project = %project.name, items = held, "project paused: items wait for resume");
    }
    Ok(total)
}

/// How many prediction failures an item may have before a new version no
/// longer retries it by itself (`sieve failed retry` still does).
pub const RESCORE_RETRIES: i32 = 3;

/// Put back in the queue, for a new version's rescore, the items up to
/// `through` that a prediction failed: their image was stored (ingest
/// failures have none), no one holds a dead letter of theirs, and they
/// failed fewer than [`RESCORE_RETRIES`] times. What failed with one
/// version (a model that produced NaN, a worker fault taken for the
/// item's) may well succeed with the next. Rows locked in id order, like
/// the result consumer locks them.
async fn requeue_failed(
    db: &DatabaseConnection,
    project: &Project,
    through: Option<Uuid>,
) -> anyhow::Result<u64> {
    let requeued = db
        .execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            r#"
            UPDATE items SET state = 'queued', updated_at = now()
            WHERE id IN (SELECT id FROM items
                         WHERE project_id = $1 AND state = 'failed'
                           AND width IS NOT NULL AND dead_lettered_at IS NULL
                           AND attempts < $2 AND ($3::uuid IS NULL OR id <= $3)
                         ORDER BY id FOR UPDATE)
            "#,
            [
                project.id.as_uuid().into(),
                RESCORE_RETRIES.into(),
                through.into(),
            ],
        ))
        .await?;
    Ok(requeued.rows_affected())
}

/// Re-publish jobs for items that have waited too long (a crash between the
/// insert and the publish, a lost message). Runs in `sieve serve`.
pub async fn run_sweeper(
    ctx: Context,
    every: Duration,
    held: Held,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    lease::every(every, &held, &stop, || sweep_once(&ctx, every)).await
}

/// One round of the sweeper, which runs every `every`: re-publish what
/// looks lost ([`lost_before`]) in every project, by priority.
pub async fn sweep_once(ctx: &Context, every: Duration) {
    let now = Utc::now();
    let backlog = match backlog(ctx).await {
        Ok(backlog) => backlog,
        Err(err) => {
            tracing::warn!(error = %err, "sweeper could not read the queue; will retry");
            return;
        }
    };
    let returned_through = match returned_through(&ctx.db).await {
        Ok(mark) => mark,
        Err(err) => {
            tracing::warn!(
                error = format!("{err:#}"),
                "sweeper could not read how far jobs came back; will retry"
            );
            return;
        }
    };
    let sweep = Sweep {
        created_before: now - chrono::Duration::from_std(every).unwrap_or_default(),
        dispatched_before: lost_before(now, every, backlog, returned_through),
    };
    let projects = match projects_by_priority(&ctx.db).await {
        Ok(p) => p,
        Err(err) => {
            tracing::warn!(
                error = format!("{err:#}"),
                "sweeper could not list projects; will retry"
            );
            return;
        }
    };
    for model in projects {
        let Ok(project) = Project::from_model(model) else {
            continue;
        };
        if let Err(err) = dispatch_pending(ctx, &project, Some(sweep)).await {
            tracing::warn!(project = %project.name, error = format!("{err:#}"), "sweep failed; will retry");
        }
    }
}

/// Jobs waiting on the prelabel queue and in its delay queues, and results
/// waiting to be routed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backlog {
    pub ready: u32,
    pub delayed: u32,
    /// Result messages ready on the results queue: jobs done whose items
    /// are still `queued` until routing reaches them.
    pub results: u32,
}

/// Which published jobs look lost: those published before the time this
/// returns. The prediction queue is first in, first out (quorum queues
/// hand back returned messages first), so a job published well before one
/// that has come back (`returned_through`, from `dispatch_progress`) is
/// not waiting in it, whichever project either belongs to: a busy
/// project's backlog does not hold up recovery for a quiet one. With the
/// queue empty and no result waiting to be routed, whatever waited ten
/// sweeps is lost; results waiting are jobs done, whose items stay queued
/// until routing reaches them (workers faster than routing empty the
/// prediction queue long before), so then only what was published well
/// before the last result routed is. Jobs in a delay queue
/// came back out of order, and their items look old: while any wait
/// there, no published job counts as lost. "Well before" is ten sweeps:
/// workers hold a few batches each, and a redelivered job is no loss.
pub fn lost_before(
    now: chrono::DateTime<Utc>,
    every: Duration,
    backlog: Backlog,
    returned_through: Option<chrono::DateTime<Utc>>,
) -> Option<chrono::DateTime<Utc>> {
    let slack = chrono::Duration::from_std(every * 10).unwrap_or_default();
    match backlog {
        Backlog { delayed: 1.., .. } => None,
        Backlog {
            ready: 0,
            results: 0,
            ..
        } => Some(now - slack),
        Backlog { .. } => returned_through.map(|mark| mark.min(now) - slack),
    }
}

/// Ready jobs on the prelabel queue and in its delay queues, ready results.
async fn backlog(ctx: &Context) -> lapin::Result<Backlog> {
    let topology = ctx.topology();
    let queue = topology.prelabel_queue();
    let (ready, _) = sieve_shared::broker::queue_counts(&ctx.connection, &queue).await?;
    metrics::gauge!("sieve_queue_ready_messages", "queue" => queue).set(f64::from(ready));
    let mut delayed = 0;
    for delay_queue in topology.retry_queues() {
        let (waiting, _) =
            sieve_shared::broker::queue_counts(&ctx.connection, &delay_queue).await?;
        delayed += waiting;
    }
    let (results, _) =
        sieve_shared::broker::queue_counts(&ctx.connection, &topology.results_queue()).await?;
    Ok(Backlog {
        ready,
        delayed,
        results,
    })
}

/// The latest publishing time of a job whose result was applied, over
/// every project (see [`lost_before`]).
async fn returned_through(
    db: &DatabaseConnection,
) -> anyhow::Result<Option<chrono::DateTime<Utc>>> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT max(returned_through) AS mark FROM dispatch_progress",
        ))
        .await?;
    Ok(match row {
        Some(row) => row
            .try_get::<Option<chrono::DateTime<chrono::FixedOffset>>>("", "mark")?
            .map(|t| t.with_timezone(&Utc)),
        None => None,
    })
}

/// Every project, the highest dispatch priority first.
async fn projects_by_priority(db: &DatabaseConnection) -> anyhow::Result<Vec<project::Model>> {
    let mut projects = project::Entity::find().all(db).await?;
    let mut priority = HashMap::new();
    for p in &projects {
        let id = ProjectId::from_uuid(p.id);
        priority.insert(p.id, control(db, id).await?.priority);
    }
    projects.sort_by_key(|p| {
        (
            std::cmp::Reverse(priority.get(&p.id).copied()),
            p.created_at,
        )
    });
    Ok(projects)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_look_lost_behind_what_came_back() {
        let now = Utc::now();
        let every = Duration::from_secs(60);
        let ten_sweeps = chrono::Duration::minutes(10);
        let idle = Backlog {
            ready: 0,
            delayed: 0,
            results: 0,
        };
        let busy = Backlog {
            ready: 5_000,
            delayed: 0,
            results: 0,
        };
        let retrying = Backlog {
            ready: 0,
            delayed: 3,
            results: 0,
        };
        // Workers faster than routing: nothing waits to be predicted, but
        // results wait to be routed, their items still queued.
        let routing_behind = Backlog {
            ready: 0,
            delayed: 0,
            results: 800,
        };
        assert_eq!(lost_before(now, every, idle, None), Some(now - ten_sweeps));
        // A busy queue alone says nothing, before anything came back.
        assert_eq!(lost_before(now, every, busy, None), None);
        // Jobs published an hour ago came back: those published ten
        // sweeps before them are lost, whoever else fills the queue.
        let hour_ago = now - chrono::Duration::hours(1);
        assert_eq!(
            lost_before(now, every, busy, Some(hour_ago)),
            Some(hour_ago - ten_sweeps)
        );
        // A clock ahead of this one does not reach into the future.
        let ahead = now + chrono::Duration::hours(1);
        assert_eq!(
            lost_before(now, every, busy, Some(ahead)),
            Some(now - ten_sweeps)
        );
        assert_eq!(lost_before(now, every, retrying, Some(hour_ago)), None);
        // Before this, an empty prediction queue made every item queued for
        // ten sweeps lost, and the ceiling benchmark's sweeper published
        // 26,507 jobs again for items whose results were waiting.
        assert_eq!(lost_before(now, every, routing_behind, None), None);
        assert_eq!(
            lost_before(now, every, routing_behind, Some(hour_ago)),
            Some(hour_ago - ten_sweeps)
        );
    }

    #[test]
    fn pacing_spreads_jobs_at_the_rate() {
        let t0 = Instant::now();
        let mut next = t0;
        // 10 jobs/s: each reservation of 5 takes half a second of schedule.
        assert_eq!(reserve(&mut next, t0, 5, 10.0), t0);
        assert_eq!(
            reserve(&mut next, t0, 5, 10.0),
            t0 + Duration::from_millis(500)
        );
        assert_eq!(next, t0 + Duration::from_secs(1));
        // After an idle spell the schedule restarts from now, with no burst
        // saved up.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(reserve(&mut next, later, 1, 10.0), later);
    }

    #[test]
    fn chunks_are_a_tenth_of_a_second_of_jobs() {
        assert_eq!(paced_chunk(None), PUBLISH_CHUNK);
        assert_eq!(paced_chunk(Some(20.0)), 2);
        assert_eq!(paced_chunk(Some(0.5)), 1);
        assert_eq!(paced_chunk(Some(1e9)), PUBLISH_CHUNK);
    }
}
