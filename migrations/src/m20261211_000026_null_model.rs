//! The `null` architecture: constant probabilities and no tensor work, for
//! measuring the machinery around the model (`sieve-tools bench ceiling`).
//! The API and the CLI create such a project only when asked for a
//! measurement-only one.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261211_000026_null_model"
    }
}

const UP: &str = r#"
ALTER TABLE projects DROP CONSTRAINT projects_model_arch_check;
ALTER TABLE projects ADD CONSTRAINT projects_model_arch_check
    CHECK (model_arch IN ('small_cnn', 'mobilenet_v2', 'null'));
"#;

const DOWN: &str = r#"
DELETE FROM projects WHERE model_arch = 'null';
ALTER TABLE projects DROP CONSTRAINT projects_model_arch_check;
ALTER TABLE projects ADD CONSTRAINT projects_model_arch_check
    CHECK (model_arch IN ('small_cnn', 'mobilenet_v2'));
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
