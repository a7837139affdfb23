//! `sieve-tools bench ingest`: how fast ingest turns images into published jobs,
//! and how much memory it needs, against the raw publish rate of the same
//! broker.
//!
//! Each run makes its own database (`sieve_bench_<tag>`), queue prefix
//! (`bench-<tag>`) and store directory, and removes all three at the end.
//! The data is generated first and not timed: distinct 28x28 grayscale PNGs
//! (noise, so each has its own SHA-256) in a folder outside the store
//! (ingest copies each into the store), as many others in a folder inside
//! the store's directory (ingest references each where it is), and as many
//! distinct objects in the store named by a CSV manifest of keys. Every
//! file and row is a real image that ingest reads and hashes: nothing is
//! skipped because the bench knows it.
//!
//! Each phase runs in a child process (this binary, `--phase`), so the peak
//! RSS it reports (VmHWM) is that phase's own. Before and after each ingest
//! phase, a bare lapin loop publishes the same number of messages, of the
//! same size as that phase's jobs, with confirms pipelined (a sliding
//! window), to the same prelabel queue: the baseline the target is measured
//! against, the faster of the two runs. The queue is purged, and what the
//! last phase wrote flushed to disk, between phases.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use crate::procstat::{own_cpu, peak_rss_kib, service_cpu};
use anyhow::Context as _;
use chrono::Utc;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use lapin::{BasicProperties, Confirmation};
use sea_orm::{ActiveValue::Set, ConnectionTrait, EntityTrait};
use serde::{Deserialize, Serialize};
use sieve_shared::Settings;
use sieve_shared::ids::{ItemId, JobId, ProjectId};
use sieve_shared::messages::{ModelArch, ModelRef, PrelabelJob, SCHEMA_VERSION, encode};
use uuid::Uuid;

use sieve_scheduler::context::{self, Context};
use sieve_scheduler::entities::model_version::{self, VersionStatus};
use sieve_scheduler::entities::project as project_entity;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, ProjectName};
use sieve_scheduler::{db, ingest};

const PROJECT: &str = "bench";
/// Side of the generated images, like Fashion-MNIST.
const SIDE: u32 = 28;
/// The manifest's images start at this seed, so that none is the same
/// image as one in the folder (they share a project).
const MANIFEST_SEEDS: u64 = 1 << 40;
/// The same for the folder inside the store.
const IN_STORE_SEEDS: u64 = 1 << 41;
/// Where, under the store's directory, the in-place folder is generated.
const IN_STORE_DIR: &str = "bench-folder";
/// Prefix of a child's result line on its stdout.
const RESULT_MARK: &str = "BENCH-RESULT ";

