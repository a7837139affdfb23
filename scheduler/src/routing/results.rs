//! The result consumer: predictions in, routing decisions out.
//!
//! Results are taken from `sieve.results` in batches and applied in one
//! transaction per batch, then acknowledged. The prediction insert is keyed
//! on (item, model version), so a redelivered result finds its row and
//! changes nothing; two scheduler processes consuming at once serialize on
//! that key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use futures_util::StreamExt;
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use rand::Rng;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    EntityTrait, QueryFilter, QueryOrder, QuerySelect, Statement, TransactionTrait,
    TryInsertResult,
};
use sieve_shared::boxes::{self, LabeledBox};
use sieve_shared::broker;
use sieve_shared::ids::ProjectId;
use sieve_shared::messages::{
    PredictionOutput, PrelabelOutcome, PrelabelResult, PrelabelResults, SCHEMA_VERSION,
    decode_results, encode,
};
use sieve_shared::retry;
use sieve_shared::scores::Scores;
use sieve_shared::topology::Route;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::context::Context;
use crate::entities::item::{self, ItemState};
use crate::entities::label::{self, LabelSource};
use crate::entities::review_task::{self, TaskReason, TaskState};
use crate::entities::{prediction, project};
use crate::kind::{LabelValue, TaskKind};
use crate::policy::{Decision, decide, draws};
use crate::projects::Project;
use crate::routing::calibration::{self, Calibration};

/// How long to wait for more results before applying a partial batch.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// What happened to one result; counted for metrics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    MachineLabeled,
    SentToReview,
    /// Stored, but routing left the item as it was (human-labeled, a claimed
    /// task, or a prediction by a version that is no longer active).
    Kept,
    Duplicate,
    Failed,
    /// The item no longer exists.
    UnknownItem,
}

impl Applied {
    fn label(self) -> &'static str {
        match self {
            Applied::MachineLabeled => "machine_labeled",
            Applied::SentToReview => "review",
            Applied::Kept => "kept",
            Applied::Duplicate => "duplicate",
            Applied::Failed => "failed",
            Applied::UnknownItem => "unknown_item",
        }
    }
}

/// Apply a batch of results in one transaction.
pub async fn apply(
    db: &DatabaseConnection,
    results: &[PrelabelResult],
) -> anyhow::Result<Vec<Applied>> {
    let txn = db.begin().await?;
    // Lock every item of the batch up front, in id order: everything else
    // that locks several items (dispatch) takes them in the same order, so
    // concurrent batches cannot deadlock.
    let mut ids: Vec<Uuid> = results.iter().map(|r| r.item_id.as_uuid()).collect();
    ids.sort();
    ids.dedup();
    let found = lock_items(&txn, &ids).await?;
    if found < ids.len() {
        // An ingest publishes a batch's jobs before its transaction commits
        // (`dispatch::lock_for_ingest`), so a result can come back for an
        // item not yet visible. Wait for the ingest batches in flight in
        // these projects, then look again; what is still missing is an
        // orphan (a batch that never committed) and is dropped below.
        wait_for_ingests(&txn, results).await?;
        lock_items(&txn, &ids).await?;
    }
    let mut projects: HashMap<ProjectId, Option<(Project, ActiveModel)>> = HashMap::new();
    let mut outcomes = Vec::with_capacity(results.len());
    for result in results {
        if let std::collections::hash_map::Entry::Vacant(slot) = projects.entry(result.project_id) {
            let found = project::Entity::find_by_id(result.project_id.as_uuid())
                .one(&txn)
                .await?
                .map(Project::from_model)
                .transpose()?;
            let found = match found {
                Some(project) => {
                    let active = ActiveModel::of(&txn, &project).await?;
                    Some((project, active))
                }
                None => None,
            };
            slot.insert(found);
        }
        let Some(Some((project, active))) = projects.get(&result.project_id) else {
            outcomes.push(Applied::UnknownItem);
            continue;
        };
        outcomes.push(apply_one(&txn, project, active, result).await?);
    }
    mark_returned(&txn, results).await?;
    txn.commit().await.context("committing a result batch")?;
    for outcome in &outcomes {
        metrics::counter!("sieve_results_routed_total", "outcome" => outcome.label()).increment(1);
    }
    Ok(outcomes)
}

