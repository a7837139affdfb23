//! What a project looks like right now: items by state, the review backlog,
//! labels by source, the active model.

use std::collections::BTreeMap;

use sea_orm::{FromQueryResult, Statement};
use serde::Serialize;

use crate::app::Context;
use crate::error::AppResult;
use crate::projects::Project;

#[derive(Clone, Debug, Serialize)]
pub struct ProjectStatus {
    pub project: Project,
    pub items: BTreeMap<String, i64>,
    pub total_items: i64,
    pub review_open: i64,
    pub review_claimed: i64,
    /// Items whose current label is by a machine / a human.
    pub machine_labeled: i64,
    pub human_labeled: i64,
    pub active_model_version: Option<i32>,
}

#[derive(FromQueryResult)]
struct Count {
    key: String,
    n: i64,
}

async fn counts(ctx: &Context, sql: &str, project: &Project) -> AppResult<BTreeMap<String, i64>> {
    let rows = Count::find_by_statement(Statement::from_sql_and_values(
        ctx.db.get_database_backend(),
        sql,
        [project.id.as_uuid().into()],
    ))
    .all(&ctx.db)
    .await?;
    Ok(rows.into_iter().map(|c| (c.key, c.n)).collect())
}

pub async fn project_status(ctx: &Context, project: &Project) -> AppResult<ProjectStatus> {
    let items = counts(
        ctx,
        "SELECT state AS key, count(*) AS n FROM items WHERE project_id = $1 GROUP BY state",
        project,
    )
    .await?;
    let tasks = counts(
        ctx,
        "SELECT state AS key, count(*) AS n FROM review_tasks WHERE project_id = $1 GROUP BY state",
        project,
    )
    .await?;
    let versions = counts(
        ctx,
        "SELECT 'active' AS key, version::bigint AS n FROM model_versions WHERE project_id = $1 AND status = 'active'",
        project,
    )
    .await?;
    Ok(ProjectStatus {
        project: project.clone(),
        total_items: items.values().sum(),
        machine_labeled: items.get("auto_labeled").copied().unwrap_or(0),
        human_labeled: items.get("human_labeled").copied().unwrap_or(0),
        items,
        review_open: tasks.get("open").copied().unwrap_or(0),
        review_claimed: tasks.get("claimed").copied().unwrap_or(0),
        active_model_version: versions.get("active").map(|&v| v as i32),
    })
}
