//! Work that must run in one scheduler at a time (the re-dispatch sweeper,
//! automatic retrains, the training watchdog) is done by whichever `sieve
//! serve` holds a lease named for it: a row renewed while its holder lives,
//! taken over once it expires. Two schedulers run at once during a rolling
//! update; both serve the API and consume results (keyed, so applied once).

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261206_000002_scheduler_leases"
    }
}

const UP: &str = r#"
CREATE TABLE scheduler_leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    expires_at timestamptz NOT NULL
);
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS scheduler_leases;
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
