//! A whole sieve on the real services, isolated per test: its own
//! PostgreSQL database, its own RabbitMQ queue prefix, its own Redis key
//! prefix and object-store directory, HTTP on port 0. Tests can run side by
//! side; teardown removes the database and the queues.

#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use sieve_scheduler::app::{self, Context};
use sieve_scheduler::db;
use sieve_shared::Settings;
use sieve_worker::service::{self, Capability};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TestSieve {
    pub settings: Settings,
    pub ctx: Context,
    pub api: String,
    pub http: reqwest::Client,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    _store: tempfile::TempDir,
}

pub fn test_settings(store: &Path) -> Settings {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let tag = &id[id.len() - 12..];
    let mut s = Settings::default();
    s.database.url = format!("postgres://postgres@127.0.0.1:5432/sieve_test_{tag}");
    s.database.max_connections = 5;
    s.broker.prefix = format!("test-{tag}");
    s.redis.prefix = format!("test-{tag}");
    s.store.root = store.to_owned();
    s.http.bind = SocketAddr::from(([127, 0, 0, 1], 0));
    s.http.worker_bind = SocketAddr::from(([127, 0, 0, 1], 0));
    s.worker.batch_size = 16;
    s.worker.batch_timeout_ms = 20;
    s.worker.heartbeat_seconds = 1;
    s.worker.drain_seconds = 20;
    // Tests label a handful of items; they opt into the per-class minimum.
    s.training.min_labels_per_class = 0;
    s
}

impl TestSieve {
    /// Migrate a fresh database and start one scheduler and one worker.
    pub async fn start() -> Self {
        Self::start_with(vec![Capability::Prelabel, Capability::Train]).await
    }

    /// Like [`TestSieve::start`], with a worker of the given capabilities.
    pub async fn start_with(capabilities: Vec<Capability>) -> Self {
        sieve_shared::telemetry::init_test_tracing();
        let store = tempfile::tempdir().unwrap();
        let mut settings = test_settings(store.path());
        db::create_database_if_missing(&settings.database.url)
            .await
            .unwrap();
        let conn = db::connect(&settings.database).await.unwrap();
        db::migrate(&conn).await.unwrap();
        conn.close().await.unwrap();

        let listener = TcpListener::bind(settings.http.bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        settings.http.api_url = format!("http://{addr}");
        let ctx = Context::connect(settings.clone()).await.unwrap();
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let s = stop.clone();
        tasks.push(tokio::spawn(app::serve(
            ctx.clone(),
            listener,
            async move { s.cancelled().await },
        )));
        let mut sieve = Self {
            api: format!("http://{addr}"),
            settings,
            ctx,
            http: reqwest::Client::new(),
            stop,
            tasks,
            _store: store,
        };
        sieve.spawn_worker(capabilities).await;
        sieve
    }

    pub async fn spawn_worker(&mut self, capabilities: Vec<Capability>) {
        let listener = TcpListener::bind(self.settings.http.worker_bind)
            .await
            .unwrap();
        let s = self.stop.clone();
        self.tasks.push(tokio::spawn(service::run(
            self.settings.clone(),
            capabilities,
            listener,
            async move { s.cancelled().await },
        )));
    }

    /// Stop everything (draining), then remove the database and the queues.
    pub async fn teardown(self) {
        self.stop.cancel();
        for task in self.tasks {
            task.await.unwrap().unwrap();
        }
        let conn = sieve_shared::broker::connect(&self.settings.broker.url, "test teardown")
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        app::topology(&self.settings)
            .delete(&channel)
            .await
            .unwrap();
        conn.close(200, "bye".into()).await.ok();
        self.ctx.db.clone().close().await.ok();
        db::drop_database(&self.settings.database.url)
            .await
            .unwrap();
    }
}

/// Poll `check` until it returns `Some`, or fail after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Fashion-MNIST project with `policy`, once its first (untrained) model
/// is active.
pub async fn fashion_project(
    sieve: &TestSieve,
    name: &str,
    policy: sieve_scheduler::policy::Policy,
) -> sieve_scheduler::projects::Project {
    use sieve_scheduler::fashion_mnist;
    use sieve_scheduler::projects::{self, ClassNames, ProjectName};
    let classes: Vec<String> = fashion_mnist::CLASSES
        .iter()
        .map(|c| c.to_string())
        .collect();
    projects::create_with_first_model(
        &sieve.ctx,
        &ProjectName::parse(name).unwrap(),
        &ClassNames::parse(&classes).unwrap(),
        &policy,
        "test",
    )
    .await
    .unwrap();
    eventually("the first model", Duration::from_secs(120), || async {
        projects::get(&sieve.ctx.db, name)
            .await
            .ok()
            .filter(|p| p.active_model_version_id.is_some())
    })
    .await
}

/// The first `n` images of a Fashion-MNIST split as PNG files in a fresh
/// directory, with the data set (for the ground truth).
pub fn fashion_images(
    split: sieve_scheduler::fashion_mnist::Split,
    n: usize,
) -> (tempfile::TempDir, sieve_scheduler::fashion_mnist::Dataset) {
    use sieve_scheduler::fashion_mnist;
    let dir = tempfile::tempdir().unwrap();
    let data = fashion_mnist::load(Path::new(fashion_mnist::DEFAULT_DIR), split, Some(n)).expect(
        "Fashion-MNIST is installed by ops/install-deps.sh (apt-get install dataset-fashion-mnist)",
    );
    fashion_mnist::export_png(&data, split, n, dir.path()).unwrap();
    (dir, data)
}
