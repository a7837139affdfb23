//! `sieve-tools bench ceiling`: how many items per second sieve's own
//! machinery carries when the model costs nothing.
//!
//! In a database, queue prefix and store of its own, it generates `--items`
//! distinct PNGs inside the store, then measures, in the same run:
//!
//! 1. **The raw broker**: a bare lapin loop publishing as many messages the
//!    size of a prediction job to the prelabel queue (persistent, mandatory,
//!    confirmed, as ingest publishes), then consuming and acknowledging them
//!    all. The ceiling no queue-based pipeline on this broker can pass.
//! 2. **End to end**: a scheduler (`server::serve`: the result consumer,
//!    routing, the sweeper) and `--workers` workers on a `null` project
//!    (constant answers, nothing decoded: see `ModelArch::Null`). The
//!    images are ingested in place (`store:` prefix: read, hashed, checked,
//!    inserted, published), predicted, their results routed, and, as every
//!    answer is uniform, each becomes an open review task. The clock stops
//!    when the last item has left `queued`.
//!
//! While it runs, a sampler reads every 250 ms how many items exist, how
//! many are routed, and how deep the prelabel and results queues are. Each
//! stage's rate is taken over the 10th to the 90th percent of its items
//! (the ramp at either end left out); a queue that fills up names the stage
//! after it as the bound. Afterwards the database is checked: one
//! prediction and one open review task per item, none failed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::Args;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sea_orm::{DbBackend, FromQueryResult, Statement};
use sieve_shared::Settings;
use sieve_shared::broker;
use sieve_shared::ids::{ItemId, JobId, ModelVersionId, ProjectId};
use sieve_shared::messages::{ModelArch, ModelRef, PrelabelJob, SCHEMA_VERSION, encode};
use sieve_worker::context::Capability;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bench_ingest::{
    clean_up, flush_to_disk, generate_images, image_name, publish_confirmed, with_database,
};
use crate::procstat::{ServiceCpu, own_cpu, service_cpu};
use sieve_scheduler::context::Context;
use sieve_scheduler::ingest::prefix::Prefix;
use sieve_scheduler::ingest::{self, Options, Source};
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_scheduler::{db, server, training};

#[derive(Debug, Clone, Args)]
pub struct CeilingArgs {
    /// Items through the whole pipeline (and messages through the raw loop).
    #[arg(long, default_value_t = 100_000)]
    pub items: u64,
    /// Null-model workers beside the scheduler.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Each worker's batch (`worker.batch_size`).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Confirms in flight in the raw publish loop.
    #[arg(long, default_value_t = 1000)]
    pub raw_window: usize,
    /// Where the generated images go (a directory of its own is made in it;
    /// default: the system's temporary directory).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

/// Where the generated images are, inside the store.
pub(crate) const IMAGES: &str = "ceiling";
const PROJECT: &str = "ceiling";
/// Sampling costs PostgreSQL a count per sample: rarely enough not to
/// slow down what it measures.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Longest the pipeline may go without routing anything before the run is
/// called stuck.
const STALL: Duration = Duration::from_secs(120);

pub async fn run(settings: Settings, args: &CeilingArgs) -> anyhow::Result<()> {
    ensure!(args.items >= 100, "--items must be at least 100");
    ensure!(args.workers >= 1, "--workers must be at least 1");
    let (settings, work) = sandbox(settings, args.batch, args.workdir.clone())?;
    db::create_database_if_missing(&settings.database.url).await?;
    let outcome = bench(&settings, args).await;
    clean_up(&settings, &work).await;
    outcome
}

/// Settings for a benchmark of its own: a database, queue and Redis
/// prefixes named after a fresh tag, a local store in a new working
/// directory (returned, for [`clean_up`]), servers on free ports.
pub(crate) fn sandbox(
    settings: Settings,
    batch: usize,
    workdir: Option<PathBuf>,
) -> anyhow::Result<(Settings, PathBuf)> {
    let id = Uuid::now_v7().simple().to_string();
    let tag = &id[id.len() - 12..];
    let mut settings = settings;
    settings.database.url = with_database(&settings.database.url, &format!("sieve_bench_{tag}"))?;
    settings.broker.prefix = format!("bench-{tag}");
    settings.redis.prefix = format!("bench-{tag}");
    settings.http.bind = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    settings.http.metrics_bind = None;
    settings.http.worker_bind = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    settings.worker.batch_size = batch;
    let work = workdir
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("sieve-bench-{tag}"));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    settings.store.root = work.join("store");
    settings.store.url = None;
    Ok((settings, work))
}

