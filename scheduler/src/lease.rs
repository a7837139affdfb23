//! One scheduler at a time for the work that must not run twice.
//!
//! A rolling update runs two `sieve serve` processes at once. Both serve the
//! API and claims and consume results (every effect is keyed, so a result
//! is applied once whoever takes it), but the re-dispatch sweeper, automatic
//! retrains and the training watchdog would each do their work twice, or
//! race. They run only in the process that holds the lease named
//! [`BACKGROUND`]: a row in `scheduler_leases` that its holder renews every
//! [`RENEW`], and that another process takes once it has gone unrenewed for
//! [`TTL`] (its holder died) or its holder gave it up (shut down).

use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The lease of the background loops.
pub const BACKGROUND: &str = "background";

/// How long a lease lasts unrenewed.
pub const TTL: Duration = Duration::from_secs(30);

/// How often its holder renews it (and a standby tries to take it).
pub const RENEW: Duration = Duration::from_secs(5);

/// Whether this process holds the lease now: what the loops check before
/// each round of work.
#[derive(Clone, Debug)]
pub struct Held(watch::Receiver<bool>);

impl Held {
    pub fn now(&self) -> bool {
        *self.0.borrow()
    }
}

/// Run `round` every `every` while this process holds the lease, until
/// `stop`: the shape of every background loop. A round reports its own
/// errors and is tried again at the next tick.
pub async fn every<F, Fut>(
    every: Duration,
    held: &Held,
    stop: &CancellationToken,
    mut round: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(every) => {}
        }
        if held.now() {
            round().await;
        }
    }
}

/// Take or renew `name` for `holder`; true when `holder` has it now.
pub async fn try_hold(
    db: &DatabaseConnection,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<bool, sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            r#"
            INSERT INTO scheduler_leases (name, holder, expires_at)
            VALUES ($1, $2, now() + make_interval(secs => $3))
            ON CONFLICT (name) DO UPDATE
               SET holder = excluded.holder, expires_at = excluded.expires_at
             WHERE scheduler_leases.holder = excluded.holder
                OR scheduler_leases.expires_at < now()
            RETURNING holder
            "#,
            [name.into(), holder.into(), ttl.as_secs_f64().into()],
        ))
        .await?;
    Ok(row.is_some())
}

/// Give `name` up, if `holder` has it, so a standby takes it at once.
pub async fn release(
    db: &DatabaseConnection,
    name: &str,
    holder: &str,
) -> Result<(), sea_orm::DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "DELETE FROM scheduler_leases WHERE name = $1 AND holder = $2",
        [name.into(), holder.into()],
    ))
    .await?;
    Ok(())
}

/// A [`Held`] and the sender [`keep`] sets it with.
pub fn channel() -> (watch::Sender<bool>, Held) {
    let (tx, rx) = watch::channel(false);
    (tx, Held(rx))
}

/// Hold [`BACKGROUND`] for `holder` while it can, until `stop`, telling
/// `held` whether it does; then give it up. A database error counts as not
/// holding it (the lease may expire meanwhile), and is retried.
pub async fn keep(
    db: DatabaseConnection,
    holder: String,
    held: watch::Sender<bool>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let now = match try_hold(&db, BACKGROUND, &holder, TTL).await {
            Ok(now) => now,
            Err(err) => {
                tracing::warn!(error = %err, "could not renew the background lease; standing by");
                false
            }
        };
        if held.send_replace(now) != now {
            if now {
                tracing::info!(%holder, "background lease taken: this scheduler runs the sweeper, automatic retrains and the watchdog");
            } else {
                tracing::info!(%holder, "background lease not held: another scheduler runs the background loops");
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(RENEW) => {}
        }
    }
    held.send_replace(false);
    if let Err(err) = release(&db, BACKGROUND, &holder).await {
        tracing::warn!(error = %err, "could not give the background lease up; it expires by itself");
    }
    Ok(())
}

/// Who this process is, as a lease holder: host, process, and a random tail.
pub fn holder_id() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let tail = uuid::Uuid::now_v7().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &tail[tail.len() - 6..])
}