/// Record how far each project's jobs have come back: the latest time a
/// job of this batch was published (job ids are time-ordered UUIDs, made
/// at publishing), in `dispatch_progress`, which the sweeper reads.
/// Whatever their outcome, these jobs left the queue.
async fn mark_returned(
    txn: &DatabaseTransaction,
    results: &[PrelabelResult],
) -> anyhow::Result<()> {
    let mut latest: HashMap<Uuid, chrono::DateTime<Utc>> = HashMap::new();
    for result in results {
        let Some(published) = published_at(result.job_id.as_uuid()) else {
            continue;
        };
        let mark = latest
            .entry(result.project_id.as_uuid())
            .or_insert(published);
        *mark = (*mark).max(published);
    }
    // In project order, like every other lock taken on several rows.
    let mut marks: Vec<(Uuid, String)> = latest
        .into_iter()
        .map(|(project, at)| (project, at.to_rfc3339()))
        .collect();
    if marks.is_empty() {
        return Ok(());
    }
    marks.sort();
    txn.execute_raw(Statement::from_sql_and_values(
        txn.get_database_backend(),
        r#"
        INSERT INTO dispatch_progress (project_id, returned_through)
        SELECT (m->>0)::uuid, (m->>1)::timestamptz
        FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS t(m, n)
        ORDER BY n
        ON CONFLICT (project_id) DO UPDATE
        SET returned_through = GREATEST(dispatch_progress.returned_through,
                                        EXCLUDED.returned_through)
        "#,
        [serde_json::to_string(&marks)?.into()],
    ))
    .await?;
    Ok(())
}

/// When a job was published: the time in its id (a UUIDv7, made then).
fn published_at(job: Uuid) -> Option<chrono::DateTime<Utc>> {
    let (secs, nanos) = job.get_timestamp()?.to_unix();
    chrono::DateTime::from_timestamp(i64::try_from(secs).ok()?, nanos)
}

/// Lock the items `ids` (sorted) in id order; returns how many exist.
pub(crate) async fn lock_items(txn: &DatabaseTransaction, ids: &[Uuid]) -> anyhow::Result<usize> {
    let found = item::Entity::find()
        .select_only()
        .column(item::Column::Id)
        .filter(item::Column::Id.is_in(ids.iter().copied()))
        .order_by_asc(item::Column::Id)
        .lock_exclusive()
        .into_tuple::<Uuid>()
        .all(txn)
        .await?;
    Ok(found.len())
}

/// Wait until no ingest batch of the results' projects is in flight: each
/// holds its project's row in share mode until it commits, and this takes
/// a lock that conflicts with that, until the end of `txn`.
async fn wait_for_ingests(
    txn: &DatabaseTransaction,
    results: &[PrelabelResult],
) -> anyhow::Result<()> {
    let mut projects: Vec<Uuid> = results.iter().map(|r| r.project_id.as_uuid()).collect();
    projects.sort();
    projects.dedup();
    txn.execute_raw(Statement::from_sql_and_values(
        txn.get_database_backend(),
        r#"
        SELECT id FROM projects
        WHERE id IN (SELECT value::uuid FROM jsonb_array_elements_text($1::jsonb))
        ORDER BY id FOR NO KEY UPDATE
        "#,
        [serde_json::to_string(&projects)?.into()],
    ))
    .await?;
    Ok(())
}

/// What routing needs to know about a project's active model.
#[derive(Default)]
pub(crate) struct ActiveModel {
    calibration: Option<Calibration>,
    /// Trained on nothing: route everything to review as a random seed set.
    untrained: bool,
}

