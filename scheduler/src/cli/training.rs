//! `sieve retrain` and `sieve models`: training runs and versions.

use sieve_shared::Settings;
use sieve_shared::messages::TrainMode;

use super::args::{ModelsCommand, RetrainArgs, RetrainCommand};
use crate::context::Context;
use crate::projects;
use crate::training::{self, RetrainRequest, registry};

pub async fn retrain(settings: Settings, args: RetrainArgs) -> anyhow::Result<()> {
    let ctx = Context::connect(settings).await?;
    match (args.command, args.project) {
        (Some(RetrainCommand::Status { project }), _) => {
            let project = projects::get(&ctx.db, &project).await?;
            for run in training::list_runs(&ctx, &project).await? {
                println!(
                    "{}  {:?}  labels={}  requested_by={}  progress={}  {}",
                    run.id,
                    run.state,
                    run.label_count,
                    run.requested_by,
                    run.progress.map_or("-".into(), |p| p.to_string()),
                    run.error.unwrap_or_default()
                );
            }
        }
        (Some(RetrainCommand::Cancel { project }), _) => {
            let project = projects::get(&ctx.db, &project).await?;
            let run = training::cancel(&ctx, &project, "cli").await?;
            println!("cancelled training run {run}");
        }
        (None, Some(project)) => {
            let project = projects::get(&ctx.db, &project).await?;
            let params = RetrainRequest {
                machine_labels: args.machine_labels,
                mode: args.mode.map(TrainMode::from),
                unfrozen_blocks: args.unfreeze_last,
                epochs: args.epochs,
                tile_size: args.tile_size,
            }
            .params(&project)?;
            let (mode, epochs) = (params.mode, params.epochs);
            let run = training::request(&ctx, &project, "cli", params, false).await?;
            println!(
                "queued training run {} for version {} ({mode:?} mode, up to {epochs} epochs, {} labels, {} holdout{})",
                run.run_id,
                run.version,
                run.labels,
                run.holdout,
                if args.machine_labels {
                    format!(", {} machine labels", run.machine_labels)
                } else {
                    String::new()
                }
            );
        }
        (None, None) => anyhow::bail!("name the project: sieve retrain --project NAME"),
    }
    Ok(())
}

pub async fn models(settings: Settings, command: ModelsCommand) -> anyhow::Result<()> {
    let ctx = Context::connect(settings).await?;
    match command {
        ModelsCommand::List { project } => {
            let project = projects::get(&ctx.db, &project).await?;
            for v in registry::list(&ctx, &project).await? {
                println!(
                    "v{}  {:?}  holdout_accuracy={}{}  holdout={}  train={}  {}",
                    v.version,
                    v.status,
                    v.holdout_accuracy.map_or("-".into(), |a| format!("{a:.4}")),
                    v.average_precision
                        .map_or(String::new(), |ap| format!("  ap50={ap:.4}")),
                    v.holdout_size.map_or("-".into(), |n| n.to_string()),
                    v.train_size.map_or("-".into(), |n| n.to_string()),
                    v.status_reason.unwrap_or_default()
                );
            }
        }
        ModelsCommand::Show {
            project,
            version,
            json,
        } => {
            let project = projects::get(&ctx.db, &project).await?;
            let detail = registry::show(&ctx, &project, version).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&detail)?);
            } else {
                print_version(&detail);
            }
        }
        ModelsCommand::Promote { project, version } => {
            let project = projects::get(&ctx.db, &project).await?;
            let rescored = registry::promote(&ctx, &project, version).await?;
            println!("v{version} is active; {rescored} item(s) queued for rescoring");
        }
        ModelsCommand::Rollback { project } => {
            let project = projects::get(&ctx.db, &project).await?;
            let version = registry::rollback(&ctx, &project).await?;
            println!("rolled back: v{version} is active again");
        }
    }
    Ok(())
}

fn print_version(detail: &registry::VersionDetail) {
    let figure = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.4}"));
    let v = &detail.summary;
    println!(
        "v{}  {:?}  holdout_accuracy={}  base_accuracy={}  holdout={}  train={}  {}",
        v.version,
        v.status,
        figure(v.holdout_accuracy),
        figure(detail.base_accuracy),
        v.holdout_size.map_or("-".into(), |n| n.to_string()),
        v.train_size.map_or("-".into(), |n| n.to_string()),
        v.status_reason.clone().unwrap_or_default()
    );
    let Some(q) = &detail.quality else {
        println!("no holdout evaluation (an untrained version, or none stored)");
        return;
    };
    println!(
        "expected calibration error {}; at {} the policy labels {} of the holdout by machine, {} correct",
        figure(q.expected_calibration_error),
        q.target_accuracy
            .map_or("the fixed threshold".into(), |t| format!("target {t}")),
        figure(q.machine_share),
        figure(q.machine_accuracy)
    );
    println!(
        "{:<16} {:>8} {:>10} {:>8}",
        "class", "support", "precision", "recall"
    );
    for c in &q.per_class {
        println!(
            "{:<16} {:>8} {:>10} {:>8}",
            c.class,
            c.support,
            figure(c.precision),
            figure(c.recall)
        );
    }
}
