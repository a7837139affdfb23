//! A project's model architecture: `small_cnn` (the default, and what every
//! project before this migration trained) or `mobilenet_v2` (a frozen
//! ImageNet backbone with trained heads). Every training run of a project
//! asks for its architecture, so the column is the one place it is chosen.
//!
//! Snapshots of a `mobilenet_v2` project look up each labeled item's newest
//! prediction with an embedding; that lookup is served by the existing
//! `UNIQUE (item_id, model_version_id)` index on `predictions`, so no new
//! index is needed.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261126_000013_project_arch"
    }
}

const UP: &str = r#"
ALTER TABLE projects ADD COLUMN model_arch text NOT NULL DEFAULT 'small_cnn'
    CONSTRAINT projects_model_arch_check CHECK (model_arch IN ('small_cnn', 'mobilenet_v2'));
"#;

const DOWN: &str = r#"
ALTER TABLE projects DROP COLUMN IF EXISTS model_arch;
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