impl ActiveModel {
    /// What routing knows about `project`'s active version (nothing without one).
    pub(crate) async fn of(txn: &impl ConnectionTrait, project: &Project) -> anyhow::Result<Self> {
        Ok(match project.active_model_version_id {
            Some(id) => ActiveModel {
                calibration: calibration::load(txn, id).await?,
                untrained: calibration::is_untrained(txn, id).await?,
            },
            None => ActiveModel::default(),
        })
    }

    /// The share of items sampled for random checks under `policy`: more
    /// than the audit rate while the version's calibration, for this very
    /// policy, is short of evidence.
    fn sample_rate(&self, policy: &crate::policy::Policy) -> f64 {
        self.calibration
            .as_ref()
            .filter(|c| c.is_for(policy))
            .and_then(|c| c.sample_rate)
            .unwrap_or(policy.audit_rate)
    }
}

async fn apply_one(
    txn: &DatabaseTransaction,
    project: &Project,
    active: &ActiveModel,
    result: &PrelabelResult,
) -> anyhow::Result<Applied> {
    // Lock the item: its state changes below must not race another batch.
    let Some(item) = item::Entity::find_by_id(result.item_id.as_uuid())
        .lock_exclusive()
        .one(txn)
        .await?
    else {
        tracing::warn!(item = %result.item_id, "result for an unknown item; dropping it");
        return Ok(Applied::UnknownItem);
    };
    let now = Utc::now().fixed_offset();

    let output = match &result.outcome {
        PrelabelOutcome::Failed { reason } => {
            // Only the active version fails an item: a failure by a version
            // since replaced says nothing about what the active one can do
            // (and the item's job for it is on its way).
            let by_active = project.active_model_version_id.is_none()
                || project.active_model_version_id == Some(result.model_version_id.as_uuid());
            if !by_active {
                tracing::debug!(item = %item.id, version = %result.model_version_id, %reason, "a failure by a version no longer active; ignored");
                return Ok(Applied::Kept);
            }
            // Only an item still waiting can fail; a labeled one keeps its label.
            if item.state == ItemState::Queued {
                item::Entity::update(item::ActiveModel {
                    id: Set(item.id),
                    state: Set(ItemState::Failed),
                    last_error: Set(Some(reason.clone())),
                    attempts: Set(item.attempts + 1),
                    updated_at: Set(now),
                    ..Default::default()
                })
                .exec(txn)
                .await?;
            }
            return Ok(Applied::Failed);
        }
        PrelabelOutcome::Scored(output) => output,
    };

    let prediction_id = Uuid::now_v7();
    let inserted = prediction::Entity::insert(prediction_row(prediction_id, result, output))
        .on_conflict_do_nothing_on([
            prediction::Column::ItemId,
            prediction::Column::ModelVersionId,
        ])
        .exec_without_returning(txn)
        .await?;
    if !matches!(inserted, TryInsertResult::Inserted(n) if n > 0) {
        return Ok(Applied::Duplicate);
    }

    route(
        txn,
        project,
        active,
        &item,
        Routed {
            prediction_id,
            version_id: result.model_version_id.as_uuid(),
            scores: &output.scores,
            proposal: output.detections.as_ref().map(|d| d.labeled_boxes()),
            possible_miss: output
                .detections
                .as_ref()
                .is_some_and(|d| d.possible_miss()),
        },
    )
    .await
}

/// What routing does with an item: label it, or send it to people.
enum Verdict {
    Label(LabelValue),
    Review { reason: TaskReason, priority: f32 },
}

/// A stored prediction, about to be routed.
pub(crate) struct Routed<'a> {
    pub prediction_id: Uuid,
    pub version_id: Uuid,
    pub scores: &'a Scores,
    /// A detector's proposed boxes: the label a machine-accepted image gets.
    pub proposal: Option<Vec<LabeledBox>>,
    /// Whether a box committee may have missed something
    /// (`ImageScores::possible_miss`): a recall-first kind never accepts
    /// such an image by machine.
    pub possible_miss: bool,
}

