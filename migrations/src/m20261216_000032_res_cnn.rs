//! A classification project may train `res_cnn`: the small CNN with two
//! residual blocks and BatchNorm (#28).

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261216_000032_res_cnn"
    }
}

const UP: &str = r#"
ALTER TABLE projects DROP CONSTRAINT projects_model_arch_check;
ALTER TABLE projects ADD CONSTRAINT projects_model_arch_check
    CHECK (model_arch IN ('small_cnn', 'res_cnn', 'mobilenet_v2', 'null', 'detector', 'faces'));
"#;

// Refused while a project trains `res_cnn`: its versions' weights fit no
// other architecture, so there is nothing to turn it into.
const DOWN: &str = r#"
ALTER TABLE projects DROP CONSTRAINT projects_model_arch_check;
ALTER TABLE projects ADD CONSTRAINT projects_model_arch_check
    CHECK (model_arch IN ('small_cnn', 'mobilenet_v2', 'null', 'detector', 'faces'));
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
