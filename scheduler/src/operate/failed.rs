//! What failed, and replaying it: `sieve failed list|retry|purge`.
//!
//! Two kinds of failure are kept for people to see. **Failed items** are
//! images that could not be used (not an image, too large, a permanent
//! prediction failure); they are in PostgreSQL with their reason. **Dead
//! letters** are messages a consumer refused (undecodable, redelivered past
//! the delivery limit, or a prediction job whose transient failure outlasted
//! every retry); they wait in `sieve.dead` with the queue they came from and
//! why. A retry sends either back through the normal path, where
//! every effect is keyed, so a retry cannot create a duplicate.

use anyhow::Context as _;
use chrono::Utc;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde::Serialize;
use sieve_shared::messages::{PrelabelJob, TrainEvent, TrainJob, decode, decode_results};
use sieve_shared::retry;
use sieve_shared::topology::Route;
use uuid::Uuid;

use crate::context::Context;
use crate::dispatch;
use crate::entities::item::{self, ItemState};
use crate::operate::dead_notices;
use crate::projects::Project;

#[derive(Clone, Debug, Serialize)]
pub struct FailedItem {
    pub item_id: Uuid,
    pub source: String,
    pub reason: String,
    pub attempts: i32,
}

/// Failed items of a project, newest first.
pub async fn failed_items(
    ctx: &Context,
    project: &Project,
    limit: u64,
) -> anyhow::Result<Vec<FailedItem>> {
    let items = item::Entity::find()
        .filter(item::Column::ProjectId.eq(project.id.as_uuid()))
        .filter(item::Column::State.eq(ItemState::Failed))
        .order_by_desc(item::Column::UpdatedAt)
        .limit(limit)
        .all(&ctx.db)
        .await?;
    Ok(items
        .into_iter()
        .map(|i| FailedItem {
            item_id: i.id,
            source: i.source,
            reason: i.last_error.unwrap_or_default(),
            attempts: i.attempts,
        })
        .collect())
}

/// Put failed items (all, or those whose reason contains `reason`) back in
/// the queue and dispatch them with the active model.
pub async fn retry_items(
    ctx: &Context,
    project: &Project,
    reason: Option<&str>,
) -> anyhow::Result<usize> {
    let mut query = item::Entity::update_many()
        .col_expr(
            item::Column::State,
            sea_orm::sea_query::Expr::value(ItemState::Queued),
        )
        .col_expr(
            item::Column::UpdatedAt,
            sea_orm::sea_query::Expr::value(Utc::now().fixed_offset()),
        )
        .filter(item::Column::ProjectId.eq(project.id.as_uuid()))
        .filter(item::Column::State.eq(ItemState::Failed))
        // Files that were never images cannot succeed: they have no stored image.
        .filter(item::Column::Width.is_not_null());
    if let Some(reason) = reason {
        query = query.filter(item::Column::LastError.contains(reason));
    }
    let requeued = query.exec(&ctx.db).await?.rows_affected as usize;
    if requeued > 0 {
        dispatch::dispatch_pending(ctx, project, None).await?;
    }
    Ok(requeued)
}

/// One message in the dead-letter queue.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    /// Position in the queue when listed (1-based).
    pub position: usize,
    /// The queue it was dead-lettered from.
    pub queue: String,
    /// `rejected` (refused by a consumer), `delivery_limit`, or
    /// `retries_exhausted` (a transient failure outlasted every retry).
    pub reason: String,
    /// The error of the last attempt, when the worker gave up on a job.
    pub error: Option<String>,
    /// Attempts made, when the job was retried.
    pub attempts: Option<u32>,
    /// What it is, as far as it decodes.
    pub summary: String,
    #[serde(skip)]
    pub payload: Vec<u8>,
}

/// The queue a dead letter came from and why it died.
fn origin(delivery: &lapin::message::Delivery) -> (String, String) {
    let (queue, reason) = retry::origin(&delivery.properties);
    (
        queue.unwrap_or_default(),
        reason.unwrap_or_else(|| "unknown".into()),
    )
}

fn summarize(queue_route: Option<Route>, payload: &[u8]) -> String {
    let shown = |e: &dyn std::fmt::Display| format!("undecodable: {e}");
    match queue_route {
        Some(Route::Prelabel) => match decode::<PrelabelJob>(payload) {
            Ok(j) => format!(
                "prelabel job {} for item {} (model v{})",
                j.job_id, j.item_id, j.model.version
            ),
            Err(e) => shown(&e),
        },
        Some(Route::Results) => match decode_results(payload).as_deref() {
            Ok([r]) => format!("result {} for item {}", r.job_id, r.item_id),
            Ok(results) => format!(
                "{} results, the first for item {}",
                results.len(),
                results
                    .first()
                    .map_or_else(|| "-".to_owned(), |r| r.item_id.to_string())
            ),
            Err(e) => shown(&e),
        },
        Some(Route::Train) => match decode::<TrainJob>(payload) {
            Ok(t) => format!("train job for run {} (version {})", t.run_id, t.version),
            Err(e) => shown(&e),
        },
        Some(Route::TrainEvents) => match decode::<TrainEvent>(payload) {
            Ok(t) => format!("training event for run {}", t.run_id),
            Err(e) => shown(&e),
        },
        _ => format!("{} bytes", payload.len()),
    }
}

