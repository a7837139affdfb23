//! Every ingest has a row in `ingests`: one started over HTTP
//! (`POST /api/v1/projects/{p}/ingest`) runs as a task of `sieve serve`,
//! one started by `sieve ingest` runs in that command's process. Both are
//! read by `GET /api/v1/ingests/{id}`, listed per project by
//! `GET /api/v1/projects/{p}/ingests` and `sieve ingests`.
//!
//! The row is the progress: the counts and the first failures are written
//! every [`HEARTBEAT`] while the ingest runs (with `heartbeat_at`), and once
//! more at its end. Progress therefore survives a restart of the scheduler,
//! and a row still `running` whose heartbeat is older than [`STALE_AFTER`]
//! belongs to a process that died: it reads as `interrupted`. Running the
//! same ingest again is safe, since an item is unique per project and
//! content hash. On SIGTERM `sieve serve` stops its ingests between batches
//! and records them as interrupted at once
//! ([`crate::context::Background::shutdown`]).

use std::time::Duration;

use chrono::{DateTime, FixedOffset};
use sea_orm::{ConnectionTrait, DatabaseConnection, FromQueryResult, Statement, TransactionTrait};
use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;

use crate::context::Context;
use crate::error::{AppError, AppResult};
use crate::ingest::{
    self, FileFailure, IngestSummary, Options, REPORTED_FAILURES, Source, Stopped, sources::Allowed,
};
use crate::projects::Project;

/// How often a running ingest writes its progress (and so proves it is
/// alive).
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// A `running` ingest silent for this long is taken for interrupted.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Done,
    /// The ingest as a whole stopped with an error (see `error`).
    Failed,
    /// Its process stopped (shut down or died) before the end.
    Interrupted,
}

impl RunState {
    fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Done => "done",
            RunState::Failed => "failed",
            RunState::Interrupted => "interrupted",
        }
    }
}

/// An ingest as `GET /api/v1/ingests/{id}` shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct IngestRun {
    pub id: Uuid,
    pub project: String,
    #[serde(skip)]
    pub project_id: Uuid,
    pub source: String,
    pub requested_by: String,
    pub state: RunState,
    pub files_seen: i64,
    pub new_items: i64,
    pub duplicates: i64,
    pub failed: i64,
    pub dispatched: i64,
    pub imported_labels: i64,
    /// The first failures with their reasons; `failed` counts them all.
    pub failures: Vec<FileFailure>,
    pub error: Option<String>,
    pub created_at: DateTime<FixedOffset>,
    /// When the running process last recorded progress.
    pub heartbeat_at: DateTime<FixedOffset>,
    pub finished_at: Option<DateTime<FixedOffset>>,
}

/// Ingests running now (heartbeat fresh): in one project, and in all.
#[derive(Default, FromQueryResult)]
struct Running {
    here: i64,
    everywhere: i64,
}

#[derive(FromQueryResult)]
struct Row {
    id: Uuid,
    project: String,
    project_id: Uuid,
    source: String,
    requested_by: String,
    state: String,
    stale: bool,
    files_seen: i64,
    new_items: i64,
    duplicates: i64,
    failed: i64,
    dispatched: i64,
    imported_labels: i64,
    failures: serde_json::Value,
    error: Option<String>,
    created_at: DateTime<FixedOffset>,
    heartbeat_at: DateTime<FixedOffset>,
    finished_at: Option<DateTime<FixedOffset>>,
}

impl Row {
    fn into_run(self) -> IngestRun {
        let (state, error) = match self.state.as_str() {
            "running" if self.stale => (
                RunState::Interrupted,
                Some(format!(
                    "the scheduler running it stopped (no progress recorded since {}); \
                     start it again: nothing is added twice",
                    self.heartbeat_at
                )),
            ),
            "running" => (RunState::Running, self.error),
            "done" => (RunState::Done, self.error),
            "interrupted" => (RunState::Interrupted, self.error),
            _ => (RunState::Failed, self.error),
        };
        IngestRun {
            id: self.id,
            project: self.project,
            project_id: self.project_id,
            source: self.source,
            requested_by: self.requested_by,
            state,
            files_seen: self.files_seen,
            new_items: self.new_items,
            duplicates: self.duplicates,
            failed: self.failed,
            dispatched: self.dispatched,
            imported_labels: self.imported_labels,
            failures: serde_json::from_value(self.failures).unwrap_or_default(),
            error,
            created_at: self.created_at,
            heartbeat_at: self.heartbeat_at,
            finished_at: self.finished_at,
        }
    }
}