impl Routed<'_> {
    /// The label a machine acceptance writes for `project`'s item: the
    /// proposed class, or the proposed boxes if they fit the item (a
    /// detection prediction without a proposal, or with a box the image
    /// cannot hold, is no label at all).
    fn machine_label(
        &self,
        project: &Project,
        item: &item::Model,
        class_index: u32,
    ) -> Option<LabelValue> {
        match project.task_kind {
            TaskKind::Classification => Some(LabelValue::Class(class_index as i32)),
            TaskKind::Detection | TaskKind::Deidentify => {
                let boxes = self.proposal.clone()?;
                let (width, height) = (
                    u32::try_from(item.width?).ok()?,
                    u32::try_from(item.height?).ok()?,
                );
                match boxes::check(&boxes, project.class_names.len(), width, height) {
                    Ok(()) => Some(LabelValue::Boxes(boxes)),
                    Err(problem) => {
                        tracing::warn!(item = %item.id, %problem, "a proposal the image cannot hold; sent to review instead");
                        None
                    }
                }
            }
        }
    }
}

/// Route an item (locked by the caller) by one of its predictions under the
/// project's current policy: a machine label, a review task, or kept as it
/// is. Marks the prediction with the outcome and the policy version.
pub(crate) async fn route(
    txn: &DatabaseTransaction,
    project: &Project,
    active: &ActiveModel,
    item: &item::Model,
    routed: Routed<'_>,
) -> anyhow::Result<Applied> {
    let (prediction_id, version_id, scores) =
        (routed.prediction_id, routed.version_id, routed.scores);
    let now = Utc::now().fixed_offset();
    let is_active = project.active_model_version_id == Some(version_id);
    let routable = matches!(
        item.state,
        ItemState::Queued | ItemState::InReview | ItemState::AutoLabeled
    );
    let open_task = review_task::Entity::find()
        .filter(review_task::Column::ItemId.eq(item.id))
        .filter(review_task::Column::State.is_in([TaskState::Open, TaskState::Claimed]))
        .lock_exclusive()
        .one(txn)
        .await?;
    let claimed = open_task
        .as_ref()
        .is_some_and(|t| t.state == TaskState::Claimed);
    // Someone reported its label as wrong: people decide, not a model
    // (`items::reopen`).
    let reported = open_task
        .as_ref()
        .is_some_and(|t| t.reason == TaskReason::Reported);
    if !is_active || !routable || claimed || reported {
        mark_routed(txn, prediction_id, "kept", project.policy_version).await?;
        return Ok(Applied::Kept);
    }

    let draws = draws(project.id, &item.content_hash);
    let threshold = calibration::threshold_for(
        &project.policy,
        scores.top_class,
        active.calibration.as_ref(),
    );
    let decision = if active.untrained {
        // An untrained committee's doubt is noise, and ordering by it would
        // bias the first labels toward whatever classes it happens to doubt.
        // Review in random order instead: the first labels are a random
        // sample of the data (the seed set).
        Decision::Review {
            reason: TaskReason::Seed,
            priority: rand::rng().random::<f32>(),
        }
    } else {
        decide(
            &project.policy,
            scores,
            threshold,
            draws,
            active.sample_rate(&project.policy),
        )
    };
    // A machine acceptance needs a label to write; without one, people decide.
    let verdict = match decision {
        // Recall first: a possible miss is a possible privacy leak, so such
        // an image is neither accepted nor audited as if it would have been.
        Decision::MachineLabel { .. }
        | Decision::Review {
            reason: TaskReason::Audit,
            ..
        } if project.task_kind == TaskKind::Deidentify && routed.possible_miss => Verdict::Review {
            reason: TaskReason::LowConfidence,
            priority: (1.0 - scores.confidence) + scores.disagreement,
        },
        Decision::MachineLabel { class_index } => {
            match routed.machine_label(project, item, class_index) {
                Some(value) => Verdict::Label(value),
                None => Verdict::Review {
                    reason: TaskReason::LowConfidence,
                    priority: (1.0 - scores.confidence) + scores.disagreement,
                },
            }
        }
        Decision::Review { reason, priority } => Verdict::Review { reason, priority },
    };
    match verdict {
        Verdict::Label(value) => {
            label::Entity::insert(label::ActiveModel {
                id: Set(Uuid::now_v7()),
                item_id: Set(item.id),
                class_index: Set(value.class_index()),
                boxes: Set(value.boxes_json()),
                source: Set(LabelSource::Machine),
                reviewer: Set(None),
                prediction_id: Set(Some(prediction_id)),
                model_version_id: Set(Some(version_id)),
                review_task_id: Set(None),
                created_at: Set(now),
            })
            .exec_without_returning(txn)
            .await?;
            if let Some(task) = open_task {
                // The better model is now sure: nobody needs to look at it.
                review_task::Entity::update(review_task::ActiveModel {
                    id: Set(task.id),
                    state: Set(TaskState::Cancelled),
                    closed_at: Set(Some(now)),
                    updated_at: Set(now),
                    ..Default::default()
                })
                .exec(txn)
                .await?;
            }
            set_state(txn, item.id, ItemState::AutoLabeled, now).await?;
            mark_routed(txn, prediction_id, "auto_labeled", project.policy_version).await?;
            Ok(Applied::MachineLabeled)
        }
        Verdict::Review { reason, priority } => {
            match open_task {
                Some(task) => {
                    // Re-prioritise by the newer model's doubt.
                    review_task::Entity::update(review_task::ActiveModel {
                        id: Set(task.id),
                        prediction_id: Set(Some(prediction_id)),
                        reason: Set(reason),
                        priority: Set(priority),
                        updated_at: Set(now),
                        ..Default::default()
                    })
                    .exec(txn)
                    .await?;
                }
                None => {
                    let task = review_task::ActiveModel {
                        id: Set(Uuid::now_v7()),
                        project_id: Set(project.id.as_uuid()),
                        item_id: Set(item.id),
                        prediction_id: Set(Some(prediction_id)),
                        reason: Set(reason),
                        priority: Set(priority),
                        state: Set(TaskState::Open),
                        lease_holder: Set(None),
                        lease_expires_at: Set(None),
                        fencing_token: Set(0),
                        created_at: Set(now),
                        updated_at: Set(now),
                        closed_at: Set(None),
                    };
                    let opened = review_task::Entity::insert(task)
                        .on_conflict_do_nothing()
                        .exec_without_returning(txn)
                        .await?;
                    if matches!(opened, TryInsertResult::Inserted(n) if n > 0) {
                        metrics::counter!("sieve_review_tasks_opened_total").increment(1);
                    }
                }
            }
            set_state(txn, item.id, ItemState::InReview, now).await?;
            mark_routed(txn, prediction_id, "review", project.policy_version).await?;
            Ok(Applied::SentToReview)
        }
    }
}

