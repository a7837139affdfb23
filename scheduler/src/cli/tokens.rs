//! `sieve token`: API tokens for people and scripts.

use sieve_shared::Settings;

use super::args::TokenCommand;
use super::render::print_json;
use crate::{auth, db, projects};

pub async fn token(settings: Settings, command: TokenCommand) -> anyhow::Result<()> {
    let conn = db::connect(&settings.database).await?;
    match command {
        TokenCommand::Create {
            name,
            role,
            project,
            expires_in,
        } => {
            let project = match project {
                Some(name) => Some(projects::get(&conn, &name).await?),
                None => None,
            };
            let (token, id) =
                auth::create_expiring_token(&conn, &name, role, project.as_ref(), expires_in)
                    .await?;
            println!("{token}");
            eprintln!("token {id}: store it now, it is not shown again");
        }
        TokenCommand::List { json } => {
            let tokens = auth::list_tokens(&conn).await?;
            if json {
                print_json(&tokens)?;
            } else if tokens.is_empty() {
                println!("no tokens: `sieve token create --name NAME --role ROLE`");
            } else {
                for t in tokens {
                    println!(
                        "{}  {:<8} {:<8} {:<20} {}{}",
                        t.id,
                        t.state,
                        format!("{:?}", t.role).to_lowercase(),
                        t.name,
                        t.project_id
                            .map(|p| format!("project {p}"))
                            .unwrap_or_else(|| "every project".into()),
                        t.expires_at
                            .map(|e| format!(", expires {}", e.format("%Y-%m-%d %H:%M")))
                            .unwrap_or_default(),
                    );
                }
            }
        }
        TokenCommand::Revoke { token } => {
            let revoked = auth::revoke_token(&conn, &token).await?;
            println!("token {} ({}) is revoked", revoked.id, revoked.name);
        }
    }
    Ok(())
}
