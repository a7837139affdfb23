//! Dead letters stay dead until someone acts.
//!
//! Every dead letter (a job whose retries were used up, one the broker gave
//! up on at its delivery limit, a poison result) goes through the
//! dead-letter fanout to `dead`, which operators list, retry and purge, and
//! to `dead.notices`, which this consumer reads:
//! - a prelabel job's item is marked (`dead_lettered_at`, with the reason),
//!   and the sweeper and rescores leave it alone: an image that crashes
//!   workers is not sent again every ten minutes to crash them again and
//!   spend other jobs' delivery counts. `sieve failed retry` unmarks it as
//!   it sends the job back;
//! - a train job's run is failed with the reason, so the project can train
//!   again at once (the watchdog would otherwise fail it only after
//!   `training.stuck_after_seconds`).
//!
//! Other dead letters (results, training events) need nothing here. Every
//! effect is an idempotent update, so a redelivered notice changes nothing
//! and two schedulers may both consume.

use std::sync::Arc;

use anyhow::Context as _;
use lapin::Connection;
use lapin::options::BasicAckOptions;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use sieve_shared::messages::{PrelabelJob, TrainJob, decode};
use sieve_shared::{broker, retry};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::context::Context;
use crate::entities::training_run::RunState;
use crate::training;

/// Mark `item` as dead-lettered with `reason`, if it still waits.
pub async fn mark(
    db: &DatabaseConnection,
    item: Uuid,
    reason: &str,
) -> Result<bool, sea_orm::DbErr> {
    let done = db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE items SET dead_lettered_at = now(), dead_letter_reason = $2, updated_at = now()
             WHERE id = $1 AND state = 'queued' AND dead_lettered_at IS NULL",
            [item.into(), reason.into()],
        ))
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Clear `item`'s mark: someone sent its job again.
pub async fn unmark(db: &DatabaseConnection, item: Uuid) -> Result<(), sea_orm::DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE items SET dead_lettered_at = NULL, dead_letter_reason = NULL WHERE id = $1",
        [item.into()],
    ))
    .await?;
    Ok(())
}

/// What one notice did.
#[derive(Debug, PartialEq, Eq)]
pub enum Noticed {
    ItemMarked(Uuid),
    RunFailed(Uuid),
    Nothing,
}

/// Act on one dead letter: its payload, the queue it came from, why.
pub async fn notice(
    ctx: &Context,
    payload: &[u8],
    from: &str,
    reason: &str,
) -> anyhow::Result<Noticed> {
    let topology = ctx.topology();
    if from == topology.prelabel_queue()
        && let Ok(job) = decode::<PrelabelJob>(payload)
    {
        let item = job.item_id.as_uuid();
        if mark(&ctx.db, item, reason).await? {
            metrics::counter!("sieve_items_dead_lettered_total").increment(1);
            tracing::warn!(%item, %reason, "an item's job was dead-lettered; it is not sent again until `sieve failed retry`");
            return Ok(Noticed::ItemMarked(item));
        }
    } else if from == topology.train_queue()
        && let Ok(job) = decode::<TrainJob>(payload)
    {
        let run = job.run_id.as_uuid();
        let why = format!("its train job was dead-lettered ({reason}): see `sieve failed list`");
        if training::finish(ctx, run, RunState::Failed, Some(why)).await? {
            tracing::warn!(%run, %reason, "a training run's job was dead-lettered; the run is failed");
            return Ok(Noticed::RunFailed(run));
        }
    }
    Ok(Noticed::Nothing)
}

/// Consume `dead.notices` until `stop`.
pub async fn run(
    ctx: Context,
    connection: Arc<Connection>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let queue = ctx.topology().dead_notices_queue();
    let (_channel, mut consumer) =
        broker::consume(&connection, &queue, 16, "sieve-scheduler-dead-notices")
            .await
            .with_context(|| format!("consuming {queue}"))?;
    while let Some(delivery) = broker::next_delivery(&mut consumer, &queue, &stop).await? {
        let (from, reason) = retry::origin(&delivery.properties);
        let (from, reason) = (
            from.unwrap_or_default(),
            reason.unwrap_or_else(|| "unknown".into()),
        );
        // A failure is the database's (every effect is an idempotent
        // update): retry in place, and hand the notice back at shutdown.
        let mut backoff = std::time::Duration::from_millis(250);
        while let Err(err) = notice(&ctx, &delivery.data, &from, &reason).await {
            tracing::warn!(error = format!("{err:#}"), retry_in = ?backoff, "a dead-letter notice was not applied; retrying");
            tokio::select! {
                () = stop.cancelled() => {
                    let _ = delivery
                        .nack(lapin::options::BasicNackOptions { requeue: true, ..Default::default() })
                        .await;
                    return Ok(());
                }
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
        }
        if let Err(err) = delivery.ack(BasicAckOptions::default()).await {
            tracing::warn!(error = %err, "ack of a dead-letter notice failed; it comes back and changes nothing");
        }
    }
    Ok(())
}