#[derive(Debug, clap::Args)]
pub struct BenchIngestArgs {
    /// Synthetic PNGs for each folder phase (0 skips them).
    #[arg(long, default_value_t = 100_000)]
    pub images: u64,
    /// Which folder phases run: a folder outside the store (each image
    /// copied in), a folder inside the store's directory (referenced in
    /// place), or both.
    #[arg(long, value_enum, default_value_t = Folders::Both)]
    pub folders: Folders,
    /// Rows of the object-key manifest, each a distinct stored PNG (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    pub manifest_rows: u64,
    /// Confirms in flight in the bare publish loop.
    #[arg(long, default_value_t = 1000)]
    pub raw_window: usize,
    /// Directory for the generated data (default: the system temp dir);
    /// the run's subdirectory is removed at the end.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Internal: run one phase in this process.
    #[arg(long, hide = true, requires = "run_file")]
    pub phase: Option<Phase>,
    /// Internal: the run description a phase reads.
    #[arg(long, hide = true)]
    pub run_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Folders {
    Both,
    Copy,
    InPlace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum Phase {
    RawFolder,
    Folder,
    RawFolderInStore,
    FolderInStore,
    RawManifest,
    Manifest,
}

impl Phase {
    fn arg(self) -> &'static str {
        match self {
            Phase::RawFolder => "raw-folder",
            Phase::Folder => "folder",
            Phase::RawFolderInStore => "raw-folder-in-store",
            Phase::FolderInStore => "folder-in-store",
            Phase::RawManifest => "raw-manifest",
            Phase::Manifest => "manifest",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Phase::RawFolder => "raw publish, folder-sized jobs",
            Phase::Folder => "ingest folder of PNGs (copied)",
            Phase::RawFolderInStore => "raw publish, in-store folder jobs",
            Phase::FolderInStore => "ingest folder in store (in place)",
            Phase::RawManifest => "raw publish, manifest-sized jobs",
            Phase::Manifest => "ingest manifest of keys",
        }
    }
}

/// What the parent hands each phase.
#[derive(Debug, Serialize, Deserialize)]
struct Run {
    settings: Settings,
    images_dir: PathBuf,
    /// The folder inside the store's directory.
    in_store_dir: PathBuf,
    manifest: PathBuf,
    images: u64,
    manifest_rows: u64,
    raw_window: usize,
    /// A job exactly like the ones each ingest publishes (same key length).
    folder_job: Vec<u8>,
    in_store_job: Vec<u8>,
    manifest_job: Vec<u8>,
}

/// What a phase reports.
#[derive(Debug, Serialize, Deserialize)]
struct PhaseResult {
    phase: Phase,
    items: u64,
    seconds: f64,
    peak_rss_kib: u64,
    message_bytes: usize,
    /// CPU seconds of the phase's own process (user + system).
    cpu_seconds: f64,
    /// CPU seconds PostgreSQL and RabbitMQ spent meanwhile (the parent
    /// measures them around the child).
    #[serde(default)]
    postgres_cpu: f64,
    #[serde(default)]
    rabbitmq_cpu: f64,
}

impl PhaseResult {
    fn per_second(&self) -> f64 {
        self.items as f64 / self.seconds.max(1e-9)
    }
}

pub async fn run(settings: Settings, args: &BenchIngestArgs) -> anyhow::Result<()> {
    if let Some(phase) = args.phase {
        let file = args
            .run_file
            .as_deref()
            .context("--phase needs --run-file")?;
        return run_phase(phase, file).await;
    }
    let id = Uuid::now_v7().simple().to_string();
    let tag = &id[id.len() - 12..];
    let mut settings = settings;
    settings.database.url = with_database(&settings.database.url, &format!("sieve_bench_{tag}"))?;
    settings.broker.prefix = format!("bench-{tag}");
    settings.redis.prefix = format!("bench-{tag}");
    let work = args
        .workdir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("sieve-bench-{tag}"));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    settings.store.root = work.join("store");

    db::create_database_if_missing(&settings.database.url).await?;
    let outcome = bench(&settings, args, &work).await;

    clean_up(&settings, &work).await;
    outcome
}

/// Remove what a benchmark made, whatever happened: its queues, its
/// database and its working directory; a failure is reported, not fatal.
pub(crate) async fn clean_up(settings: &Settings, work: &Path) {
    let mut cleanup = Vec::new();
    match sieve_shared::broker::connect(&settings.broker, "sieve-tools bench cleanup").await {
        Ok(conn) => {
            let deleted = async {
                let channel = conn.create_channel().await?;
                context::topology(settings).delete(&channel).await
            }
            .await;
            if let Err(err) = deleted {
                cleanup.push(format!("deleting the queues: {err}"));
            }
            conn.close(200, "bench done".into()).await.ok();
        }
        Err(err) => cleanup.push(format!("deleting the queues: {err}")),
    }
    if let Err(err) = db::drop_database(&settings.database.url).await {
        cleanup.push(format!("dropping the database: {err:#}"));
    }
    eprintln!("removing {}", work.display());
    if let Err(err) = std::fs::remove_dir_all(work) {
        cleanup.push(format!("removing {}: {err}", work.display()));
    }
    for problem in &cleanup {
        eprintln!("cleanup: {problem}");
    }
}

