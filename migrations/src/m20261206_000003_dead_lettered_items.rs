//! An item whose job was dead-lettered (retries used up, the delivery limit
//! reached by crash loops) is marked, with why: the sweeper and rescores
//! leave it alone until someone acts (`sieve failed retry` clears it).

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261206_000003_dead_lettered_items"
    }
}

const UP: &str = r#"
ALTER TABLE items ADD COLUMN dead_lettered_at timestamptz,
                  ADD COLUMN dead_letter_reason text;
"#;

const DOWN: &str = r#"
ALTER TABLE items DROP COLUMN IF EXISTS dead_lettered_at,
                  DROP COLUMN IF EXISTS dead_letter_reason;
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
