//! Who holds a review claim, by API token id. `lease_holder` keeps the
//! name that is shown; two tokens may share a name, so the claim's steps
//! (submit, renew, skip, release, undo) compare the token's id as well.
//! NULL for a claim made without a token (the CLI, which acts with the
//! database's authority under a name), and for every claim made before this
//! migration: such a claim is held only by a caller without a token, so an
//! HTTP reviewer holding one across the upgrade claims again.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261201_000001_lease_holder_token"
    }
}

const UP: &str = r#"
ALTER TABLE review_tasks ADD COLUMN lease_holder_token uuid;
"#;

const DOWN: &str = r#"
ALTER TABLE review_tasks DROP COLUMN IF EXISTS lease_holder_token;
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
