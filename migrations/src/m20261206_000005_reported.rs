//! Reports: a label someone spotted as wrong, sent back to review.
//!
//! `POST /items/{id}/reopen` opens a review task with the reason `reported`
//! and records the report as a row of `reports`: the label it questions
//! (its source and class), who reported it and why, whether it was forced
//! (a label by people). The label that closes the task decides it:
//! `confirmed` (the same class) or `corrected`. Reported outcomes are
//! counted apart from audits: people report what looks wrong, so they are
//! not a random sample and never enter the audited accuracy or calibration.
//!
//! `corrected_label_id` has no `ON DELETE` action, as in `second_opinions`:
//! undo clears the outcome before it deletes the label.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261206_000005_reported"
    }
}

const UP: &str = r#"
ALTER TABLE review_tasks DROP CONSTRAINT review_tasks_reason_check;
ALTER TABLE review_tasks ADD CONSTRAINT review_tasks_reason_check
    CHECK (reason IN ('low_confidence', 'disagreement', 'audit', 'seed', 'sample', 'second_opinion',
                      'reported'));

CREATE TABLE reports (
    task_id uuid PRIMARY KEY REFERENCES review_tasks (id) ON DELETE CASCADE,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    item_id uuid NOT NULL REFERENCES items (id) ON DELETE CASCADE,
    reported_label_id uuid NOT NULL REFERENCES labels (id),
    reported_source text NOT NULL CHECK (reported_source IN ('human', 'machine', 'import')),
    reported_class integer NOT NULL,
    reason text NOT NULL,
    reported_by text NOT NULL,
    reported_by_token uuid,
    forced boolean NOT NULL DEFAULT false,
    corrected_label_id uuid REFERENCES labels (id),
    corrected_class integer,
    outcome text CHECK (outcome IN ('confirmed', 'corrected')),
    created_at timestamptz NOT NULL DEFAULT now(),
    decided_at timestamptz,
    CHECK ((outcome IS NULL) = (corrected_label_id IS NULL))
);
CREATE INDEX reports_project_outcome ON reports (project_id, outcome);
CREATE INDEX reports_item ON reports (item_id);
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS reports;
-- Their labels refer to them: keep the tasks, under a reason the old schema knows.
UPDATE review_tasks SET reason = 'low_confidence' WHERE reason = 'reported';
ALTER TABLE review_tasks DROP CONSTRAINT review_tasks_reason_check;
ALTER TABLE review_tasks ADD CONSTRAINT review_tasks_reason_check
    CHECK (reason IN ('low_confidence', 'disagreement', 'audit', 'seed', 'sample', 'second_opinion'));
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
