//! `sieve token`: API tokens for people and scripts.

use sieve_shared::Settings;

use super::args::TokenCommand;
use crate::{auth, db, projects};

pub async fn token(settings: Settings, command: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::Create {
        name,
        role,
        project,
    } = command;
    let conn = db::connect(&settings.database).await?;
    let project = match project {
        Some(name) => Some(projects::get(&conn, &name).await?),
        None => None,
    };
    let token = auth::create_scoped_token(&conn, &name, role, project.as_ref()).await?;
    println!("{token}");
    eprintln!("store it now: it is not shown again");
    Ok(())
}