fn prediction_row(
    id: Uuid,
    result: &PrelabelResult,
    output: &PredictionOutput,
) -> prediction::ActiveModel {
    let s = &output.scores;
    prediction::ActiveModel {
        id: Set(id),
        item_id: Set(result.item_id.as_uuid()),
        model_version_id: Set(result.model_version_id.as_uuid()),
        job_id: Set(result.job_id.as_uuid()),
        worker_id: Set(result.worker_id.clone()),
        probabilities: Set(serde_json::json!(output.probabilities)),
        member_votes: Set(serde_json::json!(output.member_votes)),
        top_class: Set(s.top_class as i32),
        confidence: Set(s.confidence),
        margin: Set(s.margin),
        entropy: Set(s.entropy),
        disagreement: Set(s.disagreement),
        mutual_information: Set(s.mutual_information),
        embedding: Set(output.embedding.as_ref().map(|e| serde_json::json!(e))),
        detections: Set(output
            .detections
            .as_ref()
            .and_then(|d| serde_json::to_value(d).ok())),
        routed_to: Set(None),
        policy_version: Set(None),
        created_at: Set(Utc::now().fixed_offset()),
    }
}

async fn set_state(
    txn: &DatabaseTransaction,
    id: Uuid,
    state: ItemState,
    now: chrono::DateTime<chrono::FixedOffset>,
) -> anyhow::Result<()> {
    item::Entity::update(item::ActiveModel {
        id: Set(id),
        state: Set(state),
        updated_at: Set(now),
        ..Default::default()
    })
    .exec(txn)
    .await?;
    Ok(())
}