async fn bench(settings: &Settings, args: &BenchIngestArgs, work: &Path) -> anyhow::Result<()> {
    let conn = db::connect(&settings.database).await?;
    db::migrate(&conn).await?;
    conn.close().await.ok();
    let ctx = Context::connect(settings.clone()).await?;
    let (project_id, model) = bench_project(&ctx).await?;

    let images_dir = work.join("images");
    let in_store_dir = settings.store.root.join(IN_STORE_DIR);
    let manifest = work.join("manifest.csv");
    let (copy, in_place) = match args.folders {
        Folders::Both => (args.images, args.images),
        Folders::Copy => (args.images, 0),
        Folders::InPlace => (0, args.images),
    };
    let started = Instant::now();
    generate_images(&images_dir, copy, 0)?;
    generate_images(&in_store_dir, in_place, IN_STORE_SEEDS)?;
    generate_manifest(&settings.store.root, &manifest, args.manifest_rows)?;
    // On disk before any timing: otherwise the writeback of a million new
    // files lands in whichever phase comes first (it once halved a raw
    // publish loop, whose broker writes to the same disk).
    flush_to_disk();
    eprintln!(
        "generated {} PNGs outside the store, {} inside it and {} stored objects + manifest in {:.1}s (not timed)",
        copy,
        in_place,
        args.manifest_rows,
        started.elapsed().as_secs_f64()
    );

    // Jobs exactly like the ones ingest will publish, for the raw loop.
    let job = |object_key: String| {
        encode(&PrelabelJob {
            size_bytes: None,
            schema: SCHEMA_VERSION,
            job_id: JobId::new(),
            project_id,
            item_id: ItemId::new(),
            object_key,
            model: model.clone(),
        })
    };
    let folder_key =
        sieve_shared::store::image_key(&project_id.to_string(), &"0".repeat(64)).to_string();
    let run = Run {
        settings: settings.clone(),
        images_dir,
        in_store_dir,
        manifest,
        images: args.images,
        manifest_rows: args.manifest_rows,
        raw_window: args.raw_window.max(1),
        folder_job: job(folder_key),
        in_store_job: job(format!("{IN_STORE_DIR}/{}", image_name(0))),
        manifest_job: job(manifest_key(0)),
    };
    let run_file = work.join("run.json");
    std::fs::write(&run_file, serde_json::to_vec(&run)?)?;

    // The raw loop runs before and after each ingest, and the ingest is
    // compared with the faster of the two: the load of a shared machine
    // moves both, and a slow baseline must not flatter the ratio.
    let mut phases = Vec::new();
    if copy > 0 {
        phases.extend([Phase::RawFolder, Phase::Folder, Phase::RawFolder]);
    }
    if in_place > 0 {
        phases.extend([
            Phase::RawFolderInStore,
            Phase::FolderInStore,
            Phase::RawFolderInStore,
        ]);
    }
    if args.manifest_rows > 0 {
        phases.extend([Phase::RawManifest, Phase::Manifest, Phase::RawManifest]);
    }
    let mut results = Vec::new();
    for phase in phases {
        purge(&ctx).await?;
        // What the last phase wrote (100,000 copies, say) is not flushed
        // in the next one's time.
        flush_to_disk();
        eprintln!("phase {}: {} ...", phase.arg(), phase.label());
        let before = service_cpu();
        let mut result = run_child(phase, &run_file).await?;
        let used = service_cpu() - before;
        result.postgres_cpu = used.postgres;
        result.rabbitmq_cpu = used.rabbitmq;
        eprintln!(
            "  {} items in {:.2}s: {:.0}/s, peak RSS {:.1} MB",
            result.items,
            result.seconds,
            result.per_second(),
            result.peak_rss_kib as f64 / 1024.0
        );
        results.push(result);
    }
    purge(&ctx).await?;
    ctx.connection.close(200, "bench done".into()).await.ok();
    ctx.db.clone().close().await.ok();
    print_report(settings, &results);
    Ok(())
}

/// A project with an active model (never loaded: no worker runs), so that
/// ingest publishes a job per item.
async fn bench_project(ctx: &Context) -> anyhow::Result<(ProjectId, ModelRef)> {
    let project = projects::create(
        &ctx.db,
        &ProjectName::parse(PROJECT)?,
        &ClassNames::parse(&["a".into(), "b".into()])?,
        &Policy::default(),
        ModelArch::SmallCnn,
        sieve_shared::kind::TaskKind::Classification,
    )
    .await?;
    let version = Uuid::now_v7();
    let now = Utc::now().fixed_offset();
    model_version::Entity::insert(model_version::ActiveModel {
        id: Set(version),
        project_id: Set(project.id.as_uuid()),
        version: Set(1),
        parent_id: Set(None),
        training_run_id: Set(None),
        artifact_key: Set(Some(format!("projects/{}/models/bench.bpk", project.id))),
        checksum: Set(Some("0".repeat(64))),
        architecture: Set(None),
        metrics: Set(None),
        calibration: Set(None),
        status: Set(VersionStatus::Active),
        status_reason: Set(None),
        created_at: Set(now),
        activated_at: Set(Some(now)),
    })
    .exec_without_returning(&ctx.db)
    .await?;
    project_entity::Entity::update(project_entity::ActiveModel {
        id: Set(project.id.as_uuid()),
        active_model_version_id: Set(Some(version)),
        ..Default::default()
    })
    .exec(&ctx.db)
    .await?;
    let project = projects::get(&ctx.db, PROJECT).await?;
    let model = sieve_scheduler::dispatch::active_model(ctx, &project)
        .await?
        .context("the bench project has no active model")?;
    Ok((project.id, model))
}

