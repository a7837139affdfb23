//! Live, losable state in Redis: worker heartbeats.
//!
//! Redis holds nothing that cannot be lost: a flush only hides workers until
//! their next beat. Every worker writes its heartbeat into one hash
//! (`{prefix}:workers`, field = worker id) stamped with the *Redis server's*
//! clock, so a worker whose own clock is off is still judged right. A worker
//! that has not beaten for three periods is shown as lost; one lost for an
//! hour is forgotten.

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::error::Unreachable;

/// How many missed periods make a worker lost.
pub const LOST_AFTER_PERIODS: i64 = 3;
/// Lost workers are dropped from the list after this long.
pub const FORGET_AFTER_SECONDS: i64 = 3600;

/// A self-reconnecting Redis connection.
///
/// Few connection retries: with the default six, `sieve status` hung about
/// ten seconds while Redis was down before saying so. A long-lived user (the
/// heartbeat) retries by itself at its next beat anyway.
pub async fn connect(url: &str) -> Result<ConnectionManager, Unreachable> {
    let client = redis::Client::open(url).map_err(|e| Unreachable::new("Redis", url, e))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_number_of_retries(2)
        .set_connection_timeout(Some(std::time::Duration::from_secs(2)));
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| Unreachable::new("Redis", url, e))
}

/// What a worker reports about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker_id: String,
    pub host: String,
    pub capabilities: Vec<String>,
    pub backend: String,
    /// Model versions loaded (`v3`, ...).
    pub models: Vec<String>,
    pub batches_done: u64,
    pub items_done: u64,
    pub items_per_second: f64,
    /// The period the worker beats at, in seconds.
    pub period_seconds: u64,
    /// Redis server time (unix seconds) of the beat, not the worker's clock.
    pub seen_at: i64,
}

/// A worker as an operator sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkerView {
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
    pub seconds_since_seen: i64,
    pub lost: bool,
}

fn hash_key(prefix: &str) -> String {
    format!("{prefix}:workers")
}

/// The Redis server's clock, in unix seconds.
pub async fn server_time(conn: &mut ConnectionManager) -> redis::RedisResult<i64> {
    let (seconds, _micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(seconds)
}

/// Record a heartbeat, stamped with server time.
pub async fn beat(
    conn: &mut ConnectionManager,
    prefix: &str,
    mut heartbeat: Heartbeat,
) -> redis::RedisResult<()> {
    heartbeat.seen_at = server_time(conn).await?;
    let json = serde_json::to_string(&heartbeat).unwrap_or_default();
    conn.hset::<_, _, _, ()>(hash_key(prefix), &heartbeat.worker_id, json)
        .await
}

/// Remove a worker that stopped cleanly.
pub async fn forget(
    conn: &mut ConnectionManager,
    prefix: &str,
    worker_id: &str,
) -> redis::RedisResult<()> {
    conn.hdel::<_, _, ()>(hash_key(prefix), worker_id).await
}

/// Every known worker, judged by server time; long-lost ones are pruned.
pub async fn list(
    conn: &mut ConnectionManager,
    prefix: &str,
) -> redis::RedisResult<Vec<WorkerView>> {
    let now = server_time(conn).await?;
    let raw: std::collections::HashMap<String, String> = conn.hgetall(hash_key(prefix)).await?;
    let mut workers = Vec::new();
    for (id, json) in raw {
        let Ok(heartbeat) = serde_json::from_str::<Heartbeat>(&json) else {
            conn.hdel::<_, _, ()>(hash_key(prefix), &id).await?;
            continue;
        };
        let since = now - heartbeat.seen_at;
        if since > FORGET_AFTER_SECONDS {
            conn.hdel::<_, _, ()>(hash_key(prefix), &id).await?;
            continue;
        }
        let lost = since > LOST_AFTER_PERIODS * heartbeat.period_seconds.max(1) as i64;
        workers.push(WorkerView {
            heartbeat,
            seconds_since_seen: since,
            lost,
        });
    }
    workers.sort_by(|a, b| a.heartbeat.worker_id.cmp(&b.heartbeat.worker_id));
    Ok(workers)
}
