//! The result consumer: predictions in, routing decisions out.
//!
//! Results are taken from `sieve.results` in batches and applied in one
//! transaction per batch, set-wise (`route.rs` decides and writes), then
//! acknowledged. The prediction insert is keyed on (item, model version),
//! so a redelivered result finds its row and changes nothing; two scheduler
//! processes consuming at once serialize on the items' locks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use futures_util::StreamExt;
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use sea_orm::{
    ActiveValue::Set, ConnectionTrait, DatabaseConnection, DatabaseTransaction, EntityTrait,
    FromQueryResult, Statement, TransactionTrait,
};
use sieve_shared::broker;
use sieve_shared::ids::ProjectId;
use sieve_shared::messages::{
    PredictionOutput, PrelabelOutcome, PrelabelResult, PrelabelResults, SCHEMA_VERSION,
    decode_results, encode,
};
use sieve_shared::retry;
use sieve_shared::topology::Route;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::context::Context;
use crate::entities::item::{self, ItemState};
use crate::entities::project;
use crate::projects::Project;
pub use crate::routing::route::Applied;
use crate::routing::route::{self, ActiveModel, Decided, Routed};

/// How long to wait for more results before applying a partial batch.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// The most result messages held unacknowledged. A worker's message carries
/// its whole batch (tens of results, each perhaps with an embedding), so
/// this bounds the consumer's memory whatever `review.results_batch` is;
/// single-result messages fill a batch of up to this many.
const MAX_PREFETCH: usize = 128;

/// Apply a batch of results in one transaction.
///
/// The batch is decided item by item ([`route::decide`]) and written
/// set-wise: one multi-row insert of its predictions (keyed on item and
/// version, so a redelivered result finds its row and is a
/// [`Applied::Duplicate`]), then [`route::write`]. Results for an item that
/// occurs more than once in the batch are taken in turns, each on the state
/// the one before left.
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
    let mut locked = route::lock_items(&txn, &ids).await?;
    if locked.len() < ids.len() {
        // An ingest publishes a batch's jobs before its transaction commits
        // (`dispatch::lock_for_ingest`), so a result can come back for an
        // item not yet visible. Wait for the ingest batches in flight in
        // these projects, then look again; what is still missing is an
        // orphan (a batch that never committed) and is dropped below.
        wait_for_ingests(&txn, results).await?;
        locked = route::lock_items(&txn, &ids).await?;
    }
    let mut items: HashMap<Uuid, item::Model> = locked.into_iter().map(|i| (i.id, i)).collect();
    let projects = projects_of(&txn, results).await?;

    let mut outcomes = vec![Applied::UnknownItem; results.len()];
    for (turn, positions) in turns(results).iter().enumerate() {
        if turn > 0 {
            // The turn before changed these items: read them again (still locked).
            let again: Vec<Uuid> = positions
                .iter()
                .map(|&i| results[i].item_id.as_uuid())
                .collect();
            items.extend(
                route::lock_items(&txn, &again)
                    .await?
                    .into_iter()
                    .map(|i| (i.id, i)),
            );
        }
        apply_turn(&txn, results, positions, &items, &projects, &mut outcomes).await?;
    }
    mark_returned(&txn, results).await?;
    txn.commit().await.context("committing a result batch")?;
    for outcome in &outcomes {
        metrics::counter!("sieve_results_routed_total", "outcome" => outcome.label()).increment(1);
    }
    Ok(outcomes)
}

/// The positions of `results` in turns, each holding an item at most once:
/// an item's first result in the first turn, its second in the second….
fn turns(results: &[PrelabelResult]) -> Vec<Vec<usize>> {
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    let mut turns: Vec<Vec<usize>> = Vec::new();
    for (i, result) in results.iter().enumerate() {
        let turn = seen.entry(result.item_id.as_uuid()).or_default();
        if turns.len() <= *turn {
            turns.push(Vec::new());
        }
        turns[*turn].push(i);
        *turn += 1;
    }
    turns
}

