//! What one test owns on the shared services, and its removal.
//!
//! Every name carries the same random tag: database `sieve_test_TAG`,
//! RabbitMQ prefix and Redis prefix `test-TAG`, and a temporary store
//! directory, so tests run side by side in one process and never see each
//! other. Removal happens in `Drop`, so a test that panics half-way cleans
//! up too; it runs on a thread of its own with its own runtime, because
//! `Drop` cannot await and the test's runtime may be the one unwinding.

use std::net::SocketAddr;

use sea_orm::DatabaseConnection;
use sieve_scheduler::context;
use sieve_scheduler::db;
use sieve_shared::Settings;
use uuid::Uuid;

pub struct Sandbox {
    /// Settings that point at this sandbox only (and bind HTTP on port 0).
    pub settings: Settings,
    /// A pool on the sandbox's database, migrated.
    pub db: DatabaseConnection,
    /// The object-store directory (`settings.store.root`).
    pub store: tempfile::TempDir,
    removal: Removal,
}

/// Removes what a sandbox's settings name on the services when dropped;
/// made before anything is created, so a failed setup step leaks nothing.
struct Removal {
    settings: Settings,
    tag: String,
}

impl Sandbox {
    /// Fresh names, settings changed by `configure`, then the database
    /// created and migrated.
    pub async fn start(configure: impl FnOnce(&mut Settings)) -> Self {
        sieve_shared::telemetry::init_test_tracing();
        let store = tempfile::tempdir().unwrap();
        let id = Uuid::now_v7().simple().to_string();
        let tag = id[id.len() - 12..].to_owned();
        let mut settings = Settings::default();
        settings.database.url = format!("postgres://postgres@127.0.0.1:5432/sieve_test_{tag}");
        settings.database.max_connections = 5;
        settings.broker.prefix = format!("test-{tag}");
        settings.redis.prefix = format!("test-{tag}");
        settings.store.root = store.path().to_owned();
        settings.http.bind = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.http.worker_bind = SocketAddr::from(([127, 0, 0, 1], 0));
        configure(&mut settings);
        let removal = Removal {
            settings: settings.clone(),
            tag,
        };
        db::create_database_if_missing(&settings.database.url)
            .await
            .unwrap();
        let db = db::connect(&settings.database).await.unwrap();
        db::migrate(&db).await.unwrap();
        Self {
            settings,
            db,
            store,
            removal,
        }
    }

    /// The random part of every name.
    pub fn tag(&self) -> &str {
        &self.removal.tag
    }
}

impl Drop for Removal {
    fn drop(&mut self) {
        let settings = self.settings.clone();
        let outcome = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(remove(&settings))
        })
        .join();
        let error = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "the cleanup thread panicked".to_owned(),
        };
        // A second panic while unwinding would abort the whole binary.
        if std::thread::panicking() {
            eprintln!("sandbox {}: cleanup failed: {error}", self.tag);
        } else {
            panic!("sandbox {}: cleanup failed: {error}", self.tag);
        }
    }
}

/// Delete the sandbox's queues and exchanges, its Redis keys and its
/// database (`WITH (FORCE)`: pools still open in the test do not stop it).
async fn remove(settings: &Settings) -> anyhow::Result<()> {
    let broker = sieve_shared::broker::connect(&settings.broker, "test cleanup").await?;
    let channel = broker.create_channel().await?;
    context::topology(settings).delete(&channel).await?;
    broker.close(200, "cleaned up".into()).await.ok();

    let mut redis = sieve_shared::live::connect(&settings.redis.url).await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", settings.redis.prefix))
        .query_async(&mut redis)
        .await?;
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(&keys)
            .query_async::<()>(&mut redis)
            .await?;
    }

    db::drop_database(&settings.database.url).await
}

#[cfg(test)]
mod tests {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;
    use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
    use sieve_scheduler::context::Context;

    use super::*;

    /// What a test made on the services is gone after it panicked: its
    /// database, its queues, its Redis keys and its store.
    #[tokio::test]
    async fn a_test_that_panics_leaves_nothing_behind() {
        let (made, what) = tokio::sync::oneshot::channel();
        let test = tokio::spawn(async move {
            let sandbox = Sandbox::start(|_| {}).await;
            let ctx = Context::connect(sandbox.settings.clone()).await.unwrap();
            let mut redis = sieve_shared::live::connect(&sandbox.settings.redis.url)
                .await
                .unwrap();
            let key = format!("{}:probe", sandbox.settings.redis.prefix);
            redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .query_async::<()>(&mut redis)
                .await
                .unwrap();
            made.send((
                sandbox.settings.clone(),
                ctx.topology().prelabel_queue(),
                key,
            ))
            .unwrap();
            panic!("a failing test");
        });
        assert!(test.await.unwrap_err().is_panic());
        let (settings, queue, key) = what.await.unwrap();

        let admin = Database::connect("postgres://postgres@127.0.0.1:5432/postgres")
            .await
            .unwrap();
        let name = settings.database.url.rsplit('/').next().unwrap().to_owned();
        let database = admin
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT 1 FROM pg_database WHERE datname = $1",
                [name.into()],
            ))
            .await
            .unwrap();
        assert!(database.is_none(), "the database was dropped");
        admin.close().await.ok();

        let broker = sieve_shared::broker::connect(&settings.broker, "kit test")
            .await
            .unwrap();
        let channel = broker.create_channel().await.unwrap();
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        assert!(declared.is_err(), "the queues were deleted");
        broker.close(200, "bye".into()).await.ok();

        let mut redis = sieve_shared::live::connect(&settings.redis.url)
            .await
            .unwrap();
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(!exists, "the Redis keys were deleted");
        assert!(!settings.store.root.exists(), "the store was removed");
    }
}
