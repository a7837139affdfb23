//! `sieve review`: claim and label from the command line.

use anyhow::Context as _;
use sieve_shared::Settings;

use super::args::ReviewCommand;
use super::render::print_json;
use crate::{db, projects, review};

pub async fn review(settings: Settings, command: ReviewCommand) -> anyhow::Result<()> {
    let conn = db::connect(&settings.database).await?;
    match command {
        ReviewCommand::Next { project, reviewer } => {
            let project = projects::get(&conn, &project).await?;
            let lease = std::time::Duration::from_secs(settings.review.lease_seconds);
            match review::claim_next(&conn, &project, &reviewer, lease).await? {
                Some(task) => print_json(&task)?,
                None => println!("the review queue of {} is empty", project.name),
            }
        }
        ReviewCommand::Submit {
            task,
            token,
            class,
            reviewer,
            force,
        } => {
            let task = task
                .parse()
                .with_context(|| format!("{task:?} is not a task id"))?;
            let label = review::submit(
                &conn,
                task,
                &reviewer,
                &review::Submission {
                    fencing_token: token,
                    class,
                    boxes: None,
                    force,
                },
            )
            .await?;
            println!(
                "labeled item {} as {}",
                label.item_id,
                label.class.unwrap_or_default()
            );
        }
    }
    Ok(())
}