/// The projects of `results`, each with what routing knows of its active
/// version (`None`: the project is gone).
async fn projects_of(
    txn: &DatabaseTransaction,
    results: &[PrelabelResult],
) -> anyhow::Result<HashMap<ProjectId, Option<(Project, ActiveModel)>>> {
    let mut projects = HashMap::new();
    for result in results {
        if projects.contains_key(&result.project_id) {
            continue;
        }
        let found = project::Entity::find_by_id(result.project_id.as_uuid())
            .one(txn)
            .await?
            .map(Project::from_model)
            .transpose()?;
        let found = match found {
            Some(project) => {
                let active = ActiveModel::of(txn, &project).await?;
                Some((project, active))
            }
            None => None,
        };
        projects.insert(result.project_id, found);
    }
    Ok(projects)
}

/// Apply the results at `positions` (each item at most once), writing
/// their outcomes into `outcomes`.
async fn apply_turn(
    txn: &DatabaseTransaction,
    results: &[PrelabelResult],
    positions: &[usize],
    items: &HashMap<Uuid, item::Model>,
    projects: &HashMap<ProjectId, Option<(Project, ActiveModel)>>,
    outcomes: &mut [Applied],
) -> anyhow::Result<()> {
    let mut ids: Vec<Uuid> = positions
        .iter()
        .map(|&i| results[i].item_id.as_uuid())
        .filter(|id| items.contains_key(id))
        .collect();
    ids.sort();
    let tasks = route::open_tasks(txn, &ids).await?;
    let mut rows = Vec::with_capacity(positions.len());
    let mut decided = Vec::with_capacity(positions.len());
    for &i in positions {
        let result = &results[i];
        let Some(Some((project, active))) = projects.get(&result.project_id) else {
            continue;
        };
        let Some(item) = items.get(&result.item_id.as_uuid()) else {
            tracing::warn!(item = %result.item_id, "result for an unknown item; dropping it");
            continue;
        };
        let output = match &result.outcome {
            PrelabelOutcome::Failed { reason } => {
                outcomes[i] = fail(txn, project, item, result, reason).await?;
                continue;
            }
            PrelabelOutcome::Scored(output) => output,
        };
        let detections = output.detections.as_ref();
        let routed = Routed {
            prediction_id: Uuid::now_v7(),
            version_id: result.model_version_id.as_uuid(),
            scores: &output.scores,
            proposal: detections.map(|d| d.labeled_boxes()),
            possible_miss: detections.is_some_and(|d| d.possible_miss()),
        };
        let outcome = route::decide(project, active, item, tasks.get(&item.id), &routed);
        rows.push(prediction_row(
            routed.prediction_id,
            result,
            output,
            outcome.routed_to(),
            project.policy_version,
        ));
        decided.push((
            i,
            Decided {
                project_id: project.id.as_uuid(),
                item_id: item.id,
                prediction_id: routed.prediction_id,
                version_id: routed.version_id,
                policy_version: project.policy_version,
                outcome,
            },
        ));
    }
    let inserted = insert_predictions(txn, rows).await?;
    let mut fresh = Vec::with_capacity(decided.len());
    for (i, d) in decided {
        if inserted.contains(&d.prediction_id) {
            outcomes[i] = d.outcome.applied();
            fresh.push(d);
        } else {
            outcomes[i] = Applied::Duplicate;
        }
    }
    route::write(txn, &fresh).await
}

/// A failed prediction. Only the active version fails an item: a failure by
/// a version since replaced says nothing about what the active one can do
/// (and the item's job for it is on its way). Only an item still waiting
/// can fail; a labeled one keeps its label.
async fn fail(
    txn: &DatabaseTransaction,
    project: &Project,
    item: &item::Model,
    result: &PrelabelResult,
    reason: &str,
) -> anyhow::Result<Applied> {
    let by_active = project.active_model_version_id.is_none()
        || project.active_model_version_id == Some(result.model_version_id.as_uuid());
    if !by_active {
        tracing::debug!(item = %item.id, version = %result.model_version_id, %reason, "a failure by a version no longer active; ignored");
        return Ok(Applied::Kept);
    }
    if item.state == ItemState::Queued {
        item::Entity::update(item::ActiveModel {
            id: Set(item.id),
            state: Set(ItemState::Failed),
            last_error: Set(Some(reason.to_owned())),
            attempts: Set(item.attempts + 1),
            updated_at: Set(Utc::now().fixed_offset()),
            ..Default::default()
        })
        .exec(txn)
        .await?;
    }
    Ok(Applied::Failed)
}

