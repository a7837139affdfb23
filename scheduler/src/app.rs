//! The scheduler's shared handles, and `sieve serve`.
//!
//! [`Context`] is what every operation needs (database, publisher, object
//! store, settings); the CLI builds one per command, the server one per
//! process. [`serve`] runs the HTTP API and the consumers until its shutdown
//! future resolves, then drains them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lapin::Connection;
use sea_orm::DatabaseConnection;
use sieve_shared::Settings;
use sieve_shared::broker::{self, Publisher};
use sieve_shared::store::Store;
use sieve_shared::topology::Topology;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{db, dispatch, http, ingest_runs, results, training};

#[derive(Clone)]
pub struct Context {
    pub db: DatabaseConnection,
    /// A small pool of its own for review claims (`db::connect_claims`).
    pub claims: DatabaseConnection,
    pub publisher: Publisher,
    pub store: Store,
    pub settings: Arc<Settings>,
    /// The publishing connection (also for short-lived channels: passive
    /// declares, dead-letter reads).
    pub connection: Arc<Connection>,
    /// Ingests started over HTTP, running in this process.
    pub ingest_runs: ingest_runs::Runner,
}

impl Context {
    /// Connect to PostgreSQL and RabbitMQ, declare the topology, open the
    /// object store. Each failure names the service and address.
    pub async fn connect(settings: Settings) -> anyhow::Result<Self> {
        let db = db::connect(&settings.database).await?;
        let claims = db::connect_claims(&settings.database).await?;
        let connection = broker::connect(&settings.broker.url, "sieve-scheduler publish").await?;
        let topology = topology(&settings);
        let channel = connection.create_channel().await?;
        topology
            .declare(&channel)
            .await
            .context("declaring the RabbitMQ topology")?;
        channel.close(200, "declared".into()).await.ok();
        let publisher = Publisher::new(&connection, topology).await?;
        let store = Store::open(&settings.store)?;
        Ok(Self {
            db,
            claims,
            publisher,
            store,
            settings: Arc::new(settings),
            connection: Arc::new(connection),
            ingest_runs: ingest_runs::Runner::default(),
        })
    }

    pub fn topology(&self) -> &Topology {
        self.publisher.topology()
    }
}

/// How long HTTP-started ingests get to finish their batch and record
/// themselves at shutdown.
const INGEST_STOP_DEADLINE: Duration = Duration::from_secs(10);

pub fn topology(settings: &Settings) -> Topology {
    Topology::from_settings(&settings.broker)
}

/// Run the HTTP API on `listener` and the result, training-event and
/// re-dispatch loops until `shutdown` resolves. In-flight batches finish and
/// are acknowledged before this returns; ingests started over HTTP stop
/// between batches and are recorded as interrupted.
pub async fn serve(
    ctx: Context,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Install the recorder before any work, so no count is lost before the
    // first scrape.
    sieve_shared::telemetry::prometheus();
    let stop = CancellationToken::new();
    let consume =
        Arc::new(broker::connect(&ctx.settings.broker.url, "sieve-scheduler consume").await?);

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(results::run(ctx.clone(), consume.clone(), stop.clone()));
    tasks.spawn(training::run_events(
        ctx.clone(),
        consume.clone(),
        stop.clone(),
    ));
    tasks.spawn(dispatch::run_sweeper(
        ctx.clone(),
        Duration::from_secs(60),
        stop.clone(),
    ));
    tasks.spawn(crate::auto_retrain::run(
        ctx.clone(),
        Duration::from_secs(10),
        stop.clone(),
    ));
    let router = http::router(ctx.clone());
    let http_stop = stop.clone();
    tasks.spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await
            .context("HTTP server")
    });

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
