//! `sieve-tools bench cluster`: items through a three-node RabbitMQ cluster
//! while one node is shut down and started again.
//!
//! Start the cluster first (`bash ops/rabbitmq-cluster.sh start`). In a
//! database, queue prefix and store of its own, with `broker.urls` naming
//! the cluster's nodes, a scheduler and `--workers` workers (in this
//! process) label `--items` images with the null model (so the broker, not
//! a model, is what is measured), from ingest to the review queue. Once a
//! share of the items is routed, the node every connection of this process
//! started on (the one holding the queues' leaders: quorum queues put their
//! leader on the node that declared them) is shut down; after
//! `--down-seconds` it is started again and rejoins.
//!
//! Printed: when the node went down, how long until items were routed again
//! (the fleet's recovery: connections moved to another node, the queues
//! elected new leaders, unacknowledged jobs went back), how long the whole
//! run took against a run of the same size with every node up (measured
//! first, in the same run), and the accounting: every item routed exactly
//! once (one prediction, one open review task), none failed, no dead
//! letter, and how many results came back twice (work redone, dropped by
//! the scheduler).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::Args;
use sieve_scheduler::context::Context;
use sieve_scheduler::ingest::{self, Options};
use sieve_scheduler::projects::Project;
use sieve_shared::Settings;
use tokio_util::sync::CancellationToken;

use crate::bench_ceiling::{
    count, depth, generated, null_project, prepare, routed, sandbox, start_sieve, stop_sieve,
    verify,
};
use crate::bench_ingest::clean_up;

#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Items through the whole pipeline, in each of the two runs.
    #[arg(long, default_value_t = 5_000)]
    pub items: u64,
    /// Null-model workers beside the scheduler.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// The cluster's nodes (`broker.urls`); default: the three of
    /// `ops/rabbitmq-cluster.sh`.
    #[arg(long, value_delimiter = ',')]
    pub urls: Vec<String>,
    /// The script that stops and starts a node (`stop-node N`, `start-node N`).
    #[arg(long, default_value = "ops/rabbitmq-cluster.sh")]
    pub script: PathBuf,
    /// How long the node stays down.
    #[arg(long, default_value_t = 15)]
    pub down_seconds: u64,
    /// The share of the items routed before the node goes down.
    #[arg(long, default_value_t = 0.2)]
    pub stop_at: f64,
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

/// Longest the pipeline may go without routing anything (a node restart
/// included) before the run is called stuck.
const STALL: Duration = Duration::from_secs(180);

pub async fn run(settings: Settings, args: &ClusterArgs) -> anyhow::Result<()> {
    ensure!(args.items >= 100, "--items must be at least 100");
    ensure!(
        (0.0..1.0).contains(&args.stop_at),
        "--stop-at must be within 0..1"
    );
    let urls = match args.urls.is_empty() {
        true => (1..=3)
            .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", 5700 + n))
            .collect(),
        false => args.urls.clone(),
    };
    let mut settings = settings;
    settings.broker.urls = urls;
    let mut baseline = None;
    for lose_a_node in [false, true] {
        let (settings, work) = sandbox(settings.clone(), 64, args.workdir.clone())?;
        sieve_scheduler::db::create_database_if_missing(&settings.database.url).await?;
        let outcome = one_run(&settings, args, lose_a_node).await;
        clean_up(&settings, &work).await;
        let run = outcome?;
        report(args, &run, baseline.as_ref());
        baseline.get_or_insert(run);
    }
    Ok(())
}

struct Run {
    wall: Duration,
    lost_node: Option<LostNode>,
    duplicates: u64,
}

struct LostNode {
    node: usize,
    /// When the shutdown began (it closes the node's connections first).
    down_at: Duration,
    routed_at_stop: u64,
    /// The longest the fleet went without routing an item, from the
    /// shutdown on: the time connections took to move to another node and
    /// the queues to elect new leaders.
    longest_gap: Duration,
}

async fn one_run(
    settings: &Settings,
    args: &ClusterArgs,
    lose_a_node: bool,
) -> anyhow::Result<Run> {
    let ctx = prepare(settings, args.items).await?;
    let stop = CancellationToken::new();
    let tasks = start_sieve(&ctx, args.workers, &stop).await?;
    let outcome = drive(&ctx, args, lose_a_node).await;
    stop_sieve(&stop, tasks).await;
    let (project, mut run) = outcome?;
    verify(&ctx, &project, args.items).await?;
    let channel = ctx.connection.create_channel().await?;
    let dead = depth(&channel, &ctx.topology().dead_queue()).await?;
    channel.close(200, "counted".into()).await.ok();
    ensure!(dead == 0, "{dead} dead letters");
    run.duplicates = duplicates_dropped();
    ctx.connection.close(200, "bench done".into()).await.ok();
    ctx.db.clone().close().await.ok();
    Ok(run)
}

