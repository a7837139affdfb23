//! Who may not give a second opinion, by API token id: `not_for` keeps the
//! first reviewer's name (shown), and two tokens may share a name, so the
//! claim and the submit compare the token where the first label had one
//! (NULL: a label given without a token, from the CLI, or before this
//! migration; then the name is compared, as before).

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261206_000004_not_for_token"
    }
}

const UP: &str = r#"
ALTER TABLE review_tasks ADD COLUMN not_for_token uuid;
"#;

const DOWN: &str = r#"
ALTER TABLE review_tasks DROP COLUMN IF EXISTS not_for_token;
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
