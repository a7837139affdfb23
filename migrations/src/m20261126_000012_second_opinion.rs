//! Second opinions: a label-error check on human labels.
//!
//! When a reviewer's label disagrees with a confident model (the policy's
//! `second_review_confidence`), the label is stored as usual and a second
//! review task (reason `second_opinion`) is opened for the item, which the
//! first reviewer may not take: `review_tasks.not_for` names them, and a
//! claim passes over the tasks that name its caller. The check itself is a
//! row of `second_opinions`: the label it questions, the model's class and
//! confidence, then the second reviewer's label and how it compares
//! (`outcome`, NULL while undecided).
//!
//! The foreign keys to `labels` have no `ON DELETE` action on purpose: undo
//! is the only thing that deletes a human label, and it must clear or remove
//! the row that refers to it first, so a forgotten step fails instead of
//! leaving an outcome without its label.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261126_000012_second_opinion"
    }
}

const UP: &str = r#"
ALTER TABLE review_tasks DROP CONSTRAINT review_tasks_reason_check;
ALTER TABLE review_tasks ADD CONSTRAINT review_tasks_reason_check
    CHECK (reason IN ('low_confidence', 'disagreement', 'audit', 'seed', 'sample', 'second_opinion'));
ALTER TABLE review_tasks ADD COLUMN not_for text;

CREATE TABLE second_opinions (
    task_id uuid PRIMARY KEY REFERENCES review_tasks (id) ON DELETE CASCADE,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    item_id uuid NOT NULL REFERENCES items (id) ON DELETE CASCADE,
    first_label_id uuid NOT NULL REFERENCES labels (id),
    first_reviewer text NOT NULL,
    first_class integer NOT NULL,
    prediction_id uuid REFERENCES predictions (id),
    model_class integer NOT NULL,
    model_confidence real NOT NULL,
    second_label_id uuid REFERENCES labels (id),
    second_reviewer text,
    second_class integer,
    outcome text CHECK (outcome IN ('agreed_with_first', 'agreed_with_model', 'neither')),
    created_at timestamptz NOT NULL DEFAULT now(),
    decided_at timestamptz,
    CHECK (first_class <> model_class),
    CHECK ((outcome IS NULL) = (second_label_id IS NULL))
);
CREATE INDEX second_opinions_project_outcome ON second_opinions (project_id, outcome);
CREATE INDEX second_opinions_first_label ON second_opinions (first_label_id);
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS second_opinions;
-- Their labels refer to them: keep the tasks, under a reason the old schema knows.
UPDATE review_tasks SET reason = 'low_confidence' WHERE reason = 'second_opinion';
ALTER TABLE review_tasks DROP COLUMN IF EXISTS not_for;
ALTER TABLE review_tasks DROP CONSTRAINT review_tasks_reason_check;
ALTER TABLE review_tasks ADD CONSTRAINT review_tasks_reason_check
    CHECK (reason IN ('low_confidence', 'disagreement', 'audit', 'seed', 'sample'));
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