async fn purge(ctx: &Context) -> anyhow::Result<()> {
    let channel = ctx.connection.create_channel().await?;
    channel
        .queue_purge(
            ctx.topology().prelabel_queue().into(),
            QueuePurgeOptions::default(),
        )
        .await
        .context("purging the prelabel queue")?;
    channel.close(200, "purged".into()).await.ok();
    Ok(())
}

async fn run_child(phase: Phase, run_file: &Path) -> anyhow::Result<PhaseResult> {
    let exe = std::env::current_exe().context("finding this executable")?;
    // Its log goes straight to ours; its stdout carries the result.
    let output = tokio::process::Command::new(exe)
        .args(["bench", "ingest", "--phase", phase.arg(), "--run-file"])
        .arg(run_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a bench phase")?
        .wait_with_output()
        .await
        .context("running a bench phase")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        anyhow::bail!("phase {} failed ({})", phase.arg(), output.status);
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(RESULT_MARK))
        .with_context(|| format!("phase {} printed no result", phase.arg()))?;
    Ok(serde_json::from_str(line)?)
}

async fn run_phase(phase: Phase, run_file: &Path) -> anyhow::Result<()> {
    let run: Run = serde_json::from_slice(
        &std::fs::read(run_file).with_context(|| format!("reading {}", run_file.display()))?,
    )?;
    let result = match phase {
        Phase::RawFolder => raw_publish(&run, phase, &run.folder_job, run.images).await?,
        Phase::RawFolderInStore => raw_publish(&run, phase, &run.in_store_job, run.images).await?,
        Phase::RawManifest => {
            raw_publish(&run, phase, &run.manifest_job, run.manifest_rows).await?
        }
        Phase::Folder | Phase::FolderInStore | Phase::Manifest => {
            let ctx = Context::connect(run.settings.clone()).await?;
            let project = projects::get(&ctx.db, PROJECT).await?;
            // Items, and of them referenced in place (not copied).
            let (expected, in_place, bytes) = match phase {
                Phase::Folder => (run.images, 0, run.folder_job.len()),
                Phase::FolderInStore => (run.images, run.images, run.in_store_job.len()),
                _ => (run.manifest_rows, run.manifest_rows, run.manifest_job.len()),
            };
            let started = Instant::now();
            let summary = match phase {
                Phase::Folder => {
                    ingest::ingest_folder(&ctx, &project, &run.images_dir, false).await?
                }
                Phase::FolderInStore => {
                    ingest::ingest_folder(&ctx, &project, &run.in_store_dir, false).await?
                }
                _ => ingest::ingest_manifest(&ctx, &project, &run.manifest, None, false).await?,
            };
            let seconds = started.elapsed().as_secs_f64();
            if summary.new_items != expected
                || summary.dispatched != expected
                || summary.in_place != in_place
            {
                anyhow::bail!(
                    "expected {expected} new items, all dispatched, {in_place} of them in place; got {} new, {} dispatched, {} in place, {} failed ({:?})",
                    summary.new_items,
                    summary.dispatched,
                    summary.in_place,
                    summary.failed,
                    summary.failures.first()
                );
            }
            let stamped = ctx
                .db
                .query_one_raw(sea_orm::Statement::from_string(
                    ctx.db.get_database_backend(),
                    "SELECT count(*) AS n FROM items WHERE dispatched_at IS NOT NULL",
                ))
                .await?
                .map(|row| row.try_get::<i64>("", "n"))
                .transpose()?
                .unwrap_or(0);
            eprintln!("  items marked dispatched in the database: {stamped}");
            PhaseResult {
                phase,
                items: summary.dispatched,
                seconds,
                peak_rss_kib: peak_rss_kib(),
                message_bytes: bytes,
                cpu_seconds: own_cpu(),
                postgres_cpu: 0.0,
                rabbitmq_cpu: 0.0,
            }
        }
    };
    println!("{RESULT_MARK}{}", serde_json::to_string(&result)?);
    std::io::stdout().flush().ok();
    Ok(())
}