/// Insert predictions (rows of [`prediction_row`]) where none exists yet
/// for their item and version; returns the ids of those inserted.
async fn insert_predictions(
    txn: &DatabaseTransaction,
    rows: Vec<serde_json::Value>,
) -> anyhow::Result<HashSet<Uuid>> {
    if rows.is_empty() {
        return Ok(HashSet::new());
    }
    #[derive(FromQueryResult)]
    struct Inserted {
        id: Uuid,
    }
    let inserted = Inserted::find_by_statement(Statement::from_sql_and_values(
        txn.get_database_backend(),
        r#"
        INSERT INTO predictions (id, item_id, model_version_id, job_id, worker_id, probabilities,
                                 member_votes, top_class, confidence, margin, entropy,
                                 disagreement, mutual_information, embedding, detections,
                                 routed_to, policy_version, created_at)
        SELECT r.id, r.item_id, r.model_version_id, r.job_id, r.worker_id, r.probabilities,
               r.member_votes, r.top_class, r.confidence, r.margin, r.entropy,
               r.disagreement, r.mutual_information, r.embedding, r.detections,
               r.routed_to, r.policy_version, $2
        FROM jsonb_to_recordset($1::jsonb) AS r(id uuid, item_id uuid, model_version_id uuid,
             job_id uuid, worker_id text, probabilities jsonb, member_votes jsonb, top_class int,
             confidence real, margin real, entropy real, disagreement real,
             mutual_information real, embedding jsonb, detections jsonb, routed_to text,
             policy_version int)
        ON CONFLICT (item_id, model_version_id) DO NOTHING
        RETURNING id
        "#,
        [
            serde_json::Value::Array(rows).to_string().into(),
            Utc::now().fixed_offset().into(),
        ],
    ))
    .all(txn)
    .await?;
    Ok(inserted.into_iter().map(|row| row.id).collect())
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

/// A prediction's row for [`insert_predictions`], routed to `routed_to`
/// under `policy_version`.
fn prediction_row(
    id: Uuid,
    result: &PrelabelResult,
    output: &PredictionOutput,
    routed_to: &str,
    policy_version: i32,
) -> serde_json::Value {
    let s = &output.scores;
    serde_json::json!({
        "id": id,
        "item_id": result.item_id.as_uuid(),
        "model_version_id": result.model_version_id.as_uuid(),
        "job_id": result.job_id.as_uuid(),
        "worker_id": result.worker_id,
        "probabilities": output.probabilities,
        "member_votes": output.member_votes,
        "top_class": s.top_class as i32,
        "confidence": route::real(s.confidence),
        "margin": route::real(s.margin),
        "entropy": route::real(s.entropy),
        "disagreement": route::real(s.disagreement),
        "mutual_information": route::real(s.mutual_information),
        "embedding": output.embedding,
        "detections": output.detections.as_ref().and_then(|d| serde_json::to_value(d).ok()),
        "routed_to": routed_to,
        "policy_version": policy_version,
    })
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
        u16::try_from((batch_size * 2).min(MAX_PREFETCH)).unwrap_or(u16::MAX),
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

#[cfg(test)]
mod tests {
    use sieve_shared::ids::{ItemId, JobId, ModelVersionId};

    use super::*;

    fn failed(item: Uuid) -> PrelabelResult {
        PrelabelResult {
            schema: SCHEMA_VERSION,
            job_id: JobId::new(),
            project_id: ProjectId::new(),
            item_id: ItemId::from_uuid(item),
            model_version_id: ModelVersionId::new(),
            worker_id: "w".into(),
            outcome: PrelabelOutcome::Failed { reason: "r".into() },
        }
    }

    #[test]
    fn an_item_is_in_a_turn_at_most_once_and_its_results_keep_their_order() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let batch: Vec<PrelabelResult> = [a, b, a, c, a, b].into_iter().map(failed).collect();
        assert_eq!(turns(&batch), vec![vec![0, 1, 3], vec![2, 5], vec![4]]);
        assert_eq!(turns(&batch[..2]), vec![vec![0, 1]]);
        assert!(turns(&[]).is_empty());
    }
}
