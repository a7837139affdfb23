//! The live fleet, from worker heartbeats in Redis.

use sieve_shared::live::{self, WorkerView};
use sieve_shared::settings::RedisSettings;

/// Every known worker, alive or lost, sorted by id.
pub async fn list(settings: &RedisSettings) -> anyhow::Result<Vec<WorkerView>> {
    let mut redis = live::connect(&settings.url).await?;
    Ok(live::list(&mut redis, &settings.prefix).await?)
}
