//! Live, losable state in Redis: worker heartbeats (later also counters and
//! short-lived locks).
//!
//! Redis holds nothing that cannot be lost: a flush only hides workers until
//! their next beat. A worker refreshes one key with a TTL; `sieve workers`
//! lists the keys.

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::error::Unreachable;

/// A self-reconnecting Redis connection.
pub async fn connect(url: &str) -> Result<ConnectionManager, Unreachable> {
    let client = redis::Client::open(url).map_err(|e| Unreachable::new("Redis", url, e))?;
    ConnectionManager::new(client)
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
    /// Model versions loaded, as `project:version`.
    pub models: Vec<String>,
    pub batches_done: u64,
    pub items_done: u64,
    pub items_per_second: f64,
    /// Redis server time (unix seconds) of the beat, not the worker's clock.
    pub seen_at: i64,
}

pub fn key(prefix: &str, worker_id: &str) -> String {
    format!("{prefix}:worker:{worker_id}")
}

pub fn pattern(prefix: &str) -> String {
    format!("{prefix}:worker:*")
}