/// A bare lapin loop: `count` persistent, mandatory messages to the prelabel
/// queue, at most `run.raw_window` confirms outstanding.
async fn raw_publish(
    run: &Run,
    phase: Phase,
    payload: &[u8],
    count: u64,
) -> anyhow::Result<PhaseResult> {
    let conn = sieve_shared::broker::connect(&run.settings.broker, "sieve-tools bench raw").await?;
    let queue = context::topology(&run.settings).prelabel_queue();
    let started = Instant::now();
    publish_confirmed(&conn, &queue, payload, count, run.raw_window).await?;
    let seconds = started.elapsed().as_secs_f64();
    conn.close(200, "done".into()).await.ok();
    Ok(PhaseResult {
        phase,
        items: count,
        seconds,
        peak_rss_kib: peak_rss_kib(),
        message_bytes: payload.len(),
        cpu_seconds: own_cpu(),
        postgres_cpu: 0.0,
        rabbitmq_cpu: 0.0,
    })
}

/// Publish `payload` `count` times to `queue` as ingest does (persistent,
/// mandatory, confirmed), with at most `window` confirms outstanding: the
/// raw broker rate the benchmarks compare sieve with.
pub(crate) async fn publish_confirmed(
    conn: &lapin::Connection,
    queue: &str,
    payload: &[u8],
    count: u64,
    window: usize,
) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let check = |confirmation: Confirmation| match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        other => Err(anyhow::anyhow!("raw publish not confirmed: {other:?}")),
    };
    let mut in_flight = VecDeque::with_capacity(window);
    for _ in 0..count {
        if in_flight.len() >= window
            && let Some(confirm) = in_flight.pop_front()
        {
            check(confirm.await?)?;
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                options,
                payload,
                properties.clone(),
            )
            .await?;
        in_flight.push_back(confirm);
    }
    for confirm in in_flight {
        check(confirm.await?)?;
    }
    channel.close(200, "published".into()).await.ok();
    Ok(())
}

fn print_report(settings: &Settings, results: &[PhaseResult]) {
    println!(
        "sieve-tools bench ingest — broker {}, queue prefix {}, {} cores",
        redact(&settings.broker.url),
        settings.broker.prefix,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<36} {:>9} {:>9} {:>10} {:>9} {:>12} {:>23}",
        "phase", "items", "seconds", "items/s", "msg bytes", "peak RSS MB", "CPU s sieve/pg/rabbit"
    );
    for r in results {
        println!(
            "{:<36} {:>9} {:>9.2} {:>10.0} {:>9} {:>12.1} {:>23}",
            r.phase.label(),
            r.items,
            r.seconds,
            r.per_second(),
            r.message_bytes,
            r.peak_rss_kib as f64 / 1024.0,
            format!(
                "{:.1}/{:.1}/{:.1}",
                r.cpu_seconds, r.postgres_cpu, r.rabbitmq_cpu
            )
        );
    }
    let find = |p: Phase| results.iter().find(|r| r.phase == p);
    for (raw, ingest, name) in [
        (Phase::RawFolder, Phase::Folder, "folder, copied"),
        (
            Phase::RawFolderInStore,
            Phase::FolderInStore,
            "folder in store, in place",
        ),
        (Phase::RawManifest, Phase::Manifest, "manifest"),
    ] {
        let fastest_raw = results
            .iter()
            .filter(|r| r.phase == raw)
            .map(PhaseResult::per_second)
            .fold(None, |best: Option<f64>, rate| {
                Some(best.map_or(rate, |b| b.max(rate)))
            });
        if let (Some(raw), Some(ing)) = (fastest_raw, find(ingest)) {
            let ratio = ing.per_second() / raw.max(1e-9);
            println!(
                "{name}: ingest / raw publish (the faster raw run) = {ratio:.2} (target >= 0.5: {})",
                if ratio >= 0.5 { "met" } else { "MISSED" }
            );
        }
    }
    if let Some(m) = find(Phase::Manifest) {
        let mb = m.peak_rss_kib as f64 / 1024.0;
        println!(
            "manifest: peak RSS {mb:.1} MB for {} rows (target <= 300 MB: {})",
            m.items,
            if mb <= 300.0 { "met" } else { "MISSED" }
        );
    }
}

