//! `sieve project`: create, list, show, policy, boxes, sources, pause,
//! resume, dispatch.

use sieve_shared::Settings;

use super::args::ProjectCommand;
use super::render::print_json;
use crate::box_settings::BoxSettingsChange;
use crate::context::Context;
use crate::ingest::sources;
use crate::kind::TaskKind;
use crate::operate::status;
use crate::patch;
use crate::policy::{DisagreementMeasure, Policy, PolicyPatch};
use crate::projects::{self, ClassNames, ProjectName};
use crate::{db, routing, training};

pub async fn project(settings: Settings, command: ProjectCommand) -> anyhow::Result<()> {
    match command {
        ProjectCommand::Create {
            name,
            task,
            classes,
            threshold,
            arch,
            measurement_only,
        } => {
            let arch = projects::allow_arch(arch, measurement_only)?;
            let ctx = Context::connect(settings).await?;
            let mut policy = Policy::default_for(task);
            if let Some(t) = threshold {
                policy.confidence_threshold = t;
            }
            let project = training::create_project_of_kind(
                &ctx,
                &ProjectName::parse(&name)?,
                &ClassNames::parse_for(task, &classes)?,
                &policy,
                arch,
                task,
                "cli",
            )
            .await?;
            if task == TaskKind::Deidentify {
                println!(
                    "created {task} project {} ({}) with classes {} on {}: the pretrained face detector is being made its first version; ingest photos, review what it is unsure of, then `sieve export -p {} --format blurred --out DIR`. Its targets: {} of images, {} of boxes (images are accepted by machine once random checks show that share of them miss no face or plate, and that share of faces and plates boxed; until then they go to people; `sieve project policy {} --target-accuracy --target-recall` changes them)",
                    project.name,
                    project.id,
                    project.class_names.join(","),
                    project.arch,
                    project.name,
                    project
                        .policy
                        .target_accuracy
                        .map_or_else(|| "none".to_string(), |t| t.to_string()),
                    project
                        .policy
                        .target_recall
                        .map_or_else(|| "none".to_string(), |t| t.to_string()),
                    project.name
                );
            } else if task.starts_with_a_model() {
                println!(
                    "created project {} ({}) with {} classes on {}; its first model is training",
                    project.name,
                    project.id,
                    project.class_names.len(),
                    project.arch
                );
            } else {
                println!(
                    "created {task} project {} ({}) with {} classes on {}; its images go to review until a model has trained on people's labels (`sieve train`, or policy.retrain_every_labels)",
                    project.name,
                    project.id,
                    project.class_names.len(),
                    project.arch
                );
            }
        }
        ProjectCommand::List => {
            let conn = db::connect(&settings.database).await?;
            for p in projects::list(&conn).await? {
                println!(
                    "{}  {}  arch={}  classes={}",
                    p.id,
                    p.name,
                    p.arch,
                    p.class_names.join(",")
                );
            }
        }
        ProjectCommand::Policy {
            name,
            threshold,
            target_accuracy,
            confidence_level,
            audit_rate,
            disagreement_limit,
            disagreement_measure,
            retrain_every,
            pool_evidence,
            second_review_confidence,
            target_precision,
            target_recall,
        } => {
            let conn = db::connect(&settings.database).await?;
            let project = projects::get(&conn, &name).await?;
            let patch = PolicyPatch {
                confidence_threshold: threshold,
                target_accuracy: patch::optional_flag(
                    "--target-accuracy",
                    target_accuracy.as_deref(),
                    "an accuracy",
                )?,
                confidence_level,
                disagreement_measure: disagreement_measure
                    .as_deref()
                    .map(DisagreementMeasure::parse)
                    .transpose()?,
                disagreement_limit,
                audit_rate,
                pool_evidence,
                retrain_every_labels: patch::optional_flag(
                    "--retrain-every",
                    retrain_every.as_deref(),
                    "a number of labels",
                )?,
                second_review_confidence: patch::optional_flag(
                    "--second-review-confidence",
                    second_review_confidence.as_deref(),
                    "a confidence",
                )?,
                target_precision: patch::optional_flag(
                    "--target-precision",
                    target_precision.as_deref(),
                    "a share of right boxes",
                )?,
                target_recall: patch::optional_flag(
                    "--target-recall",
                    target_recall.as_deref(),
                    "a share of the boxes people would draw",
                )?,
            };
            let before = project.policy_version;
            let project = routing::calibration::patch_policy(&conn, &project, &patch).await?;
            println!("policy version {}:", project.policy_version);
            print_json(&project.policy)?;
            if project.policy_version != before
                && let Some(done) = routing::reroute::reroute(&conn, project.id.as_uuid()).await?
            {
                println!(
                    "re-routed the items waiting for review: {} now labeled by machine, {} still in review, {} left with their reviewer",
                    done.machine_labeled, done.review, done.kept
                );
            }
        }
        ProjectCommand::Sources {
            name,
            allow,
            remove,
        } => {
            let conn = db::connect(&settings.database).await?;
            let project = projects::get(&conn, &name).await?;
            let mut allowed = sources::load(&conn, &project).await?;
            if !allow.is_empty() || !remove.is_empty() {
                let added = sources::Allowed::parse(&project.name, &allow)?;
                let removed = sources::Allowed::parse(&project.name, &remove)?;
                allowed.locations.retain(|l| !removed.locations.contains(l));
                for location in added.locations {
                    if !allowed.locations.contains(&location) {
                        allowed.locations.push(location);
                    }
                }
                sources::set(&conn, &project, &allowed).await?;
            }
            if allowed.locations.is_empty() {
                println!(
                    "{}'s scoped tokens may ingest from nowhere (add a location with --allow)",
                    project.name
                );
            }
            for location in allowed.written() {
                println!("{location}");
            }
        }
        ProjectCommand::Show { name } => {
            let ctx = Context::connect(settings).await?;
            let project = projects::get(&ctx.db, &name).await?;
            print_json(&status::project_status(&ctx, &project).await?)?;
        }
        ProjectCommand::Pause { name } => {
            let ctx = Context::connect(settings).await?;
            let project = projects::get(&ctx.db, &name).await?;
            crate::dispatch::pause(&ctx, &project).await?;
            println!(
                "{} is paused: no prediction jobs are published",
                project.name
            );
        }
        ProjectCommand::Resume { name } => {
            let ctx = Context::connect(settings).await?;
            let project = projects::get(&ctx.db, &name).await?;
            let published = crate::dispatch::resume(&ctx, &project).await?;
            println!(
                "{} is running again; {published} waiting item(s) published",
                project.name
            );
        }
        ProjectCommand::Boxes {
            name,
            tile_size,
            proposal_threshold,
        } => {
            let conn = db::connect(&settings.database).await?;
            let project = projects::get(&conn, &name).await?;
            let change = BoxSettingsChange {
                tile_size: patch::optional_flag(
                    "--tile-size",
                    tile_size.as_deref(),
                    "a multiple of 32 from 64 to 1024",
                )?,
                proposal_threshold: patch::optional_flag(
                    "--proposal-threshold",
                    proposal_threshold.as_deref(),
                    "a confidence from 0.1 to 0.95",
                )?,
            };
            let in_force = if change.tile_size.is_none() && change.proposal_threshold.is_none() {
                project.box_settings()?
            } else {
                let in_force = projects::set_box_settings(&conn, &project, change).await?;
                eprintln!(
                    "changed; they apply from {}'s next training run (sieve retrain {}); the active version keeps its own",
                    project.name, project.name
                );
                in_force
            };
            print_json(&in_force)?;
        }
        ProjectCommand::Dispatch {
            name,
            rate_limit,
            priority,
        } => {
            let conn = db::connect(&settings.database).await?;
            let project = projects::get(&conn, &name).await?;
            let rate_limit = patch::optional_flag(
                "--rate-limit",
                rate_limit.as_deref(),
                "a number of jobs per second",
            )?;
            let change = crate::dispatch::ControlChange {
                paused: None,
                rate_limit,
                priority,
            };
            print_json(&crate::dispatch::set_control(&conn, project.id, &change).await?)?;
        }
    }
    Ok(())
}
