//! Snapshot retention: when a finished run's snapshot (its examples, and
//! the embedding table of a heads run) was removed from the store, past
//! `training.snapshot_retention_hours`. The row stays: it is the history.
//! The partial index finds the runs still holding a snapshot without
//! reading the others.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261208_000022_snapshot_retention"
    }
}

const UP: &str = r#"
ALTER TABLE training_runs ADD COLUMN snapshot_removed_at timestamptz;
CREATE INDEX training_runs_snapshot_kept ON training_runs (finished_at)
    WHERE snapshot_removed_at IS NULL AND finished_at IS NOT NULL;
"#;

const DOWN: &str = r#"
DROP INDEX IF EXISTS training_runs_snapshot_kept;
ALTER TABLE training_runs DROP COLUMN IF EXISTS snapshot_removed_at;
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