/// The columns of an [`IngestRun`], for `FROM ingests i JOIN projects p`.
const SELECT_RUN: &str = r#"
    SELECT i.id, p.name AS project, i.project_id, i.source, i.requested_by, i.state,
           i.heartbeat_at < now() - make_interval(secs => $1) AS stale,
           i.files_seen, i.new_items, i.duplicates, i.failed, i.dispatched,
           i.imported_labels, i.failures, i.error, i.created_at, i.heartbeat_at,
           i.finished_at
    FROM ingests i JOIN projects p ON p.id = i.project_id
"#;

async fn insert(
    db: &impl ConnectionTrait,
    project: &Project,
    source: &Source,
    requested_by: &str,
) -> anyhow::Result<Uuid> {
    let id = Uuid::now_v7();
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO ingests (id, project_id, source, requested_by) VALUES ($1, $2, $3, $4)",
        [
            id.into(),
            project.id.as_uuid().into(),
            source.to_string().into(),
            requested_by.into(),
        ],
    ))
    .await?;
    tracing::info!(ingest = %id, project = %project.name, source = %source, requested_by, "ingest started");
    Ok(id)
}

/// Record an ingest of `source` into `project` and start it in the
/// background; returns its row as it is now.
pub async fn start(
    ctx: &Context,
    project: &Project,
    source: Source,
    requested_by: &str,
    labels_refused: Option<String>,
    allowed: Option<Allowed>,
) -> AppResult<IngestRun> {
    // Count and insert under one lock, so two starts at once cannot both
    // pass the caps.
    let txn = ctx.db.begin().await?;
    txn.execute_raw(Statement::from_string(
        txn.get_database_backend(),
        "SELECT pg_advisory_xact_lock(hashtext('sieve ingest start'))",
    ))
    .await?;
    let running = Running::find_by_statement(Statement::from_sql_and_values(
        txn.get_database_backend(),
        r#"
        SELECT count(*) FILTER (WHERE project_id = $1) AS here, count(*) AS everywhere
        FROM ingests
        WHERE state = 'running' AND heartbeat_at > now() - make_interval(secs => $2)
        "#,
        [
            project.id.as_uuid().into(),
            STALE_AFTER.as_secs_f64().into(),
        ],
    ))
    .one(&txn)
    .await?
    .unwrap_or_default();
    let limits = &ctx.settings.ingest;
    if running.here >= i64::from(limits.max_running_per_project) {
        return Err(AppError::Busy(format!(
            "{} ingests into {} are running (ingest.max_running_per_project); start this one when one has finished",
            running.here, project.name
        )));
    }
    if running.everywhere >= i64::from(limits.max_running) {
        return Err(AppError::Busy(format!(
            "{} ingests are running (ingest.max_running); start this one when one has finished",
            running.everywhere
        )));
    }
    let id = insert(&txn, project, &source, requested_by).await?;
    txn.commit().await?;
    let (ctx2, project) = (ctx.clone(), project.clone());
    ctx.ingest_runs.spawn(|cancel| async move {
        let options = Options {
            terminal: false,
            progress: None,
            cancel: Some(cancel),
            labels_refused,
            allowed,
        };
        // The outcome is in the row; the log has the failure.
        let _ = supervise(
            &ctx2,
            &project,
            &source,
            id,
            options,
            "the scheduler shut down",
        )
        .await;
    });
    show(&ctx.db, id).await
}

/// Record an ingest and run it in this process (`sieve ingest`), with a
/// progress bar when `options.terminal`; `options.cancel` stops it between
/// batches, recorded as interrupted (by Ctrl-C or SIGTERM, as the CLI
/// wires it). Returns its id and its summary with
/// every failure (the row keeps the first [`REPORTED_FAILURES`]).
pub async fn run_here(
    ctx: &Context,
    project: &Project,
    source: &Source,
    requested_by: &str,
    options: Options,
) -> anyhow::Result<(Uuid, IngestSummary)> {
    let id = insert(&ctx.db, project, source, requested_by).await?;
    let summary = supervise(
        ctx,
        project,
        source,
        id,
        options,
        "stopped by Ctrl-C or SIGTERM",
    )
    .await?;
    Ok((id, summary))
}