/// Migrate the benchmark's database, connect, and generate `items` PNGs
/// in the store (untimed).
pub(crate) async fn prepare(settings: &Settings, items: u64) -> anyhow::Result<Context> {
    let conn = db::connect(&settings.database).await?;
    db::migrate(&conn).await?;
    conn.close().await.ok();
    let ctx = Context::connect(settings.clone()).await?;
    let started = Instant::now();
    generate_images(&settings.store.root.join(IMAGES), items, 0)?;
    flush_to_disk();
    eprintln!(
        "generated {items} PNGs in the store in {:.1}s (not timed)",
        started.elapsed().as_secs_f64()
    );
    Ok(ctx)
}

async fn bench(settings: &Settings, args: &CeilingArgs) -> anyhow::Result<()> {
    let ctx = prepare(settings, args.items).await?;

    let raw = raw_broker(&ctx, args).await?;
    eprintln!(
        "raw broker: publish {:.0}/s, consume {:.0}/s",
        raw.publish_rate(),
        raw.consume_rate()
    );

    let stop = CancellationToken::new();
    let tasks = start_sieve(&ctx, args.workers, &stop).await?;
    let measured = end_to_end(&ctx, args).await;
    stop_sieve(&stop, tasks).await;
    let run = measured?;
    verify(&ctx, &run.project, args.items).await?;
    ctx.connection.close(200, "bench done".into()).await.ok();
    ctx.db.clone().close().await.ok();
    print_report(args, &raw, &run);
    Ok(())
}

struct Raw {
    items: u64,
    publish: Duration,
    consume: Duration,
}

impl Raw {
    fn publish_rate(&self) -> f64 {
        self.items as f64 / self.publish.as_secs_f64()
    }
    fn consume_rate(&self) -> f64 {
        self.items as f64 / self.consume.as_secs_f64()
    }
}

/// The bare broker on the same queue ingest publishes to: `--items`
/// messages the size of a prediction job, published and confirmed, then
/// consumed and acknowledged (one acknowledgement per 100, as a worker's
/// batch is).
async fn raw_broker(ctx: &Context, args: &CeilingArgs) -> anyhow::Result<Raw> {
    let payload = encode(&PrelabelJob {
        size_bytes: Some(400),
        schema: SCHEMA_VERSION,
        job_id: JobId::new(),
        project_id: ProjectId::new(),
        item_id: ItemId::new(),
        object_key: format!("{IMAGES}/{}", image_name(0)),
        model: ModelRef {
            version_id: ModelVersionId::new(),
            version: 1,
            artifact_key: format!(
                "projects/{}/models/{}-0123456789abcdef.bin",
                Uuid::nil(),
                Uuid::nil()
            ),
            checksum: "0".repeat(64),
        },
    });
    let queue = ctx.topology().prelabel_queue();
    let conn = broker::connect(&ctx.settings.broker, "sieve-tools bench ceiling raw").await?;
    let started = Instant::now();
    publish_confirmed(&conn, &queue, &payload, args.items, args.raw_window).await?;
    let publish = started.elapsed();

    let (channel, mut consumer) = broker::consume(&conn, &queue, 1000, "bench-raw").await?;
    let started = Instant::now();
    let mut seen = 0u64;
    while seen < args.items {
        let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .context("the raw consumer got nothing for 60 s")?
            .context("the raw consumer ended")??;
        seen += 1;
        if seen.is_multiple_of(100) || seen == args.items {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await?;
        }
    }
    let consume = started.elapsed();
    channel.close(200, "done".into()).await.ok();
    conn.close(200, "done".into()).await.ok();
    Ok(Raw {
        items: args.items,
        publish,
        consume,
    })
}

