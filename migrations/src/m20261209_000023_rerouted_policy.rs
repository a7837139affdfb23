//! The policy version through which a project's waiting items were last
//! re-routed. A policy change bumps `policy_version`; the re-route pass
//! (`routing::reroute`) brings this column up to it, and the background
//! sweep finds projects where it lags with one comparison per project.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261209_000023_rerouted_policy"
    }
}

const UP: &str = r#"
ALTER TABLE projects ADD COLUMN rerouted_policy_version integer;
UPDATE projects SET rerouted_policy_version = policy_version;
ALTER TABLE projects
    ALTER COLUMN rerouted_policy_version SET NOT NULL,
    ALTER COLUMN rerouted_policy_version SET DEFAULT 1;
"#;

const DOWN: &str = r#"
ALTER TABLE projects DROP COLUMN IF EXISTS rerouted_policy_version;
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