fn route_of(ctx: &Context, queue: &str) -> Option<Route> {
    let t = ctx.topology();
    [
        Route::Prelabel,
        Route::Results,
        Route::Train,
        Route::TrainEvents,
    ]
    .into_iter()
    .find(|r| t.address(*r).1 == queue)
}

/// Read the dead-letter queue without consuming it: every message is taken
/// unacknowledged and returned when the channel closes.
pub async fn dead_letters(ctx: &Context, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let channel = ctx.connection.create_channel().await?;
    let queue = ctx.topology().dead_queue();
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(message) = channel
            .basic_get(queue.clone().into(), BasicGetOptions { no_ack: false })
            .await
            .with_context(|| format!("reading {queue}"))?
        else {
            break;
        };
        let delivery = &message.delivery;
        let (from, reason) = origin(delivery);
        let retried = retry::header_text(&delivery.properties, retry::ERROR_HEADER).is_some();
        out.push(DeadLetter {
            position: out.len() + 1,
            reason,
            error: retry::header_text(&delivery.properties, retry::ERROR_HEADER),
            attempts: retried.then(|| retry::attempt(&delivery.properties)),
            summary: summarize(route_of(ctx, &from), &delivery.data),
            queue: from,
            payload: delivery.data.clone(),
        });
    }
    channel.close(200, "listed".into()).await.ok();
    Ok(out)
}

/// What a dead-letter retry did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RetryReport {
    pub retried: usize,
    /// Messages left in place, with why (they no longer apply, or do not
    /// decode and would only fail again).
    pub skipped: Vec<String>,
}

/// Send dead letters back to the queue they came from: all of them, or
/// those whose reason is `reason`. Ones that no longer apply are reported
/// and left in place.
pub async fn retry_dead(ctx: &Context, reason: Option<&str>) -> anyhow::Result<RetryReport> {
    retry_dead_where(ctx, reason, None).await
}

/// Send back one dead letter: the one at `position` in `failed list`.
pub async fn retry_dead_at(ctx: &Context, position: usize) -> anyhow::Result<RetryReport> {
    retry_dead_where(ctx, None, Some(position)).await
}

async fn retry_dead_where(
    ctx: &Context,
    reason: Option<&str>,
    position: Option<usize>,
) -> anyhow::Result<RetryReport> {
    let channel = ctx.connection.create_channel().await?;
    let queue = ctx.topology().dead_queue();
    let mut report = RetryReport::default();
    let mut seen = 0;
    // One message at a time: each one skipped stays unacknowledged on the
    // channel (nothing of it is kept here) until the channel closes and
    // returns it, so a queue of any length is read in constant memory.
    while let Some(message) = channel
        .basic_get(queue.clone().into(), BasicGetOptions { no_ack: false })
        .await
        .with_context(|| format!("reading {queue}"))?
    {
        seen += 1;
        let delivery = message.delivery;
        let (from, why) = origin(&delivery);
        if position.is_some_and(|p| p < seen) {
            break;
        }
        if reason.is_some_and(|r| r != why) || position.is_some_and(|p| p != seen) {
            continue;
        }
        let route = route_of(ctx, &from);
        let applies = match route {
            Some(Route::Prelabel) => match decode::<PrelabelJob>(&delivery.data) {
                Ok(job) => {
                    let exists = item::Entity::find_by_id(job.item_id.as_uuid())
                        .one(&ctx.db)
                        .await?
                        .is_some();
                    if exists {
                        // Someone acted: the sweeper and rescores may send
                        // it again from now on.
                        dead_notices::unmark(&ctx.db, job.item_id.as_uuid()).await?;
                        Ok(())
                    } else {
                        Err(format!("item {} no longer exists", job.item_id))
                    }
                }
                Err(e) => Err(format!("does not decode ({e})")),
            },
            Some(Route::Results) => decode_results(&delivery.data)
                .map(|_| ())
                .map_err(|e| format!("does not decode ({e})")),
            Some(Route::Train) => decode::<TrainJob>(&delivery.data)
                .map(|_| ())
                .map_err(|e| format!("does not decode ({e})")),
            Some(Route::TrainEvents) => decode::<TrainEvent>(&delivery.data)
                .map(|_| ())
                .map_err(|e| format!("does not decode ({e})")),
            _ => Err(format!("came from unknown queue {from:?}")),
        };
        match (applies, route) {
            (Ok(()), Some(route)) => {
                ctx.publisher
                    .publish_payloads(route, std::slice::from_ref(&delivery.data), None)
                    .await?;
                delivery.ack(BasicAckOptions::default()).await?;
                report.retried += 1;
            }
            (Ok(()), None) => {
                report.skipped.push(format!(
                    "{}: cannot be routed",
                    summarize(route, &delivery.data)
                ));
            }
            (Err(why), _) => {
                report
                    .skipped
                    .push(format!("{}: {why}", summarize(route, &delivery.data)));
            }
        }
    }
    // Closing the channel returns the messages left in place to the queue.
    channel.close(200, "retried".into()).await.ok();
    Ok(report)
}

/// Drop every dead letter. Returns how many there were.
pub async fn purge_dead(ctx: &Context) -> anyhow::Result<u32> {
    let channel = ctx.connection.create_channel().await?;
    let purged = channel
        .queue_purge(
            ctx.topology().dead_queue().into(),
            QueuePurgeOptions::default(),
        )
        .await?;
    channel.close(200, "purged".into()).await.ok();
    Ok(purged)
}