/// One ingest, as recorded (a `running` one whose heartbeat stopped reads
/// as interrupted).
pub async fn show(db: &DatabaseConnection, id: Uuid) -> AppResult<IngestRun> {
    let row = Row::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        format!("{SELECT_RUN} WHERE i.id = $2"),
        [STALE_AFTER.as_secs_f64().into(), id.into()],
    ))
    .one(db)
    .await?;
    row.map(Row::into_run)
        .ok_or_else(|| AppError::NotFound(format!("no ingest {id}")))
}

/// A project's ingests, newest first, at most `limit`.
pub async fn list(
    db: &DatabaseConnection,
    project: &Project,
    limit: u64,
) -> AppResult<Vec<IngestRun>> {
    let rows = Row::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        format!(
            "{SELECT_RUN} WHERE i.project_id = $2 ORDER BY i.created_at DESC, i.id DESC LIMIT $3"
        ),
        [
            STALE_AFTER.as_secs_f64().into(),
            project.id.as_uuid().into(),
            i64::try_from(limit).unwrap_or(i64::MAX).into(),
        ],
    ))
    .all(db)
    .await?;
    Ok(rows.into_iter().map(Row::into_run).collect())
}

/// Run the ingest recorded as `id`, writing its progress every
/// [`HEARTBEAT`] and its outcome at the end.
async fn supervise(
    ctx: &Context,
    project: &Project,
    source: &Source,
    id: Uuid,
    mut options: Options,
    stopped_by: &str,
) -> anyhow::Result<IngestSummary> {
    let (progress, seen) = watch::channel(IngestSummary::default());
    options.progress = Some(progress);
    let ingest = ingest::ingest(ctx, project, source, &options);
    tokio::pin!(ingest);
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        tokio::select! {
            outcome = &mut ingest => break outcome,
            _ = beat.tick() => {
                let now = seen.borrow().clone();
                if let Err(err) = record(&ctx.db, id, &now, None).await {
                    tracing::warn!(ingest = %id, error = format!("{err:#}"), "ingest progress not recorded; will retry");
                }
            }
        }
    };
    let last = seen.borrow().clone();
    let (state, recorded, error) = match &outcome {
        Ok(summary) => {
            let mut recorded = summary.clone();
            recorded.failures.truncate(REPORTED_FAILURES);
            (RunState::Done, recorded, None)
        }
        Err(err) if err.is::<Stopped>() => (
            RunState::Interrupted,
            last,
            Some(format!(
                "{stopped_by}; start it again: nothing is added twice"
            )),
        ),
        Err(err) => {
            tracing::warn!(ingest = %id, project = %project.name, error = format!("{err:#}"), "ingest failed");
            (RunState::Failed, last, Some(format!("{err:#}")))
        }
    };
    // A few tries: a lost final write leaves the row `running`, read as
    // interrupted once its heartbeat is stale, which is still true enough.
    for attempt in 1..=3 {
        match record(&ctx.db, id, &recorded, Some((state, error.as_deref()))).await {
            Ok(()) => break,
            Err(err) => {
                tracing::warn!(ingest = %id, attempt, error = format!("{err:#}"), "ingest outcome not recorded");
                tokio::time::sleep(HEARTBEAT).await;
            }
        }
    }
    outcome
}

/// Write the counts (and the heartbeat); with `end`, the final state too.
async fn record(
    db: &DatabaseConnection,
    id: Uuid,
    summary: &IngestSummary,
    end: Option<(RunState, Option<&str>)>,
) -> anyhow::Result<()> {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let (state, error) = match end {
        Some((state, error)) => (Some(state.as_str()), error),
        None => (None, None),
    };
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        r#"
        UPDATE ingests
           SET files_seen = $2, new_items = $3, duplicates = $4, failed = $5,
               dispatched = $6, imported_labels = $7, failures = $8::jsonb,
               heartbeat_at = now(),
               state = COALESCE($9::text, state),
               error = COALESCE($10::text, error),
               finished_at = CASE WHEN $9::text IS NULL THEN NULL ELSE now() END
         WHERE id = $1
        "#,
        [
            id.into(),
            count(summary.files_seen).into(),
            count(summary.new_items).into(),
            count(summary.duplicates).into(),
            count(summary.failed).into(),
            count(summary.dispatched).into(),
            count(summary.imported_labels).into(),
            serde_json::to_string(&summary.failures)?.into(),
            state.map(str::to_owned).into(),
            error.map(str::to_owned).into(),
        ],
    ))
    .await?;
    Ok(())
}