/// The scheduler's loops and the workers, in this process.
pub(crate) async fn start_sieve(
    ctx: &Context,
    workers: usize,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<anyhow::Result<()>>>> {
    let mut tasks = Vec::new();
    let listener = tokio::net::TcpListener::bind(ctx.settings.http.bind).await?;
    let s = stop.clone();
    tasks.push(tokio::spawn(server::serve(
        ctx.clone(),
        listener,
        async move { s.cancelled().await },
    )));
    for n in 0..workers {
        // One trains the project's first (null) model.
        let capabilities = match n {
            0 => vec![Capability::Prelabel, Capability::Train],
            _ => vec![Capability::Prelabel],
        };
        let listener = tokio::net::TcpListener::bind(ctx.settings.http.worker_bind).await?;
        let s = stop.clone();
        tasks.push(tokio::spawn(sieve_worker::service::run(
            (*ctx.settings).clone(),
            capabilities,
            listener,
            async move { s.cancelled().await },
        )));
    }
    Ok(tasks)
}

/// Stop what [`start_sieve`] started and wait for it to drain; an error
/// is reported, not returned (the figures are taken by then).
pub(crate) async fn stop_sieve(
    stop: &CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
) {
    stop.cancel();
    for task in tasks.into_iter().rev() {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("a bench process ended with an error: {err:#}"),
            Err(err) => eprintln!("a bench process panicked: {err}"),
        }
    }
}

/// One sample of the pipeline's state.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    items: u64,
    routed: u64,
    prelabel_ready: u64,
    results_ready: u64,
}

struct EndToEnd {
    project: Project,
    wall: Duration,
    ingest: Duration,
    samples: Vec<Sample>,
    own_cpu: f64,
    services: ServiceCpu,
}

