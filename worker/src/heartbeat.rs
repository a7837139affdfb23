//! The worker's heartbeat in Redis (best-effort: Redis may be down or
//! flushed; the worker carries on and beats again).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sieve_shared::live::{self, Heartbeat};
use tokio_util::sync::CancellationToken;

use crate::backend;
use crate::context::Worker;

fn heartbeat(worker: &Worker, period: Duration) -> Heartbeat {
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
        period_seconds: period.as_secs(),
        seen_at: 0,
    }
}

pub async fn run(worker: Arc<Worker>, stop: CancellationToken) {
    let period = Duration::from_secs(worker.settings.worker.heartbeat_seconds.max(1));
    let prefix = worker.settings.redis.prefix.clone();
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
        if let Some(conn) = redis.as_mut()
            && let Err(err) = live::beat(conn, &prefix, heartbeat(&worker, period)).await
        {
            tracing::warn!(error = %err, "heartbeat failed; will retry");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
    }
}

/// Remove the heartbeat on a clean exit, so the worker disappears at once
/// instead of showing as lost.
pub async fn remove(worker: &Worker) {
    if let Ok(mut conn) = live::connect(&worker.settings.redis.url).await {
        let _ = live::forget(&mut conn, &worker.settings.redis.prefix, &worker.id).await;
    }
}
