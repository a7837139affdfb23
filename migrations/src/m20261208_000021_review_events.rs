//! Who skipped and who undid what, and an index for per-reviewer figures.
//!
//! A task keeps only its skip count and its *last* skip (`last_skipped_by`,
//! a name), and undo deletes the label it takes back, so neither says how
//! often one reviewer skipped or undid. `review_events` keeps one row per
//! skip and per undo, with the reviewer's name and API token id (NULL for
//! the CLI, which acts under a name without a token), written in the same
//! statement or transaction as the step itself. It starts empty: skips and
//! undos from before this migration are not counted anywhere.
//!
//! `review_tasks_done` finds a project's submitted tasks by when they were
//! closed (a submit writes the task's `closed_at` and its label's
//! `created_at` from the same instant), which is what the per-reviewer
//! figures (`operate::reviewers`) read at every `/metrics` scrape. It is
//! partial: a claim, release or skip never writes a `done` row, so the
//! claim path pays nothing for it.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261208_000021_review_events"
    }
}

const UP: &str = r#"
CREATE TABLE review_events (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    task_id uuid NOT NULL REFERENCES review_tasks (id) ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('skip', 'undo')),
    reviewer text NOT NULL,
    reviewer_token uuid,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX review_events_project ON review_events (project_id, created_at);
CREATE INDEX review_tasks_done ON review_tasks (project_id, closed_at) WHERE state = 'done';
"#;

const DOWN: &str = r#"
DROP INDEX IF EXISTS review_tasks_done;
DROP TABLE IF EXISTS review_events;
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
