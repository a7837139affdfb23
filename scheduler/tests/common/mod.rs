//! A fresh, migrated PostgreSQL database per test, dropped afterwards.

#![allow(dead_code, clippy::unwrap_used)]

use chrono::Utc;
use sea_orm::{ActiveValue::Set, DatabaseConnection, EntityTrait};
use sieve_scheduler::db;
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::projects::Project;
use sieve_shared::settings::DatabaseSettings;
use uuid::Uuid;

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
            ..DatabaseSettings::default()
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

/// Insert item number `n` of `project` in `state` (its image is not stored:
/// for tests of the database side only).
pub async fn insert_item(
    db: &DatabaseConnection,
    project: &Project,
    n: usize,
    state: ItemState,
) -> Uuid {
    let id = Uuid::now_v7();
    let now = Utc::now().fixed_offset();
    item::Entity::insert(item::ActiveModel {
        id: Set(id),
        project_id: Set(project.id.as_uuid()),
        object_key: Set(format!("k/{n}")),
        source: Set(format!("img-{n}.png")),
        content_hash: Set(format!("{n:064x}")),
        size_bytes: Set(1),
        width: Set(Some(1)),
        height: Set(Some(1)),
        state: Set(state),
        attempts: Set(0),
        last_error: Set(None),
        dispatched_at: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec_without_returning(db)
    .await
    .unwrap();
    id
}
