//! Skips on review tasks.
//!
//! A reviewer may skip a task with a reason; the task goes back to the queue
//! behind every task skipped fewer times. The count and the last skip are
//! kept on the task itself (no history table: the newest reason is what the
//! next reviewer and the ML team need), and the queue index leads with the
//! count so a claim still reads the index in order.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261125_000003_review"
    }
}

const UP: &str = r#"
ALTER TABLE review_tasks
    ADD COLUMN skip_count integer NOT NULL DEFAULT 0 CHECK (skip_count >= 0),
    ADD COLUMN last_skip_reason text,
    ADD COLUMN last_skipped_by text,
    ADD COLUMN last_skipped_at timestamptz;
CREATE INDEX review_tasks_queue_by_skips
    ON review_tasks (project_id, skip_count, priority DESC, created_at)
    WHERE state IN ('open', 'claimed');
"#;

const DOWN: &str = r#"
DROP INDEX IF EXISTS review_tasks_queue_by_skips;
ALTER TABLE review_tasks
    DROP COLUMN IF EXISTS skip_count,
    DROP COLUMN IF EXISTS last_skip_reason,
    DROP COLUMN IF EXISTS last_skipped_by,
    DROP COLUMN IF EXISTS last_skipped_at;
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