async fn mark_routed(
    txn: &DatabaseTransaction,
    prediction_id: Uuid,
    routed_to: &str,
    policy_version: i32,
) -> anyhow::Result<()> {
    prediction::Entity::update(prediction::ActiveModel {
        id: Set(prediction_id),
        routed_to: Set(Some(routed_to.to_owned())),
        policy_version: Set(Some(policy_version)),
        ..Default::default()
    })
    .exec(txn)
    .await?;
    Ok(())
}

/// Consume `sieve.results` until `stop`, applying results in batches.
pub async fn run(
    ctx: Context,
    connection: Arc<Connection>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let batch_size = ctx.settings.review.results_batch.max(1);
    let queue = ctx.topology().results_queue();
    let (_channel, mut consumer) = broker::consume(
        &connection,
        &queue,
        u16::try_from(batch_size * 2).unwrap_or(u16::MAX),
        "sieve-scheduler-results",
    )
    .await
    .with_context(|| format!("consuming {queue}"))?;

    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            next = consumer.next() => match next {
                Some(delivery) => delivery,
                None => anyhow::bail!("the {queue} consumer was cancelled by the broker"),
            },
        };
        // Up to `results_batch` results (a worker's message carries a whole
        // batch of them) or what arrived within the window.
        let mut batch = Received::default();
        batch.add(first).await;
        let window = tokio::time::sleep(BATCH_WINDOW);
        tokio::pin!(window);
        while batch.results.len() < batch_size {
            tokio::select! {
                () = &mut window => break,
                next = consumer.next() => match next {
                    Some(delivery) => batch.add(delivery).await,
                    None => break,
                },
            }
        }
        handle_batch(&ctx, batch, &stop).await;
    }
}

/// Deliveries taken for one transaction, and the results they carry.
#[derive(Default)]
struct Received {
    deliveries: Vec<Delivery>,
    results: Vec<PrelabelResult>,
}

impl Received {
    /// Decode a delivery: its results join the batch; one that does not
    /// decode is dead-lettered at once.
    async fn add(&mut self, delivery: lapin::Result<Delivery>) {
        let delivery = match delivery {
            Ok(d) => d,
            Err(err) => {
                // The channel recovers by itself; unacked deliveries return.
                tracing::warn!(error = %err, "results consumer error");
                return;
            }
        };
        match decode_results(&delivery.data) {
            Ok(results) => {
                self.results.extend(results);
                self.deliveries.push(delivery);
            }
            Err(err) => {
                // Permanent: the same bytes will never decode. Dead-letter it.
                tracing::warn!(error = %err, "undecodable result message; dead-lettering it");
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: false,
                        ..Default::default()
                    })
                    .await;
            }
        }
    }
}

async fn handle_batch(ctx: &Context, batch: Received, stop: &CancellationToken) {
    let Received {
        deliveries: good,
        results,
    } = batch;
    if !results.is_empty() {
        apply_until_done(ctx, &results, good, stop).await;
    } else {
        // Nothing to apply (an empty batch message): settled as it is.
        ack_all(good).await;
    }
}

