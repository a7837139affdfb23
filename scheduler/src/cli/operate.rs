//! `sieve status`, `sieve workers` and `sieve failed`: what operators look
//! at and replay.

use sieve_shared::Settings;

use super::args::FailedCommand;
use super::render::{self, last_error, print_json};
use crate::context::Context;
use crate::operate::{failed, status, workers};
use crate::projects;

pub async fn status(
    settings: Settings,
    project: Option<String>,
    json: bool,
    watch: Option<u64>,
) -> anyhow::Result<()> {
    let ctx = Context::connect(settings).await?;
    loop {
        let text = match &project {
            Some(name) => {
                let project = projects::get(&ctx.db, name).await?;
                let status = status::project_status(&ctx, &project).await?;
                if json {
                    serde_json::to_string_pretty(&status)?
                } else {
                    render::project(&status)
                }
            }
            None => {
                let fleet = status::fleet_status(&ctx).await?;
                if json {
                    serde_json::to_string_pretty(&fleet)?
                } else {
                    render::fleet(&fleet)
                }
            }
        };
        let Some(every) = watch else {
            println!("{text}");
            break;
        };
        // Clear the screen and redraw in place.
        println!("\x1b[2J\x1b[H{text}");
        tokio::select! {
            () = sieve_shared::shutdown::signal() => break,
            () = tokio::time::sleep(std::time::Duration::from_secs(every.max(1))) => {}
        }
    }
    Ok(())
}

pub async fn workers(settings: Settings, json: bool) -> anyhow::Result<()> {
    let workers = workers::list(&settings.redis).await?;
    if json {
        print_json(&workers)?;
    } else if workers.is_empty() {
        println!("no workers have reported (heartbeats live in Redis)");
    }
    if !json {
        for w in workers {
            let h = &w.heartbeat;
            println!(
                "{:<5} {}  host={} backend={} caps={} models=[{}] batches={} items={} {:.1} items/s  last seen {}s ago",
                if w.lost { "LOST" } else { "alive" },
                h.worker_id,
                h.host,
                h.backend,
                h.capabilities.join(","),
                h.models.join(","),
                h.batches_done,
                h.items_done,
                h.items_per_second,
                w.seconds_since_seen
            );
        }
    }
    Ok(())
}

pub async fn failed(settings: Settings, command: FailedCommand) -> anyhow::Result<()> {
    let ctx = Context::connect(settings).await?;
    match command {
        FailedCommand::List {
            project,
            limit,
            json,
        } => {
            let items = match &project {
                Some(name) => {
                    let project = projects::get(&ctx.db, name).await?;
                    failed::failed_items(&ctx, &project, limit as u64).await?
                }
                None => Vec::new(),
            };
            let dead = failed::dead_letters(&ctx, limit).await?;
            if json {
                print_json(&serde_json::json!({ "items": items, "dead_letters": dead }))?;
                return Ok(());
            }
            if let Some(name) = &project {
                println!("failed items of {name}: {}", items.len());
                for i in &items {
                    println!(
                        "  {}  {}  attempts={}  {}",
                        i.item_id, i.source, i.attempts, i.reason
                    );
                }
            }
            println!(
                "dead letters in {}: {}",
                ctx.topology().dead_queue(),
                dead.len()
            );
            for d in &dead {
                println!(
                    "  #{} from {} ({}): {}{}",
                    d.position,
                    d.queue,
                    d.reason,
                    d.summary,
                    last_error(d)
                );
            }
        }
        FailedCommand::Retry {
            project,
            reason,
            position: Some(position),
        } if project.is_none() && reason.is_none() => {
            let report = failed::retry_dead_at(&ctx, position).await?;
            if report.retried == 0 && report.skipped.is_empty() {
                anyhow::bail!("there is no dead letter #{position}");
            }
            println!("{} dead letter(s) sent back", report.retried);
            for s in &report.skipped {
                println!("  skipped {s}");
            }
        }
        FailedCommand::Retry {
            project, reason, ..
        } => match project {
            Some(name) => {
                let project = projects::get(&ctx.db, &name).await?;
                let n = failed::retry_items(&ctx, &project, reason.as_deref()).await?;
                println!("{n} failed item(s) of {} queued again", project.name);
            }
            None => {
                let report = failed::retry_dead(&ctx, reason.as_deref()).await?;
                println!("{} dead letter(s) sent back", report.retried);
                for s in &report.skipped {
                    println!("  skipped {s}");
                }
            }
        },
        FailedCommand::Show { position } => {
            let dead = failed::dead_letters(&ctx, position).await?;
            let Some(d) = dead
                .get(position.saturating_sub(1))
                .filter(|_| position > 0)
            else {
                anyhow::bail!(
                    "there is no dead letter #{position} ({} in the queue)",
                    dead.len()
                );
            };
            println!(
                "#{} from {} ({})\n{}{}",
                d.position,
                d.queue,
                d.reason,
                d.summary,
                last_error(d)
            );
            match serde_json::from_slice::<serde_json::Value>(&d.payload) {
                Ok(body) => print_json(&body)?,
                Err(_) => println!("{}", String::from_utf8_lossy(&d.payload)),
            }
        }
        FailedCommand::Purge { yes } => {
            if !yes {
                anyhow::bail!("purging drops every dead letter for good: add --yes to confirm");
            }
            let n = failed::purge_dead(&ctx).await?;
            println!("purged {n} dead letter(s)");
        }
    }
    Ok(())
}