/// Write every dirty page to disk (`sync`); a failure only costs accuracy.
pub(crate) fn flush_to_disk() {
    match std::process::Command::new("sync").status() {
        Ok(status) if status.success() => {}
        other => eprintln!("warning: could not sync the generated data to disk ({other:?})"),
    }
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// `url` with its database name replaced by `name`.
pub(crate) fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority = base
        .find("://")
        .with_context(|| format!("database URL {url:?} has no scheme"))?
        + 3;
    let server = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    Ok(match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    })
}

fn manifest_key(i: u64) -> String {
    format!("bench/{}", image_name(i))
}

/// A distinct 28x28 grayscale PNG for each `i`: noise from a generator
/// seeded by `i`, so it compresses like a real small image, not like a
/// flat one.
fn png(i: u64) -> anyhow::Result<Vec<u8>> {
    let mut state = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut pixels = Vec::with_capacity((SIDE * SIDE) as usize);
    for _ in 0..SIDE * SIDE {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        pixels.push((state >> 56) as u8);
    }
    // The index itself in the first pixels: distinct even if two seeds met.
    pixels[..8].copy_from_slice(&i.to_le_bytes());
    let img = image::GrayImage::from_raw(SIDE, SIDE, pixels).context("image buffer")?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// Write image `seeds + i` to `path_of(i)` for `i` in `0..count`, on every
/// core.
fn generate_with(
    count: u64,
    seeds: u64,
    path_of: impl Fn(u64) -> PathBuf + Sync,
) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let path_of = &path_of;
                scope.spawn(move || -> anyhow::Result<()> {
                    let mut i = t;
                    while i < count {
                        let path = path_of(i);
                        std::fs::write(&path, png(seeds + i)?)
                            .with_context(|| format!("writing {}", path.display()))?;
                        i += threads;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
        }
        Ok(())
    })
}

fn make_shards(dir: &Path) -> anyhow::Result<()> {
    for shard in 0..256 {
        let path = dir.join(format!("{shard:02x}"));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    }
    Ok(())
}

/// Where image `i` of a generated folder is, below the folder.
pub(crate) fn image_name(i: u64) -> String {
    format!("{:02x}/{i:07}.png", i % 256)
}

/// `count` distinct PNGs (seeds `seeds..`) under `dir`, in 256 shards.
pub(crate) fn generate_images(dir: &Path, count: u64, seeds: u64) -> anyhow::Result<()> {
    if count == 0 {
        return Ok(());
    }
    make_shards(dir)?;
    generate_with(count, seeds, |i| dir.join(image_name(i)))
}

/// Objects straight into the local store's directory (a key is a path
/// under its root), and a CSV manifest naming them.
fn generate_manifest(store_root: &Path, manifest: &Path, rows: u64) -> anyhow::Result<()> {
    make_shards(&store_root.join("bench"))?;
    generate_with(rows, MANIFEST_SEEDS, |i| store_root.join(manifest_key(i)))?;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(manifest)
            .with_context(|| format!("creating {}", manifest.display()))?,
    );
    writeln!(out, "key")?;
    for i in 0..rows {
        writeln!(out, "{}", manifest_key(i))?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_database_name() {
        let with = |url| with_database(url, "b").expect("url");
        assert_eq!(with("postgres://u@h:5432/sieve"), "postgres://u@h:5432/b");
        assert_eq!(
            with("postgres://u@h:5432/sieve?ssl=no"),
            "postgres://u@h:5432/b?ssl=no"
        );
        assert_eq!(with("postgres://u@h"), "postgres://u@h/b");
        assert!(with_database("nonsense", "b").is_err());
    }

    #[test]
    fn generated_images_are_distinct_pngs() {
        let a = png(1).expect("png");
        let b = png(2).expect("png");
        assert_ne!(a, b);
        assert_eq!(
            sieve_scheduler::ingest::header_dimensions(&a, 1_000_000),
            Ok((SIDE, SIDE))
        );
    }
}
