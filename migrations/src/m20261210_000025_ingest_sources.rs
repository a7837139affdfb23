//! The locations a project's scoped tokens may ingest from
//! (`ingest::sources`): `store:PREFIX/` and `s3://BUCKET/PREFIX/`, as
//! written. None until an administrator sets them.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261210_000025_ingest_sources"
    }
}

const UP: &str = r#"
ALTER TABLE projects ADD COLUMN ingest_sources text[] NOT NULL DEFAULT '{}';
"#;

const DOWN: &str = r#"
ALTER TABLE projects DROP COLUMN IF EXISTS ingest_sources;
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
