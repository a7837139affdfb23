//! The scheduler's shared handles.
//!
//! [`Context`] is what every operation needs (database, publisher, object
//! store, settings); the CLI builds one per command, `sieve serve` one per
//! process. It depends on nothing above the
//! database module, so every stage can take it without a circle back to the
//! code that starts them all.

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
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::db;

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
    pub ingest_runs: Background,
}

impl Context {
    /// Connect to PostgreSQL and RabbitMQ, declare the topology, open the
    /// object store. Each failure names the service and address.
    pub async fn connect(settings: Settings) -> anyhow::Result<Self> {
        let db = db::connect(&settings.database).await?;
        let claims = db::connect_claims(&settings.database).await?;
        let connection = broker::connect(&settings.broker, "sieve-scheduler publish").await?;
        let topology = topology(&settings);
        let channel = connection.create_channel().await?;
        topology
            .declare(&channel)
            .await
            .context("declaring the RabbitMQ topology")?;
        channel.close(200, "declared".into()).await.ok();
        let publisher = Publisher::new(&connection, topology).await?;
        let store = Store::connect(&settings.store, &settings.s3).await?;
        Ok(Self {
            db,
            claims,
            publisher,
            store,
            settings: Arc::new(settings),
            connection: Arc::new(connection),
            ingest_runs: Background::default(),
        })
    }

    pub fn topology(&self) -> &Topology {
        self.publisher.topology()
    }
}

pub fn topology(settings: &Settings) -> Topology {
    Topology::from_settings(&settings.broker)
}

/// Work a request started that outlives it (ingests over HTTP): each task
/// takes a child of one stop token and is tracked, so the server stops them
/// together between batches at shutdown and waits for them to record where
/// they stopped.
#[derive(Clone, Debug, Default)]
pub struct Background {
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Background {
    /// Run `task` in the background; it is handed a token that is cancelled
    /// at shutdown.
    pub fn spawn<F>(&self, task: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task(self.stop.child_token()));
    }

    /// Stop every task and wait, up to `deadline`, until each has ended.
    pub async fn shutdown(&self, deadline: Duration) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "background work still running at shutdown; ingests among it stop their heartbeat, so they read as interrupted"
            );
        }
    }
}
