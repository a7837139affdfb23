//! Box settings: a detection or deidentify project's tile size and proposal
//! threshold (`projects.box_settings`, `{}` for the defaults). Classification
//! projects keep `{}`: their input size is their architecture's.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261215_000031_box_settings"
    }
}

const UP: &str = r#"
ALTER TABLE projects ADD COLUMN box_settings jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE projects ADD CONSTRAINT projects_box_settings_is_an_object
    CHECK (jsonb_typeof(box_settings) = 'object');
ALTER TABLE projects ADD CONSTRAINT projects_box_settings_only_for_boxes
    CHECK (box_settings = '{}'::jsonb OR task_kind IN ('detection', 'deidentify'));
"#;

const DOWN: &str = r#"
ALTER TABLE projects DROP COLUMN box_settings;
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
