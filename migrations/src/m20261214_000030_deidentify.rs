//! De-identification: `projects.task_kind` may be `deidentify`, whose
//! projects run the `faces` architecture (MTCNN, pretrained) and no other.
//! Its labels and predictions are boxes, in the columns detection made
//! (`labels.boxes`, `predictions.detections`).

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261214_000030_deidentify"
    }
}

const UP: &str = r#"
ALTER TABLE projects DROP CONSTRAINT projects_task_kind_check;
ALTER TABLE projects ADD CONSTRAINT projects_task_kind_check
    CHECK (task_kind IN ('classification', 'detection', 'deidentify'));
ALTER TABLE projects DROP CONSTRAINT projects_model_arch_check;
ALTER TABLE projects ADD CONSTRAINT projects_model_arch_check
    CHECK (model_arch IN ('small_cnn', 'mobilenet_v2', 'null', 'detector', 'faces'));
ALTER TABLE projects ADD CONSTRAINT projects_deidentify_runs_the_face_detector
    CHECK ((task_kind = 'deidentify') = (model_arch = 'faces'));
"#;

const DOWN: &str = r#"
DELETE FROM projects WHERE task_kind = 'deidentify';
ALTER TABLE projects DROP CONSTRAINT projects_deidentify_runs_the_face_detector;
ALTER TABLE projects DROP CONSTRAINT projects_model_arch_check;
ALTER TABLE projects ADD CONSTRAINT projects_model_arch_check
    CHECK (model_arch IN ('small_cnn', 'mobilenet_v2', 'null', 'detector'));
ALTER TABLE projects DROP CONSTRAINT projects_task_kind_check;
ALTER TABLE projects ADD CONSTRAINT projects_task_kind_check
    CHECK (task_kind IN ('classification', 'detection'));
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