/// A measurement-only project on the null model, once that is active.
pub(crate) async fn null_project(ctx: &Context) -> anyhow::Result<Project> {
    training::create_project(
        ctx,
        &ProjectName::parse(PROJECT)?,
        &ClassNames::parse(&["a".into(), "b".into(), "c".into(), "d".into()])?,
        &Policy::default(),
        ModelArch::Null,
        "bench",
    )
    .await?;
    let waited = Instant::now();
    loop {
        let project = projects::get(&ctx.db, PROJECT).await?;
        if project.active_model_version_id.is_some() {
            return Ok(project);
        }
        ensure!(
            waited.elapsed() < Duration::from_secs(120),
            "the null model was not active after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The images generated under [`IMAGES`], as an ingest source.
pub(crate) fn generated() -> anyhow::Result<Source> {
    Ok(Source::Prefix(Prefix::parse(&format!("store:{IMAGES}"))?))
}

async fn end_to_end(ctx: &Context, args: &CeilingArgs) -> anyhow::Result<EndToEnd> {
    let project = null_project(ctx).await?;

    let cpu_before = (own_cpu(), service_cpu());
    let started = Instant::now();
    let sampling = CancellationToken::new();
    let sampler = tokio::spawn(sample(
        ctx.clone(),
        project.clone(),
        started,
        sampling.clone(),
    ));
    let summary = ingest::ingest(ctx, &project, &generated()?, &Options::default()).await?;
    let ingest = started.elapsed();
    ensure!(
        summary.new_items == args.items && summary.failed == 0,
        "ingest made {} items ({} failed) of {}",
        summary.new_items,
        summary.failed,
        args.items
    );
    eprintln!(
        "ingested {} items in {:.1}s; waiting for routing",
        args.items,
        ingest.as_secs_f64()
    );

    let (mut last_routed, mut last_change) = (0, Instant::now());
    let wall = loop {
        let routed = routed(ctx, &project).await?;
        if routed >= args.items {
            break started.elapsed();
        }
        if routed != last_routed {
            (last_routed, last_change) = (routed, Instant::now());
        }
        ensure!(
            last_change.elapsed() < STALL,
            "nothing routed for {} s: {routed} of {} items routed",
            STALL.as_secs(),
            args.items
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let own = own_cpu() - cpu_before.0;
    let services = service_cpu() - cpu_before.1;
    sampling.cancel();
    let samples = sampler.await.context("the sampler panicked")??;
    Ok(EndToEnd {
        project,
        wall,
        ingest,
        samples,
        own_cpu: own,
        services,
    })
}

#[derive(FromQueryResult)]
struct Count {
    n: i64,
}

pub(crate) async fn count(ctx: &Context, sql: &str, project: &Project) -> anyhow::Result<u64> {
    let row = Count::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        [project.id.as_uuid().into()],
    ))
    .one(&ctx.db)
    .await?
    .context("a count returned no row")?;
    Ok(row.n.max(0) as u64)
}

/// Items that left `queued`, counted as all items less those still
/// queued: the (project, state) index finds the queued ones, a number that
/// shrinks as the run goes on (counting the routed ones scanned the table
/// many times a second and slowed down the routing it measured).
pub(crate) async fn routed(ctx: &Context, project: &Project) -> anyhow::Result<u64> {
    count(
        ctx,
        "SELECT (SELECT count(*) FROM items WHERE project_id = $1) \
                - (SELECT count(*) FROM items WHERE project_id = $1 AND state = 'queued') AS n",
        project,
    )
    .await
}

/// Ready messages in `queue` (a passive declare: nothing is created).
pub(crate) async fn depth(channel: &lapin::Channel, queue: &str) -> anyhow::Result<u64> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(u64::from(declared.message_count()))
}

async fn sample(
    ctx: Context,
    project: Project,
    started: Instant,
    stop: CancellationToken,
) -> anyhow::Result<Vec<Sample>> {
    let channel = ctx.connection.create_channel().await?;
    let (prelabel, results) = (
        ctx.topology().prelabel_queue(),
        ctx.topology().results_queue(),
    );
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    while !stop.is_cancelled() {
        tick.tick().await;
        samples.push(Sample {
            at: started.elapsed(),
            items: count(
                &ctx,
                "SELECT count(*) AS n FROM items WHERE project_id = $1",
                &project,
            )
            .await?,
            routed: routed(&ctx, &project).await?,
            prelabel_ready: depth(&channel, &prelabel).await?,
            results_ready: depth(&channel, &results).await?,
        });
    }
    channel.close(200, "sampled".into()).await.ok();
    Ok(samples)
}

/// Items per second of a stage whose running total is `total` (sampled),
/// over the 10th to the 90th percent of `n` items.
fn stage_rate(samples: &[Sample], n: u64, total: impl Fn(&Sample) -> u64) -> Option<f64> {
    let at = |share: f64| {
        samples
            .iter()
            .find(|s| total(s) as f64 >= share * n as f64)
            .map(|s| (s.at, total(s)))
    };
    let ((t10, c10), (t90, c90)) = (at(0.1)?, at(0.9)?);
    let seconds = (t90 - t10).as_secs_f64();
    (seconds > 0.0 && c90 > c10).then(|| (c90 - c10) as f64 / seconds)
}

/// Items whose job left the prelabel queue: in the database (their job
/// published) and no longer waiting in the queue.
fn predicted(sample: &Sample) -> u64 {
    sample.items.saturating_sub(sample.prelabel_ready)
}

/// Every item predicted once and waiting in the review queue; nothing
/// failed, nothing predicted twice.
pub(crate) async fn verify(ctx: &Context, project: &Project, items: u64) -> anyhow::Result<()> {
    let checks = [
        (
            "items",
            "SELECT count(*) AS n FROM items WHERE project_id = $1",
            items,
        ),
        (
            "items in review",
            "SELECT count(*) AS n FROM items WHERE project_id = $1 AND state = 'in_review'",
            items,
        ),
        (
            "predictions",
            "SELECT count(*) AS n FROM predictions p JOIN items i ON i.id = p.item_id WHERE i.project_id = $1",
            items,
        ),
        (
            "open review tasks",
            "SELECT count(*) AS n FROM review_tasks WHERE project_id = $1 AND state = 'open'",
            items,
        ),
    ];
    for (what, sql, expected) in checks {
        let found = count(ctx, sql, project).await?;
        ensure!(found == expected, "{what}: {found}, expected {expected}");
    }
    Ok(())
}

fn print_report(args: &CeilingArgs, raw: &Raw, run: &EndToEnd) {
    let n = args.items;
    let e2e = n as f64 / run.wall.as_secs_f64();
    let ratio = e2e / raw.publish_rate();
    let cores = std::thread::available_parallelism().map_or(0, |c| c.get());
    println!();
    println!(
        "machinery ceiling: {n} items, {} null worker(s) at batch {}, scheduler and workers in one process, {cores} cores",
        args.workers, args.batch
    );
    println!(
        "  raw RabbitMQ publish (persistent, confirmed)  {:>8.0} msg/s  ({:.1} s)",
        raw.publish_rate(),
        raw.publish.as_secs_f64()
    );
    println!(
        "  raw RabbitMQ consume (acked)                  {:>8.0} msg/s  ({:.1} s)",
        raw.consume_rate(),
        raw.consume.as_secs_f64()
    );
    println!(
        "  end to end: ingest -> review queue            {:>8.0} items/s ({:.1} s) = {ratio:.2} x raw publish (target >= 0.5: {})",
        e2e,
        run.wall.as_secs_f64(),
        if ratio >= 0.5 { "met" } else { "MISSED" }
    );
    println!("  stages, over the 10th to 90th percent of the items:");
    let stages: [(&str, Option<f64>, String); 3] = [
        (
            "ingest (read, hash, check, insert, publish)",
            stage_rate(&run.samples, n, |s| s.items),
            format!("all in {:.1} s", run.ingest.as_secs_f64()),
        ),
        (
            "predicted by the workers",
            stage_rate(&run.samples, n, predicted),
            format!(
                "peak {} jobs waiting in the prelabel queue",
                run.samples
                    .iter()
                    .map(|s| s.prelabel_ready)
                    .max()
                    .unwrap_or(0)
            ),
        ),
        (
            "routed (result -> decision -> review task)",
            stage_rate(&run.samples, n, |s| s.routed),
            format!(
                "peak {} result messages waiting",
                run.samples
                    .iter()
                    .map(|s| s.results_ready)
                    .max()
                    .unwrap_or(0)
            ),
        ),
    ];
    for (name, rate, note) in &stages {
        match rate {
            Some(rate) => println!("    {name:<44} {rate:>8.0} items/s  ({note})"),
            None => println!("    {name:<44} {:>8} items/s  ({note})", "-"),
        }
    }
    if let Some((name, _, _)) = stages
        .iter()
        .filter(|(_, rate, _)| rate.is_some())
        .min_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))
    {
        println!("  slowest stage: {name}");
    }
    println!(
        "  CPU seconds during the end-to-end run: this process {:.1}, PostgreSQL {:.1}, RabbitMQ {:.1} (of {:.1} s x {cores} cores)",
        run.own_cpu,
        run.services.postgres,
        run.services.rabbitmq,
        run.wall.as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, items: u64, routed: u64, prelabel_ready: u64) -> Sample {
        Sample {
            at: Duration::from_millis(ms),
            items,
            routed,
            prelabel_ready,
            results_ready: 0,
        }
    }

    #[test]
    fn a_stage_rate_leaves_out_the_ramps() {
        // 100 items: 10 by 1 s, 90 by 2 s (80 in the middle second), 100 by 10 s.
        let samples = [
            at(0, 0, 0, 0),
            at(1000, 10, 0, 10),
            at(2000, 90, 10, 20),
            at(3000, 100, 90, 0),
            at(10_000, 100, 100, 0),
        ];
        assert_eq!(stage_rate(&samples, 100, |s| s.items), Some(80.0));
        assert_eq!(stage_rate(&samples, 100, |s| s.routed), Some(80.0));
        // Predicted: 0, 0, 70, 100: from 70 at 2 s to 100 at 3 s.
        assert_eq!(stage_rate(&samples, 100, predicted), Some(30.0));
        // A stage that never got to 90 %: no rate rather than a wrong one.
        assert_eq!(stage_rate(&samples[..2], 100, |s| s.items), None);
    }
}
