//! `sieve serve`: the HTTP API and the scheduler's loops in one process.
//!
//! [`serve`] runs the HTTP API, the result consumer, the training-event
//! consumer, the re-dispatch sweeper, automatic retrains and the training
//! watchdog (those three only while it holds the background lease, see
//! [`crate::lease`]) until its shutdown future resolves, then drains them. Nothing imports this module
//! but the CLI and tests: it is the top of the scheduler's graph.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sieve_shared::broker;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::{dispatch, http, lease, operate, routing, training};

/// How long HTTP-started ingests get to finish their batch and record
/// themselves at shutdown.
const INGEST_STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Run the HTTP API on `listener` and the result, training-event and
/// re-dispatch loops until `shutdown` resolves. In-flight batches finish and
/// are acknowledged before this returns; ingests started over HTTP stop
/// between batches and are recorded as interrupted.
///
/// With `http.metrics_bind` set, `/metrics` is served on a listener of its
/// own bound there (see [`serve_on`]).
pub async fn serve(
    ctx: Context,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = match ctx.settings.http.metrics_bind {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding http.metrics_bind {addr}"))?,
        ),
        None => None,
    };
    serve_on(ctx, listener, metrics, shutdown).await
}

/// [`serve`] with the API on `listener` and `/metrics` on `metrics`, bound
/// by the caller (`http.metrics_bind` must be set for the API port to stop
/// serving it).
pub async fn serve_on(
    ctx: Context,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Install the recorder before any work, so no count is lost before the
    // first scrape.
    sieve_shared::telemetry::prometheus();
    let stop = CancellationToken::new();
    let consume = Arc::new(broker::connect(&ctx.settings.broker, "sieve-scheduler consume").await?);

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(routing::results::run(
        ctx.clone(),
        consume.clone(),
        stop.clone(),
    ));
    tasks.spawn(training::run_events(
        ctx.clone(),
        consume.clone(),
        stop.clone(),
    ));
    tasks.spawn(operate::dead_notices::run(
        ctx.clone(),
        consume.clone(),
        stop.clone(),
    ));
    // The sweeper, automatic retrains and the watchdog run in one scheduler
    // at a time (two run during a rolling update): the one holding the
    // background lease.
    let (held_tx, held) = lease::channel();
    tasks.spawn(lease::keep(
        ctx.db.clone(),
        lease::holder_id(),
        held_tx,
        stop.clone(),
    ));
    tasks.spawn(dispatch::run_sweeper(
        ctx.clone(),
        Duration::from_secs(60),
        held.clone(),
        stop.clone(),
    ));
    tasks.spawn(training::auto_retrain::run(
        ctx.clone(),
        Duration::from_secs(10),
        held.clone(),
        stop.clone(),
    ));
    tasks.spawn(training::watchdog::run(ctx.clone(), held, stop.clone()));
    let router = http::router(ctx.clone());
    let http_stop = stop.clone();
    tasks.spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await
            .context("HTTP server")
    });
    if let Some(metrics) = metrics {
        let router = http::metrics_router(ctx.clone());
        let metrics_stop = stop.clone();
        tasks.spawn(async move {
            axum::serve(metrics, router)
                .with_graceful_shutdown(async move { metrics_stop.cancelled().await })
                .await
                .context("metrics HTTP server")
        });
    }

    tokio::select! {
        () = shutdown => tracing::info!("shutting down: draining consumers"),
        Some(ended) = tasks.join_next() => {
            // A loop ended on its own: that is a failure; stop the rest.
            stop.cancel();
            ctx.ingest_runs.shutdown(INGEST_STOP_DEADLINE).await;
            let reason = match ended {
                Ok(Ok(())) => anyhow::anyhow!("a scheduler loop stopped unexpectedly"),
                Ok(Err(err)) => err,
                Err(join) => anyhow::Error::new(join),
            };
            while tasks.join_next().await.is_some() {}
            return Err(reason);
        }
    }
    stop.cancel();
    ctx.ingest_runs.shutdown(INGEST_STOP_DEADLINE).await;
    let mut first_error = None;
    while let Some(ended) = tasks.join_next().await {
        if let Ok(Err(err)) = ended {
            first_error.get_or_insert(err);
        }
    }
    consume.close(200, "shutdown".into()).await.ok();
    first_error.map_or(Ok(()), Err)
}
