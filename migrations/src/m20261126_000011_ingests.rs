//! Ingests started over HTTP, with their progress.
//!
//! The scheduler writes the counts every few seconds while an ingest runs
//! (`heartbeat_at` with them), so progress survives a restart of the
//! scheduler: a row still `running` whose heartbeat stopped belongs to a
//! process that died and reads as interrupted. Running the same ingest
//! again is safe (one item per project and content hash).

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261126_000011_ingests"
    }
}

const UP: &str = r#"
CREATE TABLE ingests (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    -- What was asked for, as given: `store:PREFIX`, `s3://BUCKET/PREFIX`,
    -- `manifest store:KEY`.
    source text NOT NULL,
    requested_by text NOT NULL,
    state text NOT NULL DEFAULT 'running'
        CHECK (state IN ('running', 'done', 'failed', 'interrupted')),
    files_seen bigint NOT NULL DEFAULT 0,
    new_items bigint NOT NULL DEFAULT 0,
    duplicates bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    dispatched bigint NOT NULL DEFAULT 0,
    imported_labels bigint NOT NULL DEFAULT 0,
    -- The first failures, each {path, line, reason}; `failed` counts all.
    failures jsonb NOT NULL DEFAULT '[]',
    -- Why the ingest as a whole stopped (state failed or interrupted).
    error text,
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX ingests_by_project ON ingests (project_id, created_at DESC);
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS ingests;
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
