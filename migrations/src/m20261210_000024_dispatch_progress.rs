//! How far each project's prediction jobs have come back: the latest
//! `dispatched_at` among the items whose results were applied. The
//! prediction queue is first in, first out, so a job published well before
//! one that has come back is not waiting in it; it is lost. The sweeper
//! compares a project's waiting items with the latest of these marks, so
//! a busy project's backlog does not hold up recovery for a quiet one
//! (`dispatch::sweep_once`). One row per project, written by the result
//! consumer in the transaction that applies a batch. No foreign key: its
//! check would lock the project's row, which activations and ingests lock
//! too, and result batches must not wait on them for a mark.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261210_000024_dispatch_progress"
    }
}

const UP: &str = r#"
CREATE TABLE dispatch_progress (
    project_id uuid PRIMARY KEY,
    returned_through timestamptz NOT NULL
);
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS dispatch_progress;
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
