//! An index on `review_tasks.item_id` for every task, not only the open ones.
//!
//! Routing looks up an item's open task by `item_id` and `state IN (...)`
//! with the states as parameters. Once PostgreSQL caches a generic plan for
//! that prepared statement it cannot prove the partial unique index's
//! `state IN ('open', 'claimed')` from parameters, and scanned the whole
//! table for every result: routing slowed down in step with the number of
//! review tasks (from 550 to 100 results a second over 100,000 items in
//! `sieve-tools bench ceiling`). The cascade from a deleted item needs the
//! index too.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261211_000027_review_task_item_index"
    }
}

const UP: &str = r#"
CREATE INDEX IF NOT EXISTS review_tasks_item ON review_tasks (item_id);
"#;

const DOWN: &str = r#"
DROP INDEX IF EXISTS review_tasks_item;
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared(UP).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared(DOWN).await?;
        Ok(())
    }
}
