//! Detection: a project's labels may be a set of boxes instead of a class.
//!
//! One label table for every kind: a label is either a class
//! (`class_index`) or boxes (`boxes`, a JSON array of
//! `{"class", "x_min", "y_min", "x_max", "y_max"}` in pixels of the
//! original image), never both and never neither. The shape of each box is
//! checked where the label is made (`sieve_shared::boxes`); the table keeps
//! the invariant a bad writer could break: exactly one payload, and boxes
//! always an array.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261212_000028_detection"
    }
}

const UP: &str = r#"
ALTER TABLE projects DROP CONSTRAINT projects_task_kind_check;
ALTER TABLE projects ADD CONSTRAINT projects_task_kind_check
    CHECK (task_kind IN ('classification', 'detection'));

ALTER TABLE labels ALTER COLUMN class_index DROP NOT NULL;
ALTER TABLE labels ADD COLUMN boxes jsonb;
ALTER TABLE labels ADD CONSTRAINT labels_one_payload
    CHECK ((class_index IS NULL) <> (boxes IS NULL));
ALTER TABLE labels ADD CONSTRAINT labels_boxes_array
    CHECK (boxes IS NULL OR jsonb_typeof(boxes) = 'array');
"#;

const DOWN: &str = r#"
DELETE FROM projects WHERE task_kind = 'detection';
ALTER TABLE labels DROP CONSTRAINT labels_boxes_array;
ALTER TABLE labels DROP CONSTRAINT labels_one_payload;
DELETE FROM labels WHERE class_index IS NULL;
ALTER TABLE labels DROP COLUMN boxes;
ALTER TABLE labels ALTER COLUMN class_index SET NOT NULL;
ALTER TABLE projects DROP CONSTRAINT projects_task_kind_check;
ALTER TABLE projects ADD CONSTRAINT projects_task_kind_check
    CHECK (task_kind IN ('classification'));
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