/// Apply `results` and acknowledge their deliveries, retrying until the
/// database takes them or the service stops (then they go back).
///
/// A failed batch is either the database's fault (restarting, a deadlock:
/// transient) or one result's (a poison result: a version id that does not
/// exist, a string PostgreSQL refuses). While the database answers, a failed
/// batch is applied one result at a time; a result that still fails
/// [`POISON_ATTEMPTS`] times, alone, with the database answering, is
/// dead-lettered with its error (`sieve failed list` shows it, `sieve
/// failed retry` sends it back), and the rest of the batch is routed. A
/// poison result so costs its batch a few hundred milliseconds, not every
/// project its routing.
async fn apply_until_done(
    ctx: &Context,
    results: &[PrelabelResult],
    good: Vec<Delivery>,
    stop: &CancellationToken,
) {
    // While the database is down, keep the batch unacknowledged and retry it
    // with backoff. Requeueing would count against the delivery limit and
    // dead-letter good results during a short database outage.
    let mut backoff = Duration::from_millis(250);
    loop {
        let err = match apply(&ctx.db, results).await {
            Ok(_) => break,
            Err(err) => err,
        };
        if ctx.db.ping().await.is_ok() {
            tracing::warn!(
                error = format!("{err:#}"),
                batch = results.len(),
                "a result batch failed while the database answers; applying it one result at a time"
            );
            if apply_one_by_one(ctx, results, stop).await {
                break;
            }
        } else {
            tracing::error!(
                error = format!("{err:#}"),
                batch = results.len(),
                retry_in = ?backoff,
                "applying results failed; retrying the batch"
            );
        }
        tokio::select! {
            () = stop.cancelled() => {
                // Shutting down: hand the batch back for another consumer.
                for delivery in good {
                    let _ = delivery
                        .nack(BasicNackOptions { requeue: true, ..Default::default() })
                        .await;
                }
                return;
            }
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
    ack_all(good).await;
}

/// How often a result is tried alone, the database answering, before it is
/// taken for poison.
pub const POISON_ATTEMPTS: u32 = 3;

/// The dead-letter reason of a result no database write could take.
pub const POISON_REASON: &str = "poison_result";

/// Apply each result in a transaction of its own; dead-letter those that
/// fail [`POISON_ATTEMPTS`] times while the database answers. Returns false
/// when the database stopped answering (or the service is stopping): the
/// caller retries the whole batch later, and what was applied is found
/// again by its keys.
async fn apply_one_by_one(
    ctx: &Context,
    results: &[PrelabelResult],
    stop: &CancellationToken,
) -> bool {
    for result in results {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match apply(&ctx.db, std::slice::from_ref(result)).await {
                Ok(_) => break,
                Err(err) => err,
            };
            if ctx.db.ping().await.is_err() || stop.is_cancelled() {
                return false;
            }
            if attempt >= POISON_ATTEMPTS {
                let error = format!("{err:#}");
                tracing::error!(
                    error,
                    item = %result.item_id,
                    version = %result.model_version_id,
                    project = %result.project_id,
                    "a result fails alone while the database answers; dead-lettering it"
                );
                if let Err(publish) = dead_letter(ctx, result, &error).await {
                    tracing::error!(error = %publish, "dead-lettering a poison result failed");
                    return false;
                }
                metrics::counter!("sieve_results_poison_total").increment(1);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
        }
    }
    true
}

/// Publish `result` alone to the dead-letter queue, marked as coming from
/// the results queue with `error`, so `sieve failed retry` sends it back
/// there.
async fn dead_letter(ctx: &Context, result: &PrelabelResult, error: &str) -> anyhow::Result<()> {
    let payload = encode(&PrelabelResults {
        schema: SCHEMA_VERSION,
        results: vec![result.clone()],
    });
    let headers = retry::dead_letter_headers(&ctx.topology().results_queue(), POISON_REASON, error);
    ctx.publisher
        .publish_payloads(Route::Dead, &[payload], Some(headers))
        .await?;
    Ok(())
}

async fn ack_all(deliveries: Vec<Delivery>) {
    for delivery in deliveries {
        if let Err(err) = delivery.ack(BasicAckOptions::default()).await {
            tracing::warn!(error = %err, "ack failed; the results will be redelivered and deduplicated");
        }
    }
}
