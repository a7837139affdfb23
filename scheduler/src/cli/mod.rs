//! The `sieve` command line.
//!
//! Every command loads the settings once, connects to what it needs, and
//! calls the same library function the HTTP API calls.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use sieve_shared::Settings;
use sieve_shared::messages::{ModelArch, TrainMode};
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::entities::api_token::Role;
use crate::operate::{failed, status, workers};
use crate::patch;
use crate::policy::{DisagreementMeasure, Policy, PolicyPatch};
use crate::projects::{self, ClassNames, ProjectName};
use crate::tools::demo;
use crate::training::RetrainRequest;
use crate::training::registry;
use crate::{auth, db, ingest, review, routing, server, training};

#[derive(Debug, Parser)]
#[command(
    name = "sieve",
    version,
    about = "Active-learning image labeling: scheduler and CLI"
)]
pub struct Cli {
    /// Settings file (default: ./sieve.toml if present). SIEVE_* variables override it.
    #[arg(long, global = true, env = "SIEVE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API, the result consumer and the training-event consumer.
    Serve,
    /// Create the database if needed and apply pending migrations.
    Migrate,
    /// Create, list and inspect projects.
    #[command(subcommand)]
    Project(ProjectCommand),
    /// Ingest a folder of images, an object-store prefix, or a CSV / JSON
    /// Lines manifest, into a project. Exits with status 2 if any file,
    /// object or row failed.
    Ingest {
        /// A folder to read recursively, `store:PREFIX` (objects under a
        /// prefix of sieve's store) or `s3://BUCKET/PREFIX` (a bucket,
        /// reached with the s3.* settings; its images are copied in).
        #[arg(
            value_name = "FOLDER|store:PREFIX|s3://BUCKET/PREFIX",
            required_unless_present = "manifest",
            conflicts_with = "manifest"
        )]
        source: Option<String>,
        #[arg(long, short)]
        project: String,
        /// A CSV (header with `path` or `key`, optional `label`,
        /// `external_id`) or JSON Lines manifest: a file, or `store:KEY`
        /// for one in sieve's store (its rows then name keys only).
        #[arg(long, value_name = "FILE|store:KEY")]
        manifest: Option<String>,
        /// Directory that manifest paths are relative to (default: the
        /// manifest's directory); no path may leave it.
        #[arg(long, requires = "manifest")]
        root: Option<PathBuf>,
    },
    /// A project's ingests, newest first: from `sieve ingest` and over HTTP,
    /// with their counts and state (a running one whose process died reads
    /// as interrupted).
    Ingests {
        #[arg(long, short)]
        project: String,
        #[arg(long, default_value_t = 20)]
        limit: u64,
        #[arg(long)]
        json: bool,
    },
    /// Queues, workers and projects at a glance (or one project in detail).
    Status {
        #[arg(long, short)]
        project: Option<String>,
        #[arg(long)]
        json: bool,
        /// Refresh every N seconds until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
    },
    /// Workers from their heartbeats; one that stopped beating shows as LOST.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// Claim and submit review tasks.
    #[command(subcommand)]
    Review(ReviewCommand),
    /// Queue a training run from the project's human labels, or show runs.
    Retrain(RetrainArgs),
    /// List, promote and roll back model versions.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Failed items and dead letters: list, retry, purge.
    #[command(subcommand)]
    Failed(FailedCommand),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run the active-learning loop on Fashion-MNIST with simulated reviewers
    /// (needs `sieve serve` and workers running; `ops/demo.sh` starts them).
    Demo(demo::DemoArgs),
    /// Benchmarks that print their figures (docs/benchmarks.md).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Ingest of a folder of PNGs (copied into the store, and inside the
    /// store referenced in place) and of a manifest of keys, against the raw
    /// publish rate of the same broker; own database and queues.
    Ingest(crate::tools::bench_ingest::BenchIngestArgs),
    /// Review claims: many reviewers claiming and submitting at once until
    /// the queue is empty; latencies, throughput, zero double claims.
    Claim(crate::tools::bench_claim::ClaimArgs),
}

