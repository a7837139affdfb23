//! Dispatch control per project: pause, a publish rate limit, a priority.
//!
//! Kept beside `projects` rather than in it: a project without a row has
//! the defaults (running, unlimited, priority 0), so existing projects need
//! no backfill. A paused project's new items wait with `dispatched_at`
//! NULL, which is what resume and the sweeper look for.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261125_000002_dispatch_control"
    }
}

const UP: &str = r#"
CREATE TABLE project_dispatch (
    project_id uuid PRIMARY KEY REFERENCES projects (id) ON DELETE CASCADE,
    paused boolean NOT NULL DEFAULT false,
    -- Jobs per second; NULL: unlimited.
    rate_limit double precision CHECK (rate_limit IS NULL OR rate_limit > 0),
    -- 0 (default) to 9, higher first; AMQP's priority range.
    priority smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    updated_at timestamptz NOT NULL DEFAULT now()
);
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS project_dispatch;
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
