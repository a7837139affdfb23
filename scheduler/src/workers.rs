//! The live fleet, from worker heartbeats in Redis.

use redis::AsyncCommands;
use sieve_shared::live::{self, Heartbeat};
use sieve_shared::settings::RedisSettings;

/// Every worker whose heartbeat has not expired, sorted by id.
pub async fn list(settings: &RedisSettings) -> anyhow::Result<Vec<Heartbeat>> {
    let mut redis = live::connect(&settings.url).await?;
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter = redis
            .scan_match::<_, String>(live::pattern(&settings.prefix))
            .await?;
        while let Some(key) = futures_util::StreamExt::next(&mut iter).await {
            keys.push(key?);
        }
    }
    let mut workers = Vec::new();
    for key in keys {
        let raw: Option<String> = redis.get(&key).await?;
        if let Some(beat) = raw.and_then(|r| serde_json::from_str::<Heartbeat>(&r).ok()) {
            workers.push(beat);
        }
    }
    workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
    Ok(workers)
}