#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Create a classification project; its first model is queued at once.
    Create {
        name: String,
        /// Class names, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        classes: Vec<String>,
        /// Confidence under which an item goes to human review.
        #[arg(long)]
        threshold: Option<f32>,
        /// What the project's models are built on: `small_cnn` (trained
        /// whole, fast on a CPU) or `mobilenet_v2` (a frozen ImageNet
        /// backbone with trained heads; suits GPU workers, which need its
        /// weights: docs/operations.md). Fixed for the project's life.
        #[arg(long, default_value_t = ModelArch::SmallCnn)]
        arch: ModelArch,
    },
    List,
    Show {
        name: String,
    },
    /// Stop publishing prediction jobs for a project; ingest still records
    /// its items, and they go out on resume.
    Pause {
        name: String,
    },
    /// Publish again, starting with every item that waited while paused.
    Resume {
        name: String,
    },
    /// Show or change how a project's jobs are dispatched.
    Dispatch {
        name: String,
        /// Jobs per second at most; `none` removes the limit.
        #[arg(long)]
        rate_limit: Option<String>,
        /// 0 to 9, higher first (the sweeper's order; jobs carry it).
        #[arg(long)]
        priority: Option<i16>,
    },
    /// Show or change a project's routing policy (each change is a new
    /// policy version; the active model is recalibrated for it).
    Policy {
        name: String,
        /// Fixed confidence threshold (used without a target accuracy).
        #[arg(long)]
        threshold: Option<f32>,
        /// Calibrate per-class thresholds to this machine-label accuracy
        /// (e.g. 0.97); `none` goes back to the fixed threshold.
        #[arg(long)]
        target_accuracy: Option<String>,
        /// Confidence level of the accuracy's lower bound (Wilson).
        #[arg(long)]
        confidence_level: Option<f64>,
        /// Share of items (a fixed sample, chosen by hash) that people
        /// review whatever the model says: audits of would-be machine labels
        /// and the evidence calibration rests on.
        #[arg(long)]
        audit_rate: Option<f64>,
        #[arg(long)]
        disagreement_limit: Option<f32>,
        /// `vote` or `mutual_information`.
        #[arg(long)]
        disagreement_measure: Option<String>,
        /// Retrain automatically after every N new human labels; `none`
        /// turns it off.
        #[arg(long)]
        retrain_every: Option<String>,
        /// Let a class short of calibration evidence borrow the threshold
        /// calibrated on all classes together (true or false).
        #[arg(long)]
        pool_evidence: Option<bool>,
        /// Second opinion on a reviewer's label that disagrees with a model
        /// at least this confident (e.g. 0.95); `none` turns it off.
        #[arg(long)]
        second_review_confidence: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReviewCommand {
    /// Claim the most uncertain open task.
    Next {
        #[arg(long, short)]
        project: String,
        #[arg(long, default_value = "cli")]
        reviewer: String,
    },
    /// Submit a label for a claimed task.
    Submit {
        task: String,
        /// The fencing token `review next` printed.
        #[arg(long)]
        token: i64,
        /// Class name or index.
        #[arg(long)]
        class: String,
        #[arg(long, default_value = "cli")]
        reviewer: String,
        /// Label it even if people already labeled the item (the CLI has
        /// the database's own authority, like an admin token).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RetrainArgs {
    #[arg(long, short)]
    project: Option<String>,
    /// Also train on the project's machine labels (self-training; only items
    /// of the training split, never the holdout). Off by default: machine
    /// labels enter training only when a run asks.
    #[arg(long)]
    machine_labels: bool,
    /// `full` fine-tunes a MobileNetV2 project's backbone with its heads, from
    /// the active version's weights (minutes per thousand images on a CPU);
    /// default: the architecture's own mode (heads for MobileNetV2).
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// With `--mode full` on MobileNetV2: train only the last N of its 17
    /// blocks (and its final convolution and the heads), keep the rest frozen.
    #[arg(long, value_name = "N")]
    unfreeze_last: Option<u32>,
    /// Upper bound on epochs (default: the mode's; early stopping may end
    /// a run sooner).
    #[arg(long)]
    epochs: Option<u32>,
    #[command(subcommand)]
    command: Option<RetrainCommand>,
}

/// A training mode on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ModeArg {
    Heads,
    Full,
}

impl From<ModeArg> for TrainMode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::Heads => TrainMode::Heads,
            ModeArg::Full => TrainMode::Full,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum RetrainCommand {
    /// Training runs of a project, newest first.
    Status {
        #[arg(long, short)]
        project: String,
    },
    /// Cancel the project's queued or running training run: it ends
    /// `cancelled`, its version is never registered, the champion stays.
    Cancel {
        #[arg(long, short)]
        project: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    List {
        #[arg(long, short)]
        project: String,
    },
    /// One version: holdout accuracy, per-class precision / recall,
    /// expected calibration error, and the share the project's policy would
    /// label by machine with it.
    Show {
        #[arg(long, short)]
        project: String,
        version: i32,
        #[arg(long)]
        json: bool,
    },
    /// Activate a version by number.
    Promote {
        #[arg(long, short)]
        project: String,
        version: i32,
    },
    /// Re-activate the previously active version.
    Rollback {
        #[arg(long, short)]
        project: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum FailedCommand {
    /// Failed items of a project (with --project) and the dead letters.
    List {
        #[arg(long, short)]
        project: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Send failed items (with --project) or dead letters back through the
    /// normal path. `--reason` narrows it: a substring of the item error, or
    /// a dead-letter reason (`rejected`, `delivery_limit`).
    Retry {
        #[arg(long, short)]
        project: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        /// Only the dead letter at this position of `failed list`.
        #[arg(long, conflicts_with_all = ["project", "reason"])]
        position: Option<usize>,
    },
    /// One dead letter in full: origin, reason and its decoded body.
    Show {
        /// Position, as `failed list` numbers them (1 is the oldest).
        position: usize,
    },
    /// Drop every dead letter.
    Purge {
        /// Confirm: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; it is printed once and stored only as a hash.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Let the token act only on this project (others answer 404).
        #[arg(long)]
        project: Option<String>,
    },
}

/// What `sieve ingest` was asked to read.
fn ingest_source(
    source: Option<String>,
    manifest: Option<String>,
    root: Option<PathBuf>,
) -> anyhow::Result<ingest::Source> {
    use crate::ingest::prefix::{self, Prefix};
    Ok(match (manifest, source) {
        (Some(manifest), _) => match manifest.strip_prefix("store:") {
            Some(key) => {
                if root.is_some() {
                    anyhow::bail!("--root is for a manifest file; a stored manifest names keys");
                }
                ingest::Source::ManifestInStore {
                    key: key.to_owned(),
                }
            }
            None => ingest::Source::ManifestFile {
                path: PathBuf::from(manifest),
                root,
            },
        },
        (None, Some(source)) if prefix::is_location(&source) => {
            ingest::Source::Prefix(Prefix::parse(&source)?)
        }
        (None, Some(dir)) => ingest::Source::Folder(PathBuf::from(dir)),
        (None, None) => {
            anyhow::bail!("give a folder, store:PREFIX, s3://BUCKET/PREFIX or --manifest FILE")
        }
    })
}

fn parse_role(raw: &str) -> Result<Role, String> {
    match raw {
        "reviewer" => Ok(Role::Reviewer),
        "ml" => Ok(Role::Ml),
        "ops" => Ok(Role::Ops),
        "admin" => Ok(Role::Admin),
        other => Err(format!(
            "unknown role {other:?}: use reviewer, ml, ops or admin"
        )),
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Migrate => {
            db::create_database_if_missing(&settings.database.url).await?;
            let conn = db::connect(&settings.database).await?;
            let applied = db::migrate(&conn).await?;
            println!("database is up to date ({applied} migration(s) applied)");
        }
        Command::Serve => {
            let listener = tokio::net::TcpListener::bind(settings.http.bind)
                .await
                .with_context(|| format!("binding {}", settings.http.bind))?;
            let ctx = Context::connect(settings).await?;
            tracing::info!(addr = %listener.local_addr()?, "sieve scheduler listening");
            server::serve(ctx, listener, shutdown_signal()).await?;
        }
        Command::Project(command) => project(settings, command).await?,
        Command::Ingest {
            source,
            project,
            manifest,
            root,
        } => {
            let source = ingest_source(source, manifest, root)?;
            let ctx = Context::connect(settings).await?;
            let project = projects::get(&ctx.db, &project).await?;
            // Ctrl-C or SIGTERM stops between batches; the row says where.
            let cancel = CancellationToken::new();
            let stop = cancel.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                stop.cancel();
            });
            let options = ingest::Options {
                terminal: std::io::stderr().is_terminal(),
                progress: None,
                cancel: Some(cancel),
            };
            let requested_by = format!(
                "cli:{}",
                std::env::var("USER").unwrap_or_else(|_| "unknown".into())
            );
            let (id, summary) =
                ingest::runs::run_here(&ctx, &project, &source, &requested_by, options).await?;
            for failure in &summary.failures {
                eprintln!("failed: {failure}");
            }
            let what = match source {
                ingest::Source::Folder(_) => "file(s)",
                ingest::Source::Prefix(_) => "object(s)",
                _ => "row(s)",
            };
            println!(
                "ingest {id}: {} {} into {}: {} new ({} referenced in place), {} duplicate, {} failed, {} with imported labels, {} dispatched",
                summary.files_seen,
                what,
                project.name,
                summary.new_items,
                summary.in_place,
                summary.duplicates,
                summary.failed,
                summary.imported_labels,
                summary.dispatched
            );
            if summary.has_failures() {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Ingests {
            project,
            limit,
            json,
        } => {
            let ctx = Context::connect(settings).await?;
            let project = projects::get(&ctx.db, &project).await?;
            let runs = ingest::runs::list(&ctx.db, &project, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else if runs.is_empty() {
                println!("no ingests into {}", project.name);
            } else {
                for run in &runs {
                    println!(
                        "{}  {:<11}  {}  seen={} new={} duplicate={} failed={} dispatched={}  by {}  {}{}",
                        run.id,
                        format!("{:?}", run.state).to_lowercase(),
                        run.created_at.format("%Y-%m-%d %H:%M:%S"),
                        run.files_seen,
                        run.new_items,
                        run.duplicates,
                        run.failed,
                        run.dispatched,
                        run.requested_by,
                        run.source,
                        run.error
                            .as_deref()
                            .map(|e| format!("  ({e})"))
                            .unwrap_or_default(),
                    );
                }
            }
        }
        Command::Status {
            project,
            json,
            watch,
        } => {
            let ctx = Context::connect(settings).await?;
            loop {
                let text = match &project {
                    Some(name) => {
                        let project = projects::get(&ctx.db, name).await?;
                        let status = status::project_status(&ctx, &project).await?;
                        if json {
                            serde_json::to_string_pretty(&status)?
                        } else {
                            render_project(&status)
                        }
                    }
                    None => {
                        let fleet = status::fleet_status(&ctx).await?;
                        if json {
                            serde_json::to_string_pretty(&fleet)?
                        } else {
                            render_fleet(&fleet)
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
                    () = shutdown_signal() => break,
                    () = tokio::time::sleep(std::time::Duration::from_secs(every.max(1))) => {}
                }
            }
        }
        Command::Workers { json } => {
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
        }
        Command::Review(command) => review_command(settings, command).await?,
        Command::Retrain(args) => retrain(settings, args).await?,
        Command::Models(command) => models_command(settings, command).await?,
        Command::Failed(command) => failed_command(settings, command).await?,
        Command::Token(TokenCommand::Create {
            name,
            role,
            project,
        }) => {
            let conn = db::connect(&settings.database).await?;
            let project = match project {
                Some(name) => Some(projects::get(&conn, &name).await?),
                None => None,
            };
            let token = auth::create_scoped_token(&conn, &name, role, project.as_ref()).await?;
            println!("{token}");
            eprintln!("store it now: it is not shown again");
        }
        Command::Demo(args) => {
            let ctx = Context::connect(settings).await?;
            demo::run(&ctx, &args).await?;
        }
        Command::Bench(BenchCommand::Ingest(args)) => {
            crate::tools::bench_ingest::run(settings, &args).await?;
        }
        Command::Bench(BenchCommand::Claim(args)) => {
            crate::tools::bench_claim::run(&settings, &args).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn render_project(status: &status::ProjectStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "project {} ({} items, {})",
        status.project.name, status.total_items, status.project.arch
    );
    for (state, n) in &status.items {
        let _ = writeln!(out, "  {state:<14} {n}");
    }
    let _ = writeln!(
        out,
        "  review: {} open, {} claimed; active model: {}; policy v{}",
        status.review_open,
        status.review_claimed,
        status
            .active_model_version
            .map_or("none".into(), |v| format!("v{v}")),
        status.project.policy_version
    );
    for m in &status.machine_label_accuracy {
        let _ = writeln!(
            out,
            "  machine-label accuracy {:<12} {:.3} [{:.3}, {:.3}] from {} audits",
            m.class.as_deref().unwrap_or("(overall)"),
            m.accuracy,
            m.lower,
            m.upper,
            m.audited
        );
    }
    let second = &status.second_opinions;
    if status.project.policy.second_review_confidence.is_some()
        || *second != status::SecondOpinions::default()
    {
        let _ = writeln!(
            out,
            "  second opinions: {} open; the second reviewer agreed with the first {}, \
             with the model {}, with neither {}",
            second.open, second.agreed_with_first, second.agreed_with_model, second.neither
        );
    }
    out
}

/// ` — after 6 attempts: <error>` for a job a worker gave up retrying.
fn last_error(d: &failed::DeadLetter) -> String {
    match (&d.error, d.attempts) {
        (Some(error), Some(n)) => format!(" — after {n} attempts: {error}"),
        (Some(error), None) => format!(" — {error}"),
        _ => String::new(),
    }
}

fn render_fleet(fleet: &status::FleetStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "queues ({}):", fleet.queue_source);
    for q in &fleet.queues {
        let _ = writeln!(
            out,
            "  {:<28} ready {:>8}  unacked {:>8}  consumers {:>3}  publish/s {:>8}  deliver/s {:>8}",
            q.name,
            q.ready,
            q.unacked.map_or("-".into(), |n| n.to_string()),
            q.consumers,
            q.publish_rate.map_or("-".into(), |r| format!("{r:.1}")),
            q.deliver_rate.map_or("-".into(), |r| format!("{r:.1}")),
        );
    }
    match &fleet.workers_error {
        Some(err) => {
            let _ = writeln!(out, "workers: unknown ({err})");
        }
        None => {
            let _ = writeln!(
                out,
                "workers: {} alive, {} lost",
                fleet.workers_alive, fleet.workers_lost
            );
        }
    }
    for p in &fleet.projects {
        let machine_share = if p.machine_labeled + p.human_labeled > 0 {
            format!(
                "{:.1}%",
                100.0 * p.machine_labeled as f64 / (p.machine_labeled + p.human_labeled) as f64
            )
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "project {:<20} items {:>8}  queued {:>6}  review {:>6}  machine {:>6}  human {:>6}  failed {:>5}  machine share {}  model {}",
            p.project.name,
            p.total_items,
            p.items.get("queued").copied().unwrap_or(0),
            p.review_open + p.review_claimed,
            p.machine_labeled,
            p.human_labeled,
            p.items.get("failed").copied().unwrap_or(0),
            machine_share,
            p.active_model_version
                .map_or("none".into(), |v| format!("v{v}")),
        );
    }
    out
}

async fn project(settings: Settings, command: ProjectCommand) -> anyhow::Result<()> {
    match command {
        ProjectCommand::Create {
            name,
            classes,
            threshold,
            arch,
        } => {
            let ctx = Context::connect(settings).await?;
            let mut policy = Policy::default();
            if let Some(t) = threshold {
                policy.confidence_threshold = t;
            }
            let project = training::create_project(
                &ctx,
                &ProjectName::parse(&name)?,
                &ClassNames::parse(&classes)?,
                &policy,
                arch,
                "cli",
            )
            .await?;
            println!(
                "created project {} ({}) with {} classes on {}; its first model is training",
                project.name,
                project.id,
                project.class_names.len(),
                project.arch
            );
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
            };
            let project = routing::calibration::patch_policy(&conn, &project, &patch).await?;
            println!("policy version {}:", project.policy_version);
            print_json(&project.policy)?;
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

async fn review_command(settings: Settings, command: ReviewCommand) -> anyhow::Result<()> {
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
                    force,
                },
            )
            .await?;
            println!("labeled item {} as {}", label.item_id, label.class);
        }
    }
    Ok(())
}

async fn retrain(settings: Settings, args: RetrainArgs) -> anyhow::Result<()> {
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

async fn models_command(settings: Settings, command: ModelsCommand) -> anyhow::Result<()> {
    let ctx = Context::connect(settings).await?;
    match command {
        ModelsCommand::List { project } => {
            let project = projects::get(&ctx.db, &project).await?;
            for v in registry::list(&ctx, &project).await? {
                println!(
                    "v{}  {:?}  holdout_accuracy={}  holdout={}  train={}  {}",
                    v.version,
                    v.status,
                    v.holdout_accuracy.map_or("-".into(), |a| format!("{a:.4}")),
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

async fn failed_command(settings: Settings, command: FailedCommand) -> anyhow::Result<()> {
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

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(args: &[&str]) -> Result<ModelArch, clap::Error> {
        let argv = ["sieve", "project", "create", "p", "--classes", "a,b"]
            .iter()
            .chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Project(ProjectCommand::Create { arch, .. }) => Ok(arch),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn project_create_takes_an_architecture() {
        assert!(matches!(create(&[]), Ok(ModelArch::SmallCnn)));
        assert!(matches!(
            create(&["--arch", "mobilenet_v2"]),
            Ok(ModelArch::MobilenetV2)
        ));
        let message = match create(&["--arch", "resnet50"]) {
            Err(err) => err.to_string(),
            Ok(arch) => panic!("resnet50 parsed as {arch}"),
        };
        assert!(
            message.contains("resnet50")
                && message.contains("small_cnn")
                && message.contains("mobilenet_v2"),
            "{message}"
        );
    }

    #[test]
    fn demo_passes_an_architecture_through() {
        let cli = Cli::try_parse_from(["sieve", "demo", "--quick", "--arch", "mobilenet_v2"]);
        match cli.map(|c| c.command) {
            Ok(Command::Demo(args)) => assert_eq!(args.arch, ModelArch::MobilenetV2),
            other => panic!("parsed as {other:?}"),
        }
    }
}
