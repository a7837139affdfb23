//! The `sample` review reason.
//!
//! Items in a project's audit sample always reach a human; those the policy
//! would not have labeled by machine anyway are `sample` tasks (the others
//! stay `audit`). Both are random picks, the only unbiased evidence for
//! calibration.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261126_000001_sample_reason"
    }
}

const UP: &str = r#"
ALTER TABLE review_tasks DROP CONSTRAINT review_tasks_reason_check;
ALTER TABLE review_tasks ADD CONSTRAINT review_tasks_reason_check
    CHECK (reason IN ('low_confidence', 'disagreement', 'audit', 'seed', 'sample'));
"#;

// Sample tasks become plain low-confidence ones: nothing is deleted.
const DOWN: &str = r#"
UPDATE review_tasks SET reason = 'low_confidence' WHERE reason = 'sample';
ALTER TABLE review_tasks DROP CONSTRAINT review_tasks_reason_check;
ALTER TABLE review_tasks ADD CONSTRAINT review_tasks_reason_check
    CHECK (reason IN ('low_confidence', 'disagreement', 'audit', 'seed'));
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
