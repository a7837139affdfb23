//! The worker process: connections, the loops it runs, and its drain.
//!
//! [`run`] starts the prediction and/or training consumers (by capability),
//! the control listener, the heartbeat and the health/metrics endpoint, and
//! runs them until its shutdown future resolves. `/healthz` answers 503 with
//! the reasons while a broker connection or a consumer is down (see
//! [`crate::health`]). On shutdown the consumers stop taking work, finish
//! and acknowledge what they hold, and return; what was prefetched but not
//! started goes back to the queue when the channel closes.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use sieve_shared::Settings;
use sieve_shared::broker::{self, Publisher};
use sieve_shared::store::Store;
use sieve_shared::topology::Topology;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cache::ModelCache;
use crate::context::{Capability, Stats, Worker, new_worker_id};
use crate::health::Health;
use crate::jobs::{prelabel, train};
use crate::{backend, control, heartbeat};

/// Run a worker until `shutdown` resolves, then drain.
pub async fn run(
    settings: Settings,
    capabilities: Vec<Capability>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !capabilities.is_empty(),
        "a worker needs at least one capability"
    );
    // Install the recorder before any work, so no count is lost before the
    // first scrape.
    sieve_shared::telemetry::prometheus();
    let topology = Topology::from_settings(&settings.broker);
    let id = new_worker_id();
    let publish_conn =
        broker::connect(&settings.broker, &format!("sieve-worker {id} publish")).await?;
    let consume_conn =
        Arc::new(broker::connect(&settings.broker, &format!("sieve-worker {id} consume")).await?);
    let channel = publish_conn.create_channel().await?;
    topology
        .declare(&channel)
        .await
        .context("declaring the RabbitMQ topology")?;
    channel.close(200, "declared".into()).await.ok();
    let publisher = Publisher::new(&publish_conn, topology).await?;
    // Not `open`: a worker must not create an empty store where the shared
    // one should be mounted.
    let store = Store::connect_existing(&settings.store, &settings.s3).await?;
    let mut consumers = vec!["control"];
    consumers.extend(capabilities.iter().map(|c| c.name()));
    let health = Health::new(
        vec![
            ("publish", publish_conn.status().clone()),
            ("consume", consume_conn.status().clone()),
        ],
        &consumers,
    );
    let worker = Arc::new(Worker {
        cache: ModelCache::new(store.clone(), settings.worker.model_cache),
        id,
        settings: Arc::new(settings),
        capabilities,
        store,
        publisher,
        stats: Stats::default(),
        started: Instant::now(),
        cancelled_runs: Default::default(),
        finished_runs: Default::default(),
        health,
    });
    tracing::info!(
        worker = %worker.id,
        backend = backend::backend_name(),
        capabilities = ?worker.capabilities.iter().map(|c| c.name()).collect::<Vec<_>>(),
        "sieve worker started"
    );

    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let (activations_tx, activations_rx) = tokio::sync::mpsc::channel(64);
    tasks.spawn(control::run(
        worker.clone(),
        consume_conn.clone(),
        activations_tx,
        stop.clone(),
    ));
    if worker.capabilities.contains(&Capability::Prelabel) {
        tasks.spawn(prelabel::run(
            worker.clone(),
            consume_conn.clone(),
            activations_rx,
            stop.clone(),
        ));
    }
    if worker.capabilities.contains(&Capability::Train) {
        tasks.spawn(train::run(
            worker.clone(),
            consume_conn.clone(),
            stop.clone(),
        ));
    }
    let beat_stop = stop.clone();
    let beat_worker = worker.clone();
    // The heartbeat is best-effort (Redis is optional): it never ends the worker.
    let heartbeat = tokio::spawn(async move { heartbeat::run(beat_worker, beat_stop).await });
    let http_stop = stop.clone();
    let health_worker = worker.clone();
    let router = Router::new()
        .route(
            "/healthz",
            get(move || async move {
                let report = health_worker.health.report();
                let status = if report.healthy() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (status, axum::Json(report))
            }),
        )
        .route(
            "/metrics",
            get(|| async { sieve_shared::telemetry::prometheus().render() }),
        );
    tasks.spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await
            .context("worker HTTP server")
    });

    let outcome = tokio::select! {
        () = shutdown => {
            tracing::info!(worker = %worker.id, "draining: finishing in-flight work");
            Ok(())
        }
        Some(ended) = tasks.join_next() => match ended {
            Ok(Ok(())) => Err(anyhow::anyhow!("a worker loop stopped unexpectedly")),
            Ok(Err(err)) => Err(err),
            Err(join) => Err(anyhow::Error::new(join)),
        },
    };
    stop.cancel();
    let deadline = Duration::from_secs(worker.settings.worker.drain_seconds);
    let drained = tokio::time::timeout(deadline, async {
        while let Some(ended) = tasks.join_next().await {
            if let Ok(Err(err)) = ended {
                tracing::warn!(
                    error = format!("{err:#}"),
                    "a loop ended with an error while draining"
                );
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?deadline,
            "drain deadline passed; unacknowledged work returns to the queue"
        );
        tasks.abort_all();
    }
    heartbeat.abort();
    heartbeat::remove(&worker).await;
    consume_conn.close(200, "drained".into()).await.ok();
    publish_conn.close(200, "drained".into()).await.ok();
    tracing::info!(worker = %worker.id, items = worker.stats.items.load(Ordering::Relaxed), "worker stopped");
    outcome
}
