//! The detector: detection projects run it, and its predictions carry boxes.
//!
//! `projects.model_arch` may be `detector` (a detection project's only
//! architecture, and never a classification project's). A detector's
//! prediction keeps the committee's answer for the image in
//! `predictions.detections`: the proposed objects (class, corners in pixels
//! of the original image, confidence, agreement, corner spread) and the
//! image's box scores, as `sieve_shared::box_scores::ImageScores`
//! serializes them. The scalar score columns hold the same answer's
//! summary (`ImageScores::as_scores`), which routing reads for either kind.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261213_000029_detector"
    }
}

const UP: &str = r#"
ALTER TABLE projects DROP CONSTRAINT projects_model_arch_check;
ALTER TABLE projects ADD CONSTRAINT projects_model_arch_check
    CHECK (model_arch IN ('small_cnn', 'mobilenet_v2', 'null', 'detector'));
-- Detection projects made before: they had no model, and now run the detector.
UPDATE projects SET model_arch = 'detector' WHERE task_kind = 'detection';
ALTER TABLE projects ADD CONSTRAINT projects_detection_runs_the_detector
    CHECK ((task_kind = 'detection') = (model_arch = 'detector'));

ALTER TABLE predictions ADD COLUMN detections jsonb;
ALTER TABLE predictions ADD CONSTRAINT predictions_detections_object
    CHECK (detections IS NULL OR jsonb_typeof(detections) = 'object');
"#;

const DOWN: &str = r#"
ALTER TABLE predictions DROP CONSTRAINT predictions_detections_object;
ALTER TABLE predictions DROP COLUMN detections;
ALTER TABLE projects DROP CONSTRAINT projects_detection_runs_the_detector;
UPDATE projects SET model_arch = 'small_cnn' WHERE model_arch = 'detector';
ALTER TABLE projects DROP CONSTRAINT projects_model_arch_check;
ALTER TABLE projects ADD CONSTRAINT projects_model_arch_check
    CHECK (model_arch IN ('small_cnn', 'mobilenet_v2', 'null'));
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
