//! Project-scoped API tokens.
//!
//! A token may name one project: it then acts only on that project (its
//! review queue, tasks, items, policy, models); other projects answer 404 as
//! if they did not exist, and endpoints that span projects answer 403. A
//! token without a project acts on all, as before. Deleting a project
//! deletes the tokens scoped to it.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261125_000001_scoped_tokens"
    }
}

const UP: &str = r#"
ALTER TABLE api_tokens
    ADD COLUMN project_id uuid REFERENCES projects (id) ON DELETE CASCADE;
"#;

const DOWN: &str = r#"
ALTER TABLE api_tokens DROP COLUMN IF EXISTS project_id;
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
