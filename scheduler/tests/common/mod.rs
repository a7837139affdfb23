//! A fresh, migrated PostgreSQL database per test, dropped afterwards.

#![allow(dead_code, clippy::unwrap_used)]

use sea_orm::DatabaseConnection;
use sieve_scheduler::db;
use sieve_shared::settings::DatabaseSettings;

pub struct TestDb {
    pub settings: DatabaseSettings,
    pub conn: DatabaseConnection,
}

impl TestDb {
    pub async fn new() -> Self {
        sieve_shared::telemetry::init_test_tracing();
        let id = uuid::Uuid::now_v7().simple().to_string();
        let settings = DatabaseSettings {
            url: format!(
                "postgres://postgres@127.0.0.1:5432/sieve_test_{}",
                &id[id.len() - 12..]
            ),
            max_connections: 20,
        };
        db::create_database_if_missing(&settings.url).await.unwrap();
        let conn = db::connect(&settings).await.unwrap();
        db::migrate(&conn).await.unwrap();
        Self { settings, conn }
    }

    pub async fn drop(self) {
        self.conn.close().await.unwrap();
        db::drop_database(&self.settings.url).await.unwrap();
    }
}