async fn drive(
    ctx: &Context,
    args: &ClusterArgs,
    lose_a_node: bool,
) -> anyhow::Result<(Project, Run)> {
    let project = null_project(ctx).await?;
    let started = Instant::now();
    let ingest = {
        let (ctx, project) = (ctx.clone(), project.clone());
        tokio::spawn(async move {
            ingest::ingest(&ctx, &project, &generated()?, &Options::default()).await
        })
    };
    // Every connection of this process started on this node (see
    // `broker::connect`): losing it moves them all.
    let node = std::process::id() as usize % ctx.settings.broker.nodes().len() + 1;
    let mut lost: Option<LostNode> = None;
    let mut restart = None;
    let (mut last_routed, mut last_change) = (0, Instant::now());
    loop {
        let routed = routed(ctx, &project).await?;
        if routed >= args.items {
            break;
        }
        if routed != last_routed {
            if let Some(lost) = lost.as_mut() {
                lost.longest_gap = lost.longest_gap.max(last_change.elapsed());
            }
            (last_routed, last_change) = (routed, Instant::now());
        }
        if lose_a_node && lost.is_none() && routed as f64 >= args.stop_at * args.items as f64 {
            let down_at = started.elapsed();
            eprintln!(
                "shutting node {node} down at {:.1} s, {routed} items routed",
                down_at.as_secs_f64()
            );
            // The gap that matters starts here, not at the last item routed.
            last_change = Instant::now();
            let stopping = tokio::spawn(node_script(args.script.clone(), "stop-node", node));
            lost = Some(LostNode {
                node,
                down_at,
                routed_at_stop: routed,
                longest_gap: Duration::ZERO,
            });
            let (script, down) = (args.script.clone(), Duration::from_secs(args.down_seconds));
            restart = Some(tokio::spawn(async move {
                stopping.await.context("stopping the node panicked")??;
                tokio::time::sleep(down).await;
                node_script(script, "start-node", node).await
            }));
        }
        ensure!(
            last_change.elapsed() < STALL,
            "nothing routed for {} s: {routed} of {} items routed",
            STALL.as_secs(),
            args.items
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let wall = started.elapsed();
    let summary = ingest.await.context("the ingest task panicked")??;
    ensure!(
        summary.new_items == args.items && summary.failed == 0,
        "ingest made {} items ({} failed) of {}",
        summary.new_items,
        summary.failed,
        args.items
    );
    if let Some(restart) = restart {
        restart.await.context("restarting the node panicked")??;
    }
    let failed = count(
        ctx,
        "SELECT count(*) AS n FROM items WHERE project_id = $1 AND state = 'failed'",
        &project,
    )
    .await?;
    ensure!(failed == 0, "{failed} items failed");
    Ok((
        project,
        Run {
            wall,
            lost_node: lost,
            duplicates: 0,
        },
    ))
}

async fn node_script(script: PathBuf, what: &'static str, node: usize) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(what)
        .arg(node.to_string())
        .status()
        .await
        .with_context(|| format!("running {} {what} {node}", script.display()))?;
    ensure!(
        status.success(),
        "{} {what} {node}: {status}",
        script.display()
    );
    Ok(())
}

/// Results the scheduler dropped as already applied (a job redone after its
/// worker's connection went away before the acknowledgement), from this
/// process's metrics, so far.
fn duplicates_dropped() -> u64 {
    let text = sieve_shared::telemetry::prometheus().render();
    text.lines()
        .filter(|l| {
            l.starts_with("sieve_results_routed_total") && l.contains("outcome=\"duplicate\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn report(args: &ClusterArgs, run: &Run, baseline: Option<&Run>) {
    let rate = args.items as f64 / run.wall.as_secs_f64();
    match (&run.lost_node, baseline) {
        (None, _) => println!(
            "cluster, every node up: {} items routed in {:.1} s ({rate:.0}/s), {} duplicate results dropped",
            args.items,
            run.wall.as_secs_f64(),
            run.duplicates
        ),
        (Some(lost), baseline) => {
            println!(
                "cluster, node {} shut down at {:.1} s ({} items routed) for {} s: {} items routed in {:.1} s ({rate:.0}/s{})",
                lost.node,
                lost.down_at.as_secs_f64(),
                lost.routed_at_stop,
                args.down_seconds,
                args.items,
                run.wall.as_secs_f64(),
                baseline.map_or(String::new(), |b| format!(
                    "; {:.1} s more than with every node up",
                    (run.wall.as_secs_f64() - b.wall.as_secs_f64()).max(0.0)
                ))
            );
            println!(
                "  longest time without an item routed, from the shutdown on: {:.1} s (connections moving to another node, queues electing leaders)",
                lost.longest_gap.as_secs_f64()
            );
            let earlier = baseline.map_or(0, |b| b.duplicates);
            println!(
                "  every item routed exactly once, none failed, no dead letter; {} duplicate results dropped (work redone)",
                run.duplicates.saturating_sub(earlier)
            );
        }
    }
}
