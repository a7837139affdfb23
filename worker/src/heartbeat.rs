//! The worker's heartbeat in Redis (best-effort: Redis may be down or
//! flushed; the worker carries on and beats again).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::AsyncCommands;
use sieve_shared::live::{self, Heartbeat};
use tokio_util::sync::CancellationToken;

use crate::backend;
use crate::service::Worker;

fn beat(worker: &Worker, seen_at: i64) -> Heartbeat {
    let items = worker.stats.items.load(Ordering::Relaxed);
    let elapsed = worker.started.elapsed().as_secs_f64().max(1e-3);
    Heartbeat {
        worker_id: worker.id.clone(),
        host: gethostname::gethostname().to_string_lossy().into_owned(),
        capabilities: worker
            .capabilities
            .iter()
            .map(|c| c.name().to_owned())
            .collect(),
        backend: backend::backend_name().to_owned(),
        models: worker
            .cache
            .loaded()
            .iter()
            .map(|v| format!("v{v}"))
            .collect(),
        batches_done: worker.stats.batches.load(Ordering::Relaxed),
        items_done: items,
        items_per_second: items as f64 / elapsed,
        seen_at,
    }
}

pub async fn run(worker: Arc<Worker>, stop: CancellationToken) {
    let every = Duration::from_secs(worker.settings.worker.heartbeat_seconds.max(1));
    let key = live::key(&worker.settings.redis.prefix, &worker.id);
    let mut redis = None;
    loop {
        if redis.is_none() {
            match live::connect(&worker.settings.redis.url).await {
                Ok(conn) => redis = Some(conn),
                Err(err) => {
                    tracing::warn!(error = %err, "heartbeat: Redis unavailable; will retry")
                }
            }
        }
        if let Some(conn) = redis.as_mut() {
            // Server time, so a worker with a wrong clock is still judged right.
            let now: redis::RedisResult<(i64, i64)> = redis::cmd("TIME").query_async(conn).await;
            let seen_at = now.map(|(s, _)| s).unwrap_or_default();
            let json = serde_json::to_string(&beat(&worker, seen_at)).unwrap_or_default();
            let ttl = every.as_secs() * 3;
            if let Err(err) = conn.set_ex::<_, _, ()>(&key, json, ttl).await {
                tracing::warn!(error = %err, "heartbeat failed; will retry");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Remove the heartbeat on a clean exit, so the worker disappears at once.
pub async fn remove(worker: &Worker) {
    if let Ok(mut conn) = live::connect(&worker.settings.redis.url).await {
        let key = live::key(&worker.settings.redis.prefix, &worker.id);
        let _: redis::RedisResult<()> = conn.del(key).await;
    }
}
