//! `sieve reviewers -p P [--since DURATION] [--json]`: per-reviewer figures
//! of a project, read with the database's authority like every CLI command.

use chrono::Utc;
use sieve_shared::Settings;

use super::render::{self, print_json};
use crate::operate::reviewers;
use crate::{db, projects};

pub async fn reviewers(
    settings: Settings,
    project: String,
    since: Option<std::time::Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let since = match since {
        Some(back) => Some(
            chrono::Duration::from_std(back)
                .ok()
                .and_then(|back| Utc::now().checked_sub_signed(back))
                .ok_or_else(|| anyhow::anyhow!("--since {back:?} is too long ago"))?,
        ),
        None => None,
    };
    let conn = db::connect(&settings.database).await?;
    let project = projects::get(&conn, &project).await?;
    let report = reviewers::reviewer_figures(&conn, &project, since).await?;
    if json {
        print_json(&report)?;
    } else {
        print!("{}", render::reviewers(&report));
    }
    Ok(())
}
