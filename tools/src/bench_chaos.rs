//! `sieve-tools bench chaos`: real processes, real faults, and an account
//! of what could go wrong (issue #25, item 8).
//!
//! It starts one `sieve serve` and `--workers` `sieve-worker` processes
//! from the binaries beside this one, on a database, queue prefix, Redis
//! prefix and store of its own (as the tests' sandbox does), each process
//! logging to a file of its own in the work directory. Through the HTTP API
//! it creates a Fashion-MNIST project, ingests `--items` real images in
//! chunks (`store:` prefixes, referenced in place), requests two retrains,
//! and simulated reviewers label the review queue from the ground truth the
//! whole time. Meanwhile it injects the faults of [`plan`], each at a moment
//! when it can hurt (while a chunk is ingested, routed or rescored, while a
//! run trains): worker SIGKILLs (the worker is started again at once), two
//! scheduler SIGKILLs (one during an ingest, one during a training run
//! while results are routed), a RabbitMQ restart (`stop_app` /
//! `start_app`), a PostgreSQL restart (the cluster stopped `-m fast` and
//! started) and a flush of its own Redis keys. After each it measures the
//! time until the system has recovered: the scheduler's and every worker's
//! `/healthz` answer 200, every worker's heartbeat is in Redis, and, while
//! work is waiting, predictions or labels move again.
//!
//! At the end it waits until everything has settled and counts, from the
//! database, the broker and the processes' logs:
//! - items in (distinct images), labeled by machine and by people, in
//!   review, failed, and lost (an image that is no item, or an item stuck:
//!   `queued`, in review without a task, labeled without a label);
//! - duplicated *effects*: predictions per (item, version), labels per
//!   review task, human labels per item, machine labels per (item,
//!   version), versions per run, runs per retrain request, runs trained to
//!   the end twice;
//! - duplicated *work*: every result a worker published (the workers run
//!   with `sieve_worker::published=debug`, a line per confirmed batch naming
//!   each item, version and job), and so each result published again for
//!   the same (item, version): the same job redelivered after its worker was
//!   killed, the same job redelivered otherwise (a broker restart), or
//!   another job for an (item, version) already predicted; training runs
//!   started more than once (`training started` per run, per process), less
//!   the restarts of a run whose worker was killed under it; review submits
//!   the reviewers had to send again after an unknown outcome.
//!
//! It exits non-zero if anything is lost, any effect duplicated, or a
//! training run started twice without its worker having died, or if a fault
//! did not recover. Results published twice after a kill are at-least-once
//! delivery doing its job: they are counted and shown, and each must have
//! been absorbed (no duplicated prediction).
//!
//! Stopping PostgreSQL or RabbitMQ disrupts anything else using them, so
//! before each it waits (up to `--quiet-wait-secs`) until no test binary
//! (`target/…/deps/…`) is running, and a guard starts the service again
//! however the run ends.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use sea_orm::{DatabaseConnection, DbBackend, FromQueryResult, Statement};
use serde::Serialize;
use sieve_shared::Settings;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::fashion_mnist::{self, Truth};
use sieve_scheduler::auth;
use sieve_scheduler::context::{self, Context};
use sieve_scheduler::db;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::policy::Policy;

#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    /// Fashion-MNIST images to ingest (the first N of the training split).
    #[arg(long, default_value_t = 10_000)]
    pub items: usize,
    /// `sieve-worker` processes (prediction and training), each started
    /// again at once after its kill.
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    /// Worker SIGKILLs (5 at least).
    #[arg(long, default_value_t = 5)]
    pub worker_kills: usize,
    /// Simulated reviewers labeling through the HTTP API.
    #[arg(long, default_value_t = 2)]
    pub reviewers: usize,
    /// Share of the items in the first chunk, the seed the reviewers label
    /// before the first retrain (the first model is untrained: all of it
    /// goes to review).
    #[arg(long, default_value_t = 0.1)]
    pub seed_share: f64,
    /// The project's confidence threshold: most items are labeled by
    /// machine once the model is trained, the rest go to review.
    #[arg(long, default_value_t = 0.6)]
    pub threshold: f32,
    /// How long RabbitMQ and PostgreSQL stay down.
    #[arg(long, default_value_t = 3)]
    pub outage_secs: u64,
    /// Before stopping RabbitMQ or PostgreSQL, wait at most this long for
    /// running test binaries (which share them) to finish.
    #[arg(long, default_value_t = 300)]
    pub quiet_wait_secs: u64,
    /// Give up waiting for a fault's moment, or its recovery, after this long.
    #[arg(long, default_value_t = 300)]
    pub step_timeout_secs: u64,
    /// Give up waiting for everything to settle at the end after this long.
    #[arg(long, default_value_t = 1200)]
    pub settle_timeout_secs: u64,
    /// Where `sieve` and `sieve-worker` are (default: beside this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Where the Fashion-MNIST IDX files are.
    #[arg(long, default_value = fashion_mnist::DEFAULT_DIR)]
    pub data_dir: PathBuf,
    /// Logs and the report go here (default: a new `sieve-chaos-TAG` in the
    /// system's temp dir); kept afterwards.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Keep the database, queues, Redis keys and store afterwards.
    #[arg(long)]
    pub keep: bool,
}

// ---------------------------------------------------------------------------
// The plan: which fault, at which moment.

/// What is done to the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// SIGKILL to a `sieve-worker`, started again at once.
    KillWorker,
    /// SIGKILL to `sieve serve`, started again at once.
    KillScheduler,
    /// `rabbitmqctl stop_app`, `--outage-secs`, `start_app`.
    RestartBroker,
    /// The PostgreSQL cluster stopped (`-m fast`), `--outage-secs`, started.
    RestartPostgres,
    /// Every Redis key under the run's own prefix deleted.
    FlushRedis,
}

impl Fault {
    /// Whether it stops a service the whole machine shares.
    pub fn stops_a_service(self) -> bool {
        matches!(self, Fault::RestartBroker | Fault::RestartPostgres)
    }

    pub fn label(self) -> &'static str {
        match self {
            Fault::KillWorker => "worker SIGKILL",
            Fault::KillScheduler => "scheduler SIGKILL",
            Fault::RestartBroker => "RabbitMQ restart",
            Fault::RestartPostgres => "PostgreSQL restart",
            Fault::FlushRedis => "Redis flush (own prefix)",
        }
    }
}

/// When, within a step, the fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Moment {
    /// While the step's chunk is being predicted and routed.
    Routing,
    /// While the step's ingest is inserting items (in `sieve serve`).
    Ingesting,
    /// While the step's training run trains (after its first progress
    /// event); a worker kill then hits the worker training it.
    Training,
    /// While the items are rescored by a newly activated version.
    Rescoring,
}

/// One step of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Start the ingest of the next chunk of images at the step's start.
    pub ingest: bool,
    /// Request a retrain at the step's start.
    pub retrain: bool,
    pub fault: Fault,
    pub moment: Moment,
}

/// The run's steps, in order: the seed (all to review) with a worker kill;
/// the first retrain, whose training worker is killed; a scheduler kill
/// during an ingest; a worker kill, the broker, PostgreSQL and Redis while
/// chunks are routed; a retrain while a chunk is routed, with the scheduler
/// killed during its training events; a worker kill during the rescore by
/// the new version; and more worker kills while chunks are routed until
/// there were `worker_kills` (5 at least).
pub fn plan(worker_kills: usize) -> Vec<Step> {
    use Fault::*;
    use Moment::*;
    let step = |ingest, retrain, fault, moment| Step {
        ingest,
        retrain,
        fault,
        moment,
    };
    let mut steps = vec![
        step(true, false, KillWorker, Routing),
        step(false, true, KillWorker, Training),
        step(true, false, KillScheduler, Ingesting),
        step(true, false, KillWorker, Routing),
        step(true, false, RestartBroker, Routing),
        step(true, false, RestartPostgres, Routing),
        step(true, false, FlushRedis, Routing),
        step(true, true, KillScheduler, Training),
        step(true, false, KillWorker, Rescoring),
    ];
    let planned = steps.iter().filter(|s| s.fault == KillWorker).count();
    for _ in planned..worker_kills.max(5) {
        steps.push(step(true, false, KillWorker, Routing));
    }
    steps
}

/// Images per chunk, one chunk per step that ingests: the first (the seed)
/// `seed_share` of `items`, the rest shared evenly; they add up to `items`.
pub fn chunk_sizes(items: usize, seed_share: f64, steps: &[Step]) -> Vec<usize> {
    let chunks = steps.iter().filter(|s| s.ingest).count();
    if chunks == 0 {
        return Vec::new();
    }
    let seed = ((items as f64 * seed_share.clamp(0.0, 1.0)).round() as usize).clamp(1, items);
    let rest = items - seed;
    let others = chunks - 1;
    let mut sizes = vec![seed];
    for i in 0..others {
        sizes.push(rest / others + usize::from(i < rest % others));
    }
    if others == 0 {
        sizes[0] = items;
    }
    sizes
}

// ---------------------------------------------------------------------------
// Counting from the logs.

/// Drop ANSI escape sequences (colours) from a log line.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The value of `key=` in a log line (up to the next space).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!(" {key}=");
    let start = line.find(&pattern)? + pattern.len();
    let rest = &line[start..];
    Some(rest.split_whitespace().next().unwrap_or(""))
}

/// One result a worker published: item, model version, job, and when
/// (the log line's RFC 3339 timestamp, which sorts as text).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Published {
    pub item: String,
    pub version: String,
    pub job: String,
    pub at: String,
}

/// The results a worker's `results published` line names (none for any
/// other line).
pub fn parse_published(line: &str) -> Vec<Published> {
    let line = strip_ansi(line);
    if !line.contains("results published") {
        return Vec::new();
    }
    let Some(list) = field(&line, "results") else {
        return Vec::new();
    };
    let at = line.split_whitespace().next().unwrap_or("");
    list.split(',')
        .filter_map(|entry| {
            let mut parts = entry.split(':');
            let (item, version, job) = (parts.next()?, parts.next()?, parts.next()?);
            Some(Published {
                item: item.to_owned(),
                version: version.to_owned(),
                job: job.to_owned(),
                at: at.to_owned(),
            })
        })
        .collect()
}

/// A training event a worker logged: the run and whether it started or
/// completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrainingLine {
    Started(String),
    Completed(String),
}

pub fn parse_training(line: &str) -> Option<TrainingLine> {
    let line = strip_ansi(line);
    let run = || field(&line, "run").map(str::to_owned);
    if line.contains(" training started ") {
        return run().map(TrainingLine::Started);
    }
    if line.contains(" training completed ") {
        return run().map(TrainingLine::Completed);
    }
    None
}

/// Results published, and those published again for an (item, version)
/// already published, by cause.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WorkCount {
    /// Results published in all.
    pub results: u64,
    /// Distinct (item, version).
    pub pairs: u64,
    /// The same job published again after its earlier publisher was
    /// SIGKILLed (killed after its publish, before its acknowledgement).
    pub redelivered_after_kill: u64,
    /// The same job published again, its earlier publisher alive then (a
    /// delivery given back by a broker restart, a stale acknowledgement).
    pub redelivered_otherwise: u64,
    /// Another job for an (item, version) already published: the
    /// scheduler sent the work twice.
    pub dispatched_again: u64,
    /// When the first and the last result published again by another job
    /// went out (log timestamps).
    pub dispatched_again_between: Option<(String, String)>,
    /// The same for the same job redelivered, either way.
    pub redelivered_between: Option<(String, String)>,
}

impl WorkCount {
    pub fn again(&self) -> u64 {
        self.redelivered_after_kill + self.redelivered_otherwise + self.dispatched_again
    }
}

/// Count published results, given per process instance (its lines) and
/// when that instance was SIGKILLed, if it was (a timestamp like the log
/// lines'); in the order they were published.
pub fn count_work(instances: &[(Vec<Published>, Option<String>)]) -> WorkCount {
    let mut all: Vec<(&Published, Option<&str>)> = instances
        .iter()
        .flat_map(|(published, killed)| published.iter().map(move |p| (p, killed.as_deref())))
        .collect();
    all.sort_by(|a, b| a.0.at.cmp(&b.0.at));
    let widen = |window: &mut Option<(String, String)>, at: &str| match window {
        Some((_, last)) => *last = at.to_owned(),
        None => *window = Some((at.to_owned(), at.to_owned())),
    };
    let mut count = WorkCount::default();
    /// A job seen for an (item, version), and when its publisher was killed.
    type Seen<'a> = (&'a str, Option<&'a str>);
    let mut seen: HashMap<(&str, &str), Vec<Seen>> = HashMap::new();
    for (p, killed) in all {
        count.results += 1;
        let jobs = seen.entry((&p.item, &p.version)).or_default();
        if !jobs.is_empty() {
            match jobs.iter().find(|(job, _)| *job == p.job) {
                Some((_, Some(kill))) if *kill <= p.at.as_str() => {
                    count.redelivered_after_kill += 1;
                }
                Some(_) => count.redelivered_otherwise += 1,
                None => count.dispatched_again += 1,
            }
            match jobs.iter().any(|(job, _)| *job == p.job) {
                true => widen(&mut count.redelivered_between, &p.at),
                false => widen(&mut count.dispatched_again_between, &p.at),
            }
        }
        jobs.push((&p.job, killed));
    }
    count.pairs = seen.len() as u64;
    count
}

/// Training runs started and completed, from the workers' logs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TrainingCount {
    pub runs: u64,
    pub starts: u64,
    /// Starts again of a run whose worker was SIGKILLed under it (no
    /// completion by that worker): recovery, not duplication.
    pub restarts_after_kill: u64,
    /// Starts beyond the first not explained by a kill.
    pub duplicate_starts: u64,
    /// Completions beyond the first of a run.
    pub duplicate_completions: u64,
}

/// Count per run, from each instance's training lines and whether it was
/// SIGKILLed.
pub fn count_training(instances: &[(Vec<TrainingLine>, bool)]) -> TrainingCount {
    #[derive(Default)]
    struct Run {
        starts: u64,
        interrupted: u64,
        completions: u64,
    }
    let mut runs: BTreeMap<&str, Run> = BTreeMap::new();
    for (lines, killed) in instances {
        let completed: HashSet<&str> = lines
            .iter()
            .filter_map(|l| match l {
                TrainingLine::Completed(run) => Some(run.as_str()),
                TrainingLine::Started(_) => None,
            })
            .collect();
        for line in lines {
            match line {
                TrainingLine::Started(run) => {
                    let r = runs.entry(run).or_default();
                    r.starts += 1;
                    if *killed && !completed.contains(run.as_str()) {
                        r.interrupted += 1;
                    }
                }
                TrainingLine::Completed(run) => runs.entry(run).or_default().completions += 1,
            }
        }
    }
    let mut count = TrainingCount {
        runs: runs.len() as u64,
        ..TrainingCount::default()
    };
    for run in runs.values() {
        count.starts += run.starts;
        // Every start after the first follows an interrupted one, unless
        // more starts than interruptions.
        let again = run.starts.saturating_sub(1);
        let explained = again.min(run.interrupted);
        count.restarts_after_kill += explained;
        count.duplicate_starts += again - explained;
        count.duplicate_completions += run.completions.saturating_sub(1);
    }
    count
}

/// Whether `argv0` is a test binary (cargo puts them in `target/…/deps/`):
/// one may be using PostgreSQL or RabbitMQ right now. The compiler, whose
/// arguments name `deps/` too, is not.
pub fn is_test_binary(argv0: &str) -> bool {
    argv0.contains("target") && argv0.contains("/deps/")
}

/// Test binaries running now, as `pid argv0`.
fn running_tests() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let argv0 = cmdline.split(|b| *b == 0).next()?;
            let argv0 = String::from_utf8_lossy(argv0).into_owned();
            is_test_binary(&argv0).then(|| format!("{pid} {argv0}"))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Services.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Service {
    RabbitMq,
    Postgres,
}

fn sh(program: &str, args: &[&str]) -> bool {
    match std::process::Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .status()
    {
        Ok(status) => status.success(),
        Err(err) => {
            eprintln!("chaos: could not run {program}: {err}");
            false
        }
    }
}

fn pg_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .unwrap_or_else(|| "15".into())
}

fn answers(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)).is_ok()
}

impl Service {
    fn port(self) -> u16 {
        match self {
            Service::RabbitMq => 5672,
            Service::Postgres => 5432,
        }
    }

    fn stop(self) -> bool {
        match self {
            Service::RabbitMq => sh("rabbitmqctl", &["-q", "stop_app"]),
            Service::Postgres => sh(
                "pg_ctlcluster",
                &[
                    "--skip-systemctl-redirect",
                    &pg_version(),
                    "main",
                    "stop",
                    "-m",
                    "fast",
                ],
            ),
        }
    }

    /// Start the service unless it answers, then wait until it does.
    fn start(self) {
        match self {
            Service::RabbitMq => {
                sh("rabbitmqctl", &["-q", "start_app"]);
                sh("rabbitmqctl", &["-q", "await_startup"]);
            }
            Service::Postgres if !answers(self.port()) => {
                sh(
                    "pg_ctlcluster",
                    &["--skip-systemctl-redirect", &pg_version(), "main", "start"],
                );
            }
            Service::Postgres => {}
        }
        let start = Instant::now();
        while !answers(self.port()) && start.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A service down: started again when dropped, however the run ends.
struct Outage {
    service: Service,
    up: bool,
}

impl Outage {
    fn begin(service: Service) -> anyhow::Result<Self> {
        let outage = Self { service, up: false };
        if !service.stop() {
            bail!("could not stop {service:?}");
        }
        Ok(outage)
    }

    fn end(mut self) {
        self.service.start();
        self.up = true;
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if !self.up {
            eprintln!("chaos: starting {:?} again", self.service);
            self.service.start();
        }
    }
}

// ---------------------------------------------------------------------------
// Processes.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Scheduler,
    Worker,
}

/// One process started by the run.
#[derive(Debug, Serialize)]
struct Instance {
    role: Kind,
    slot: usize,
    generation: usize,
    pid: u32,
    log: PathBuf,
    killed: bool,
    /// When it was SIGKILLed, as the logs write time.
    killed_at: Option<String>,
}

struct Fleet {
    bin_dir: PathBuf,
    logs: PathBuf,
    env: Vec<(String, String)>,
    api_port: u16,
    worker_ports: Vec<u16>,
    scheduler: Option<(Child, usize)>,
    workers: Vec<Option<(Child, usize)>>,
    instances: Vec<Instance>,
}

/// A free port on the loopback interface, for a process to bind later.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

impl Fleet {
    fn spawn(&mut self, role: Kind, slot: usize) -> anyhow::Result<(Child, usize)> {
        let generation = self
            .instances
            .iter()
            .filter(|i| i.role == role && i.slot == slot)
            .count()
            + 1;
        let (binary, name, args): (&str, String, Vec<String>) = match role {
            Kind::Scheduler => (
                "sieve",
                format!("scheduler.{generation}"),
                vec!["serve".into()],
            ),
            Kind::Worker => (
                "sieve-worker",
                format!("worker-{}.{generation}", slot + 1),
                vec![
                    "--capabilities".into(),
                    "prelabel,train".into(),
                    "--listen".into(),
                    format!("127.0.0.1:{}", self.worker_ports[slot]),
                ],
            ),
        };
        let log = self.logs.join(format!("{name}.log"));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(self.bin_dir.join(binary))
            .args(&args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        let pid = child.id().unwrap_or(0);
        self.instances.push(Instance {
            role,
            slot,
            generation,
            pid,
            log,
            killed: false,
            killed_at: None,
        });
        Ok((child, self.instances.len() - 1))
    }

    fn start_scheduler(&mut self) -> anyhow::Result<()> {
        let started = self.spawn(Kind::Scheduler, 0)?;
        self.scheduler = Some(started);
        Ok(())
    }

    fn start_worker(&mut self, slot: usize) -> anyhow::Result<()> {
        let started = self.spawn(Kind::Worker, slot)?;
        self.workers[slot] = Some(started);
        Ok(())
    }

    /// SIGKILL (tokio's `kill`), reaped, marked killed.
    async fn kill(&mut self, role: Kind, slot: usize) -> anyhow::Result<u32> {
        let taken = match role {
            Kind::Scheduler => self.scheduler.take(),
            Kind::Worker => self.workers[slot].take(),
        };
        let (mut child, index) = taken.context("no such process running")?;
        child.kill().await.context("SIGKILL")?;
        self.instances[index].killed = true;
        self.instances[index].killed_at =
            Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
        Ok(self.instances[index].pid)
    }

    fn worker_pids(&self) -> Vec<u32> {
        self.workers
            .iter()
            .flatten()
            .map(|(_, i)| self.instances[*i].pid)
            .collect()
    }

    /// The worker slot whose running process logged starting `run`.
    fn trainer_of(&self, run: Uuid) -> Option<usize> {
        let needle = format!("run={run}");
        self.workers.iter().enumerate().find_map(|(slot, w)| {
            let (_, index) = w.as_ref()?;
            let text = std::fs::read_to_string(&self.instances[*index].log).ok()?;
            text.lines()
                .map(strip_ansi)
                .any(|l| l.contains(" training started ") && l.contains(&needle))
                .then_some(slot)
        })
    }

    /// SIGTERM to everything still running, then SIGKILL after 30 s.
    async fn stop_all(&mut self) {
        let mut children: Vec<Child> = Vec::new();
        children.extend(
            self.workers
                .iter_mut()
                .filter_map(Option::take)
                .map(|(c, _)| c),
        );
        children.extend(self.scheduler.take().map(|(c, _)| c));
        for child in &children {
            if let Some(pid) = child.id() {
                sh("kill", &["-TERM", &pid.to_string()]);
            }
        }
        for mut child in children {
            if tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .is_err()
            {
                child.kill().await.ok();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The HTTP side: what an operator, an ML engineer and reviewers send.

#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
    admin: String,
    ml: String,
    reviewer: String,
}

#[derive(serde::Deserialize)]
struct Claimed {
    task_id: Uuid,
    fencing_token: i64,
    source: String,
}

/// Reviewer statistics, shared by the reviewer tasks.
#[derive(Default)]
struct ReviewTally {
    claims: AtomicU64,
    labels: AtomicU64,
    /// Submits sent again because the first answer never came (the
    /// scheduler died, the database was down).
    resubmits: AtomicU64,
    /// Submits refused (409): a resubmit of a label already written, a
    /// lease taken over.
    refused: AtomicU64,
    errors: AtomicU64,
    /// Per task: how many submits were acknowledged (2xx).
    acknowledged: Mutex<HashMap<Uuid, u32>>,
}

impl Api {
    async fn healthy(&self) -> bool {
        matches!(
            self.http
                .get(format!("{}/healthz", self.base))
                .timeout(Duration::from_secs(2))
                .send()
                .await,
            Ok(r) if r.status().is_success()
        )
    }

    async fn post(
        &self,
        token: &str,
        path: &str,
        body: serde_json::Value,
    ) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(format!("{}/api/v1{path}", self.base))
            .bearer_auth(token)
            .timeout(Duration::from_secs(30))
            .json(&body)
            .send()
            .await
    }

    /// POST until the scheduler gives an answer (it may be down for a
    /// while): a response, whatever its status.
    async fn post_answered(
        &self,
        token: &str,
        path: &str,
        body: serde_json::Value,
        timeout: Duration,
    ) -> anyhow::Result<(reqwest::StatusCode, serde_json::Value)> {
        let start = Instant::now();
        loop {
            match self.post(token, path, body.clone()).await {
                Ok(r) if !r.status().is_server_error() => {
                    let status = r.status();
                    let body = r.json().await.unwrap_or_default();
                    return Ok((status, body));
                }
                Ok(r) => eprintln!("chaos: POST {path}: {}", r.status()),
                Err(err) => {
                    if start.elapsed() > timeout {
                        bail!("POST {path}: no answer after {timeout:?}: {err}");
                    }
                }
            }
            if start.elapsed() > timeout {
                bail!("POST {path}: no answer after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn ingest_state(&self, id: Uuid) -> Option<serde_json::Value> {
        let r = self
            .http
            .get(format!("{}/api/v1/ingests/{id}", self.base))
            .bearer_auth(&self.admin)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())?;
        r.json().await.ok()
    }
}

async fn review_loop(
    api: Api,
    project: String,
    truth: Arc<Truth>,
    tally: Arc<ReviewTally>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let claimed = api
            .post(
                &api.reviewer,
                &format!("/projects/{project}/review/next"),
                serde_json::json!({}),
            )
            .await;
        let task: Claimed = match claimed {
            Ok(r) if r.status() == reqwest::StatusCode::NO_CONTENT => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
            Ok(r) if r.status().is_success() => match r.json().await {
                Ok(task) => task,
                Err(_) => {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
            _ => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        tally.claims.fetch_add(1, Ordering::Relaxed);
        let class = truth.class_of(&task.source).unwrap_or(0);
        let body = serde_json::json!({
            "fencing_token": task.fencing_token,
            "class": fashion_mnist::CLASSES[class],
        });
        // Until the scheduler gives an answer: a submit whose answer was
        // lost may have been written, and is sent again as it was.
        let mut first = true;
        loop {
            let sent = api
                .post(
                    &api.reviewer,
                    &format!("/review/{}/submit", task.task_id),
                    body.clone(),
                )
                .await;
            if !first {
                tally.resubmits.fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            match sent {
                Ok(r) if r.status().is_success() => {
                    tally.labels.fetch_add(1, Ordering::Relaxed);
                    *tally
                        .acknowledged
                        .lock()
                        .await
                        .entry(task.task_id)
                        .or_default() += 1;
                    break;
                }
                Ok(r) if r.status().is_client_error() => {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                _ if stop.load(Ordering::Relaxed) => break,
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Reading the database.

#[derive(Debug, FromQueryResult)]
struct Count {
    n: i64,
}

async fn count(db: &DatabaseConnection, sql: &str, project: Uuid) -> anyhow::Result<i64> {
    Ok(Count::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        [project.into()],
    ))
    .one(db)
    .await?
    .map_or(0, |c| c.n))
}

const PROGRESS: &str = "SELECT (SELECT count(*) FROM predictions p JOIN items i ON i.id = p.item_id \
     WHERE i.project_id = $1) + (SELECT count(*) FROM labels l JOIN items i ON i.id = l.item_id \
     WHERE i.project_id = $1) AS n";
const PREDICTIONS: &str = "SELECT count(*) AS n FROM predictions p JOIN items i ON i.id = p.item_id \
     WHERE i.project_id = $1";
const ITEMS: &str = "SELECT count(*) AS n FROM items WHERE project_id = $1";
const QUEUED: &str = "SELECT count(*) AS n FROM items WHERE project_id = $1 AND state = 'queued'";
const OPEN_TASKS: &str = "SELECT count(*) AS n FROM review_tasks WHERE project_id = $1 \
     AND state IN ('open', 'claimed')";
/// Items routing can still move that lack a prediction by the active
/// version (what a rescore still has to do).
const UNRESCORED: &str = "SELECT count(*) AS n FROM items i JOIN projects p ON p.id = i.project_id \
     WHERE i.project_id = $1 AND i.state IN ('queued', 'in_review', 'auto_labeled') \
     AND NOT EXISTS (SELECT 1 FROM predictions x WHERE x.item_id = i.id \
                     AND x.model_version_id = p.active_model_version_id) \
     AND NOT EXISTS (SELECT 1 FROM review_tasks t WHERE t.item_id = i.id AND t.state = 'claimed')";
const RUNS_ACTIVE: &str = "SELECT count(*) AS n FROM training_runs WHERE project_id = $1 \
     AND state IN ('queued', 'running')";

#[derive(Debug, FromQueryResult)]
struct RunRow {
    id: Uuid,
    state: String,
    progress: Option<serde_json::Value>,
    model_version_id: Uuid,
    error: Option<String>,
}

async fn run_row(db: &DatabaseConnection, run: Uuid) -> Option<RunRow> {
    RunRow::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT id, state, progress, model_version_id, error FROM training_runs WHERE id = $1",
        [run.into()],
    ))
    .one(db)
    .await
    .ok()
    .flatten()
}

#[derive(Debug, FromQueryResult)]
struct VersionRow {
    activated_at: Option<chrono::DateTime<chrono::FixedOffset>>,
    status_reason: Option<String>,
}

async fn active_version(db: &DatabaseConnection, project: Uuid) -> Option<Uuid> {
    #[derive(FromQueryResult)]
    struct Active {
        v: Option<Uuid>,
    }
    Active::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT active_model_version_id AS v FROM projects WHERE id = $1",
        [project.into()],
    ))
    .one(db)
    .await
    .ok()
    .flatten()
    .and_then(|a| a.v)
}

// ---------------------------------------------------------------------------
// The run.

/// One fault as it happened.
#[derive(Debug, Serialize)]
pub struct FaultRecord {
    pub step: usize,
    pub fault: Fault,
    pub moment: Moment,
    /// Whether the moment was reached (otherwise the fault struck at the
    /// step's timeout).
    pub at_moment: bool,
    /// Seconds since the run started.
    pub at_s: f64,
    /// How long the process or service was away.
    pub down_s: f64,
    /// From the fault until the system had recovered (`None`: it had not
    /// within `--step-timeout-secs`).
    pub recovered_s: Option<f64>,
    pub note: String,
}

/// The figures of a run.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    pub items_in: u64,
    pub items: u64,
    pub machine_labeled: u64,
    pub human_labeled: u64,
    pub in_review: u64,
    pub queued: u64,
    pub failed: u64,
    /// Images that are no item.
    pub missing: u64,
    /// Items in review without an open task, or labeled without a label.
    pub stuck: u64,
    pub lost: u64,
    pub unrescored: u64,
    pub duplicate_predictions: u64,
    pub duplicate_labels_per_task: u64,
    pub duplicate_human_labels_per_item: u64,
    pub duplicate_machine_labels: u64,
    pub duplicate_open_tasks: u64,
    pub duplicate_versions_per_run: u64,
    pub training_runs: u64,
    pub retrain_requests: u64,
    pub duplicate_runs_per_request: u64,
    pub dead_letters: u64,
    pub work: WorkCount,
    pub training: TrainingCount,
    pub review_claims: u64,
    pub review_labels: u64,
    pub review_resubmits: u64,
    pub review_refused: u64,
    pub review_acknowledged_twice: u64,
    pub ingest_requests: u64,
    pub wall_s: f64,
}

struct Run {
    args: ChaosArgs,
    settings: Settings,
    ctx: Context,
    api: Api,
    fleet: Fleet,
    project: Uuid,
    project_name: String,
    started: Instant,
    started_at: chrono::DateTime<chrono::Utc>,
    faults: Vec<FaultRecord>,
    retrain_requests: u64,
    ingest_requests: u64,
    timeout: Duration,
}

pub async fn run(settings: Settings, args: &ChaosArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.workers >= 2,
        "--workers: 2 at least (one is killed at a time)"
    );
    anyhow::ensure!(args.items >= 100, "--items: 100 at least");
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()
            .context("finding this executable")?
            .parent()
            .context("this executable's directory")?
            .to_owned(),
    };
    for binary in ["sieve", "sieve-worker"] {
        if !bin_dir.join(binary).is_file() {
            bail!(
                "no {} beside this binary: build them first with \
                 `cargo build --release -p sieve-scheduler -p sieve-worker` \
                 (or without --release for a debug run, as sieve-tools was built), \
                 or name their directory with --bin-dir",
                bin_dir.join(binary).display()
            );
        }
    }
    for (name, port) in [("PostgreSQL", 5432), ("RabbitMQ", 5672), ("Redis", 6379)] {
        anyhow::ensure!(
            answers(port),
            "{name} does not answer on 127.0.0.1:{port} (ops/ensure-services.sh starts it)"
        );
    }

    let id = Uuid::now_v7().simple().to_string();
    let tag = id[id.len() - 12..].to_owned();
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("sieve-chaos-{tag}")));
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut settings = settings;
    settings.database.url =
        crate::bench_ingest::with_database(&settings.database.url, &format!("sieve_chaos_{tag}"))?;
    settings.broker.prefix = format!("chaos-{tag}");
    settings.redis.prefix = format!("chaos-{tag}");
    settings.store.root = work.join("store");
    std::fs::create_dir_all(&settings.store.root)?;
    println!(
        "chaos run {tag}: work dir {} (logs in logs/), database sieve_chaos_{tag}, prefix chaos-{tag}",
        work.display()
    );

    db::create_database_if_missing(&settings.database.url).await?;
    let outcome = tokio::select! {
        outcome = chaos(&settings, args, bin_dir, &work, &logs) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    // Everything the run started is stopped (kill on drop) and every service
    // is up again (the outage guards) by now.
    if args.keep {
        println!(
            "kept: database sieve_chaos_{tag}, queues and Redis keys chaos-{tag}.*, store {}",
            settings.store.root.display()
        );
    } else {
        cleanup(&settings).await;
    }
    println!("logs and report: {}", work.display());
    outcome
}

async fn cleanup(settings: &Settings) {
    let mut problems = Vec::new();
    match sieve_shared::broker::connect(&settings.broker, "sieve-tools chaos cleanup").await {
        Ok(conn) => {
            let deleted = async {
                let channel = conn.create_channel().await?;
                context::topology(settings).delete(&channel).await
            }
            .await;
            if let Err(err) = deleted {
                problems.push(format!("deleting the queues: {err}"));
            }
            conn.close(200, "chaos done".into()).await.ok();
        }
        Err(err) => problems.push(format!("deleting the queues: {err}")),
    }
    if let Err(err) = flush_redis(settings).await {
        problems.push(format!("deleting the Redis keys: {err:#}"));
    }
    if let Err(err) = db::drop_database(&settings.database.url).await {
        problems.push(format!("dropping the database: {err:#}"));
    }
    if let Err(err) = std::fs::remove_dir_all(&settings.store.root) {
        problems.push(format!("removing the store: {err}"));
    }
    for problem in problems {
        eprintln!("cleanup: {problem}");
    }
}

/// Delete every key under the run's Redis prefix; how many there were.
async fn flush_redis(settings: &Settings) -> anyhow::Result<usize> {
    let mut redis = sieve_shared::live::connect(&settings.redis.url).await?;
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}:*", settings.redis.prefix))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(&keys)
            .query_async::<()>(&mut redis)
            .await?;
    }
    Ok(keys.len())
}

async fn chaos(
    settings: &Settings,
    args: &ChaosArgs,
    bin_dir: PathBuf,
    work: &Path,
    logs: &Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let conn = db::connect(&settings.database).await?;
    db::migrate(&conn).await?;
    conn.close().await.ok();
    let ctx = Context::connect(settings.clone()).await?;

    // The images: the first N of the training split, in chunks of the
    // store (ingested in place, as `store:chaos/chunk-NN`).
    let steps = plan(args.worker_kills);
    let sizes = chunk_sizes(args.items, args.seed_share, &steps);
    let images = settings.store.root.join("chaos");
    let all = images.join("all");
    let (exported, truth) = fashion_mnist::export_first(
        &args.data_dir,
        args.items,
        &all,
        &fashion_mnist::Classes::all(),
    )
    .with_context(|| {
        format!(
            "reading Fashion-MNIST from {} (apt-get install dataset-fashion-mnist)",
            args.data_dir.display()
        )
    })?;
    let mut names: Vec<PathBuf> = std::fs::read_dir(&all)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    names.sort();
    let mut distinct = HashSet::new();
    let mut offset = 0;
    for (chunk, size) in sizes.iter().enumerate() {
        let dir = images.join(format!("chunk-{chunk:02}"));
        std::fs::create_dir_all(&dir)?;
        for path in &names[offset..offset + size] {
            distinct.insert(sieve_shared::store::sha256_hex(&std::fs::read(path)?));
            std::fs::rename(path, dir.join(path.file_name().context("a file name")?))?;
        }
        offset += size;
    }
    std::fs::remove_dir(&all).ok();
    println!(
        "{exported} Fashion-MNIST images ({} distinct) in {} chunks: {sizes:?}",
        distinct.len(),
        sizes.len()
    );

    // The people: tokens made directly in the run's database.
    let api_port = free_port()?;
    let api = Api {
        http: reqwest::Client::new(),
        base: format!("http://127.0.0.1:{api_port}"),
        admin: auth::create_token(&ctx.db, "chaos-admin", Role::Admin).await?,
        ml: auth::create_token(&ctx.db, "chaos-ml", Role::Ml).await?,
        reviewer: auth::create_token(&ctx.db, "chaos-reviewer", Role::Reviewer).await?,
    };
    let mut env: Vec<(String, String)> = vec![
        ("SIEVE_DATABASE__URL".into(), settings.database.url.clone()),
        (
            "SIEVE_BROKER__PREFIX".into(),
            settings.broker.prefix.clone(),
        ),
        ("SIEVE_REDIS__PREFIX".into(), settings.redis.prefix.clone()),
        (
            "SIEVE_STORE__ROOT".into(),
            settings.store.root.display().to_string(),
        ),
        ("SIEVE_HTTP__BIND".into(), format!("127.0.0.1:{api_port}")),
        ("SIEVE_HTTP__API_URL".into(), api.base.clone()),
        // Smaller ingest batches: an ingest lasts long enough to be killed.
        ("SIEVE_INGEST__BATCH_SIZE".into(), "100".into()),
        // A claim lost with a killed reviewer connection returns sooner.
        ("SIEVE_REVIEW__LEASE_SECONDS".into(), "60".into()),
        ("SIEVE_WORKER__HEARTBEAT_SECONDS".into(), "2".into()),
        ("NO_COLOR".into(), "1".into()),
        (
            "RUST_LOG".into(),
            "info,sqlx=warn,sea_orm=warn,lapin=warn,sieve_worker::published=debug".into(),
        ),
    ];
    if let Ok(config) = std::env::var("SIEVE_CONFIG") {
        env.push(("SIEVE_CONFIG".into(), config));
    }
    let worker_ports = (0..args.workers)
        .map(|_| free_port())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut fleet = Fleet {
        bin_dir,
        logs: logs.to_owned(),
        env,
        api_port,
        worker_ports,
        scheduler: None,
        workers: (0..args.workers).map(|_| None).collect(),
        instances: Vec::new(),
    };
    fleet.start_scheduler()?;
    for slot in 0..args.workers {
        fleet.start_worker(slot)?;
    }
    let timeout = Duration::from_secs(args.step_timeout_secs);
    wait_until("the scheduler's /healthz", timeout, async || {
        api.healthy().await
    })
    .await?;

    // The project, over HTTP, and its first (untrained) model.
    let project_name = format!("chaos-{}", &fleet.api_port);
    let policy = Policy {
        confidence_threshold: args.threshold,
        ..Policy::default()
    };
    let classes: Vec<&str> = fashion_mnist::CLASSES.to_vec();
    let (status, body) = api
        .post_answered(
            &api.admin,
            "/projects",
            serde_json::json!({ "name": project_name, "classes": classes, "policy": policy }),
            timeout,
        )
        .await?;
    anyhow::ensure!(status.is_success(), "creating the project: {status} {body}");
    let project: Uuid = body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("the project has no id: {body}"))?;
    wait_until("the first model", timeout, async || {
        active_version(&ctx.db, project).await.is_some()
    })
    .await?;
    println!(
        "project {project_name}: first model active after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let tally = Arc::new(ReviewTally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let truth = Arc::new(truth);
    let reviewers: Vec<_> = (0..args.reviewers.max(1))
        .map(|_| {
            tokio::spawn(review_loop(
                api.clone(),
                project_name.clone(),
                truth.clone(),
                tally.clone(),
                stop.clone(),
            ))
        })
        .collect();

    let mut run = Run {
        args: args.clone(),
        settings: settings.clone(),
        ctx,
        api,
        fleet,
        project,
        project_name,
        started,
        started_at,
        faults: Vec::new(),
        retrain_requests: 0,
        ingest_requests: 0,
        timeout,
    };
    let outcome = run.steps(&steps, &sizes).await;
    let settled = match &outcome {
        Ok(()) => run.settle().await,
        Err(_) => Ok(()),
    };
    stop.store(true, Ordering::Relaxed);
    for reviewer in reviewers {
        reviewer.await.ok();
    }
    run.fleet.stop_all().await;
    outcome?;
    let wall = run.started.elapsed().as_secs_f64();
    let mut figures = run.figures(&distinct, &tally).await?;
    figures.wall_s = wall;
    figures.ingest_requests = run.ingest_requests;
    let failures = verdict(&figures, &run.faults, settled.as_ref().err());
    print_report(&run, &figures, &failures);
    let report = serde_json::json!({
        "items": args.items,
        "workers": args.workers,
        "faults": run.faults,
        "figures": figures,
        "instances": run.fleet.instances,
        "failures": failures,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
    });
    std::fs::write(
        work.join("report.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    if !failures.is_empty() {
        bail!("the chaos run failed: {}", failures.join("; "));
    }
    Ok(())
}

async fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done().await {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// An ingest in flight: its chunk, its request and the scheduler that runs it.
struct Ingesting {
    prefix: String,
    id: Uuid,
    scheduler: usize,
}

impl Run {
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    async fn db_count(&self, sql: &str) -> Option<i64> {
        count(&self.ctx.db, sql, self.project).await.ok()
    }

    fn scheduler_generation(&self) -> usize {
        self.fleet.scheduler.as_ref().map_or(0, |(_, i)| *i)
    }

    async fn steps(&mut self, steps: &[Step], sizes: &[usize]) -> anyhow::Result<()> {
        let mut chunk = 0;
        for (n, step) in steps.iter().enumerate() {
            let n = n + 1;
            if step.fault.stops_a_service() {
                // Before the step starts its work, so that its moment is
                // not spent waiting.
                self.wait_quiet().await?;
            }
            let before = self.db_count(PROGRESS).await.unwrap_or(0);
            let items_before = self.db_count(ITEMS).await.unwrap_or(0);
            let version_before = active_version(&self.ctx.db, self.project).await;
            let ingest = if step.ingest {
                let prefix = format!("store:chaos/chunk-{chunk:02}");
                println!(
                    "[{:6.1} s] step {n}: ingest {prefix} ({} images)",
                    self.now(),
                    sizes[chunk]
                );
                chunk += 1;
                Some(self.start_ingest(&prefix).await?)
            } else {
                None
            };
            let run = if step.retrain {
                Some(self.retrain().await?)
            } else {
                None
            };
            let (reached, note) = self
                .moment(step, before, items_before, version_before, run)
                .await;
            self.inject(n, step, reached, note, run).await?;
            if let Some(ingest) = ingest {
                self.finish_ingest(ingest).await?;
            }
            if let Some(run) = run {
                self.finish_run(run).await?;
            }
            if n == 1 {
                // The seed, all in review: the reviewers label it before
                // the first retrain.
                println!("[{:6.1} s] waiting for the seed to be labeled", self.now());
                let db = &self.ctx.db;
                let project = self.project;
                wait_until("the seed to be labeled", self.timeout * 4, async || {
                    count(db, QUEUED, project).await.ok() == Some(0)
                        && count(db, OPEN_TASKS, project).await.ok() == Some(0)
                })
                .await?;
            }
        }
        Ok(())
    }

    async fn start_ingest(&mut self, prefix: &str) -> anyhow::Result<Ingesting> {
        loop {
            self.ingest_requests += 1;
            let (status, body) = self
                .api
                .post_answered(
                    &self.api.admin,
                    &format!("/projects/{}/ingest", self.project_name),
                    serde_json::json!({ "prefix": prefix }),
                    self.timeout,
                )
                .await?;
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            anyhow::ensure!(status.is_success(), "ingest of {prefix}: {status} {body}");
            let id = body["id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("the ingest has no id: {body}"))?;
            return Ok(Ingesting {
                prefix: prefix.to_owned(),
                id,
                scheduler: self.scheduler_generation(),
            });
        }
    }

    /// Wait until the chunk's ingest is done; one whose scheduler died
    /// (or that reads interrupted) is started again, as an operator would.
    async fn finish_ingest(&mut self, mut ingest: Ingesting) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            anyhow::ensure!(
                start.elapsed() < self.timeout * 2,
                "the ingest of {} did not finish",
                ingest.prefix
            );
            let state = self.api.ingest_state(ingest.id).await;
            if state.as_ref().is_some_and(|s| s["state"] == "done") {
                return Ok(());
            }
            if ingest.scheduler != self.scheduler_generation() {
                println!(
                    "[{:6.1} s] the scheduler running the ingest of {} died: ingesting it again",
                    self.now(),
                    ingest.prefix
                );
                ingest = self.start_ingest(&ingest.prefix.clone()).await?;
                continue;
            }
            match state {
                Some(state) if state["state"] == "interrupted" || state["state"] == "failed" => {
                    println!(
                        "[{:6.1} s] the ingest of {} ended {}: ingesting it again",
                        self.now(),
                        ingest.prefix,
                        state["state"]
                    );
                    ingest = self.start_ingest(&ingest.prefix.clone()).await?;
                }
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }

    async fn retrain(&mut self) -> anyhow::Result<Uuid> {
        self.retrain_requests += 1;
        let start = Instant::now();
        loop {
            let (status, body) = self
                .api
                .post_answered(
                    &self.api.ml,
                    &format!("/projects/{}/retrain", self.project_name),
                    serde_json::json!({}),
                    self.timeout,
                )
                .await?;
            if status.is_success() {
                let run = body["run_id"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .with_context(|| format!("the retrain has no run id: {body}"))?;
                println!("[{:6.1} s] retrain requested: run {run}", self.now());
                return Ok(run);
            }
            // 409: a run is in progress (say, the last one's): try again
            // once it has ended.
            anyhow::ensure!(
                start.elapsed() < self.timeout,
                "the retrain was refused: {status} {body}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn finish_run(&self, run: Uuid) -> anyhow::Result<()> {
        let db = &self.ctx.db;
        let mut ended = None;
        wait_until("the training run to end", self.timeout * 2, async || {
            let Some(row) = run_row(db, run).await else {
                return false;
            };
            match row.state.as_str() {
                "succeeded" => {
                    // Promotion decided: activated, or kept with a reason.
                    let decided = VersionRow::find_by_statement(Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        "SELECT activated_at, status_reason FROM model_versions WHERE id = $1",
                        [row.model_version_id.into()],
                    ))
                    .one(db)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|v| v.activated_at.is_some() || v.status_reason.is_some());
                    if decided {
                        ended = Some(row);
                    }
                    decided
                }
                "failed" | "cancelled" => {
                    ended = Some(row);
                    true
                }
                _ => false,
            }
        })
        .await?;
        if let Some(row) = ended {
            println!(
                "[{:6.1} s] run {} ended {}{}",
                self.now(),
                row.id,
                row.state,
                row.error.map(|e| format!(": {e}")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Wait for the step's moment; whether it came, and what it was.
    async fn moment(
        &self,
        step: &Step,
        progress_before: i64,
        items_before: i64,
        version_before: Option<Uuid>,
        run: Option<Uuid>,
    ) -> (bool, String) {
        let start = Instant::now();
        let db = &self.ctx.db;
        let poll = match step.moment {
            Moment::Ingesting => Duration::from_millis(20),
            _ => Duration::from_millis(100),
        };
        let mut last_predictions = self.db_count(PREDICTIONS).await.unwrap_or(0);
        while start.elapsed() < self.timeout {
            match step.moment {
                Moment::Routing => {
                    // Predictions or labels moving, with work still waiting
                    // (items to predict and route, tasks to label).
                    let progress = self.db_count(PROGRESS).await.unwrap_or(0);
                    let queued = self.db_count(QUEUED).await.unwrap_or(0);
                    let open = self.db_count(OPEN_TASKS).await.unwrap_or(0);
                    if progress > progress_before && queued + open > 0 {
                        return (true, format!("{queued} items queued, {open} tasks open"));
                    }
                }
                Moment::Ingesting => {
                    let items = self.db_count(ITEMS).await.unwrap_or(0);
                    if items > items_before {
                        return (
                            true,
                            format!("{} items of the chunk in", items - items_before),
                        );
                    }
                }
                Moment::Training => {
                    if let Some(row) = match run {
                        Some(run) => run_row(db, run).await,
                        None => None,
                    } && row.state == "running"
                        && row.progress.is_some()
                    {
                        let epoch = row
                            .progress
                            .as_ref()
                            .and_then(|p| p.get("epoch").cloned())
                            .unwrap_or_default();
                        return (true, format!("run training, epoch {epoch}"));
                    }
                }
                Moment::Rescoring => {
                    let active = active_version(db, self.project).await;
                    let waiting = self.db_count(UNRESCORED).await.unwrap_or(0);
                    let predictions = self.db_count(PREDICTIONS).await.unwrap_or(0);
                    if active.is_some()
                        && version_before.is_some()
                        && waiting > 0
                        && predictions > last_predictions
                    {
                        return (true, format!("{waiting} items still to rescore"));
                    }
                    last_predictions = predictions;
                }
            }
            tokio::time::sleep(poll).await;
        }
        (false, String::new())
    }

    async fn inject(
        &mut self,
        n: usize,
        step: &Step,
        at_moment: bool,
        mut note: String,
        run: Option<Uuid>,
    ) -> anyhow::Result<()> {
        if step.fault.stops_a_service() {
            self.wait_quiet().await?;
        }
        let at = self.now();
        let fault_started = Instant::now();
        let progress_at = self.db_count(PROGRESS).await.unwrap_or(0);
        match step.fault {
            Fault::KillWorker => {
                let kills = self
                    .faults
                    .iter()
                    .filter(|f| f.fault == Fault::KillWorker)
                    .count();
                let slot = run
                    .and_then(|run| self.fleet.trainer_of(run))
                    .inspect(|slot| {
                        note.push_str(&format!("; the worker training it, {}", slot + 1))
                    })
                    .unwrap_or(kills % self.args.workers);
                let pid = self.fleet.kill(Kind::Worker, slot).await?;
                self.fleet.start_worker(slot)?;
                note.push_str(&format!("; worker {} (pid {pid})", slot + 1));
            }
            Fault::KillScheduler => {
                let pid = self.fleet.kill(Kind::Scheduler, 0).await?;
                self.fleet.start_scheduler()?;
                note.push_str(&format!("; pid {pid}"));
            }
            Fault::RestartBroker | Fault::RestartPostgres => {
                let service = if step.fault == Fault::RestartBroker {
                    Service::RabbitMq
                } else {
                    Service::Postgres
                };
                let outage_for = Duration::from_secs(self.args.outage_secs);
                tokio::task::block_in_place(|| -> anyhow::Result<()> {
                    let outage = Outage::begin(service)?;
                    std::thread::sleep(outage_for);
                    outage.end();
                    Ok(())
                })?;
            }
            Fault::FlushRedis => {
                let keys = flush_redis(&self.settings).await?;
                note.push_str(&format!("; {keys} keys deleted"));
            }
        }
        let down = fault_started.elapsed().as_secs_f64();
        let recovered = self.recovered(progress_at).await;
        let recovered_s = recovered.then(|| fault_started.elapsed().as_secs_f64());
        println!(
            "[{at:6.1} s] step {n}: {} during {:?}{} ({note}): down {down:.1} s, recovered {}",
            step.fault.label(),
            step.moment,
            if at_moment {
                ""
            } else {
                " (moment not reached)"
            },
            recovered_s.map_or("NOT".to_owned(), |s| format!("after {s:.1} s"))
        );
        self.faults.push(FaultRecord {
            step: n,
            fault: step.fault,
            moment: step.moment,
            at_moment,
            at_s: at,
            down_s: down,
            recovered_s,
            note: note.trim_start_matches("; ").to_owned(),
        });
        Ok(())
    }

    /// Wait until no test binary runs (they share PostgreSQL and RabbitMQ).
    async fn wait_quiet(&self) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut said = false;
        loop {
            let tests = running_tests();
            if tests.is_empty() {
                return Ok(());
            }
            if !said {
                println!(
                    "[{:6.1} s] waiting for test binaries to finish before a service restart: {}",
                    self.now(),
                    tests.join(", ")
                );
                said = true;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(self.args.quiet_wait_secs),
                "test binaries still running after {} s; not restarting a shared service under them",
                self.args.quiet_wait_secs
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Recovered: the scheduler's and every worker's `/healthz` answer 200,
    /// every worker's heartbeat is in Redis, and while work waits (items
    /// queued, tasks open) predictions or labels moved since the fault.
    async fn recovered(&self, progress_at: i64) -> bool {
        let start = Instant::now();
        while start.elapsed() < self.timeout {
            if self.healthy(progress_at).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    async fn healthy(&self, progress_at: i64) -> bool {
        if !self.api.healthy().await {
            return false;
        }
        for port in &self.fleet.worker_ports {
            let ok = matches!(
                self.api.http
                    .get(format!("http://127.0.0.1:{port}/healthz"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await,
                Ok(r) if r.status().is_success()
            );
            if !ok {
                return false;
            }
        }
        let Ok(beating) = sieve_scheduler::operate::workers::list(&self.settings.redis).await
        else {
            return false;
        };
        let pids = self.fleet.worker_pids();
        let all_beat = pids.iter().all(|pid| {
            let tag = format!("-{pid}-");
            beating
                .iter()
                .any(|w| !w.lost && w.heartbeat.worker_id.contains(&tag))
        });
        if !all_beat {
            return false;
        }
        let waiting =
            self.db_count(QUEUED).await.unwrap_or(1) + self.db_count(OPEN_TASKS).await.unwrap_or(1);
        waiting == 0 || self.db_count(PROGRESS).await.unwrap_or(0) > progress_at
    }

    /// Wait until nothing is left to do: no item queued, no task open, no
    /// run in progress, every item scored by the active version, the work
    /// queues empty; then a few quiet seconds for stragglers.
    async fn settle(&self) -> anyhow::Result<()> {
        println!("[{:6.1} s] settling", self.now());
        let timeout = Duration::from_secs(self.args.settle_timeout_secs);
        let topology = self.ctx.topology().clone();
        let mut queues: Vec<String> = topology.work_queues().to_vec();
        queues.extend(topology.retry_queues());
        let outcome = wait_until("everything to settle", timeout, async || {
            for sql in [QUEUED, OPEN_TASKS, RUNS_ACTIVE, UNRESCORED] {
                if self.db_count(sql).await != Some(0) {
                    return false;
                }
            }
            for queue in &queues {
                match sieve_shared::broker::queue_counts(&self.ctx.connection, queue).await {
                    Ok((0, _)) => {}
                    _ => return false,
                }
            }
            true
        })
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        println!("[{:6.1} s] settled: {}", self.now(), outcome.is_ok());
        outcome
    }

    async fn figures(
        &self,
        distinct: &HashSet<String>,
        tally: &ReviewTally,
    ) -> anyhow::Result<Figures> {
        let db = &self.ctx.db;
        let p = self.project;
        let c =
            async |sql: &str| -> anyhow::Result<u64> { Ok(count(db, sql, p).await?.max(0) as u64) };
        #[derive(FromQueryResult)]
        struct Hash {
            content_hash: String,
        }
        let hashes: HashSet<String> = Hash::find_by_statement(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT content_hash FROM items WHERE project_id = $1",
            [p.into()],
        ))
        .all(db)
        .await?
        .into_iter()
        .map(|h| h.content_hash)
        .collect();
        let missing = distinct.difference(&hashes).count() as u64;
        let state = async |s: &str| {
            c(&format!(
                "SELECT count(*) AS n FROM items WHERE project_id = $1 AND state = '{s}'"
            ))
            .await
        };
        let stuck = c(
            "SELECT count(*) AS n FROM items i WHERE i.project_id = $1 AND ( \
              (i.state = 'in_review' AND NOT EXISTS (SELECT 1 FROM review_tasks t \
                  WHERE t.item_id = i.id AND t.state IN ('open', 'claimed'))) \
           OR (i.state = 'human_labeled' AND NOT EXISTS (SELECT 1 FROM labels l \
                  WHERE l.item_id = i.id AND l.source = 'human')) \
           OR (i.state = 'auto_labeled' AND NOT EXISTS (SELECT 1 FROM labels l \
                  WHERE l.item_id = i.id AND l.source = 'machine')))",
        )
        .await?;
        let queued = state("queued").await?;
        let extra = |group: &str, filter: &str| {
            format!(
                "SELECT coalesce(sum(c - 1), 0)::bigint AS n FROM (SELECT count(*) AS c FROM {filter} \
                 GROUP BY {group} HAVING count(*) > 1) x"
            )
        };
        let project_labels = "labels l JOIN items i ON i.id = l.item_id WHERE i.project_id = $1";
        let (work, training) = self.count_logs();
        let acknowledged = tally.acknowledged.lock().await;
        let mut figures = Figures {
            items_in: distinct.len() as u64,
            items: c(ITEMS).await?,
            machine_labeled: state("auto_labeled").await?,
            human_labeled: state("human_labeled").await?,
            in_review: state("in_review").await?,
            queued,
            failed: state("failed").await?,
            missing,
            stuck,
            unrescored: c(UNRESCORED).await?,
            duplicate_predictions: c(&extra(
                "p.item_id, p.model_version_id",
                "predictions p JOIN items i ON i.id = p.item_id WHERE i.project_id = $1",
            ))
            .await?,
            duplicate_labels_per_task: c(&extra(
                "l.review_task_id",
                &format!("{project_labels} AND l.review_task_id IS NOT NULL"),
            ))
            .await?,
            duplicate_human_labels_per_item: c(&extra(
                "l.item_id",
                &format!("{project_labels} AND l.source = 'human'"),
            ))
            .await?,
            duplicate_machine_labels: c(&extra(
                "l.item_id, l.model_version_id",
                &format!("{project_labels} AND l.source = 'machine'"),
            ))
            .await?,
            duplicate_open_tasks: c(&extra(
                "item_id",
                "review_tasks WHERE project_id = $1 AND state IN ('open', 'claimed')",
            ))
            .await?,
            duplicate_versions_per_run: c(&extra(
                "v.training_run_id",
                "model_versions v WHERE v.project_id = $1 AND v.training_run_id IS NOT NULL",
            ))
            .await?,
            training_runs: c("SELECT count(*) AS n FROM training_runs WHERE project_id = $1").await?,
            retrain_requests: self.retrain_requests,
            duplicate_runs_per_request: c(
                "SELECT count(*) AS n FROM training_runs WHERE project_id = $1 AND requested_by = 'chaos-ml'",
            )
            .await?
            .saturating_sub(self.retrain_requests),
            dead_letters: sieve_scheduler::operate::failed::dead_letters(&self.ctx, 1000)
                .await
                .map_or(0, |d| d.len() as u64),
            work,
            training,
            review_claims: tally.claims.load(Ordering::Relaxed),
            review_labels: tally.labels.load(Ordering::Relaxed),
            review_resubmits: tally.resubmits.load(Ordering::Relaxed),
            review_refused: tally.refused.load(Ordering::Relaxed),
            review_acknowledged_twice: acknowledged.values().filter(|n| **n > 1).count() as u64,
            ..Figures::default()
        };
        figures.lost = figures.missing + figures.stuck + figures.queued;
        Ok(figures)
    }

    fn count_logs(&self) -> (WorkCount, TrainingCount) {
        let mut published = Vec::new();
        let mut training = Vec::new();
        for instance in self
            .fleet
            .instances
            .iter()
            .filter(|i| i.role == Kind::Worker)
        {
            let text = std::fs::read_to_string(&instance.log).unwrap_or_default();
            let mut results = Vec::new();
            let mut runs = Vec::new();
            for line in text.lines() {
                results.extend(parse_published(line));
                runs.extend(parse_training(line));
            }
            published.push((results, instance.killed_at.clone()));
            training.push((runs, instance.killed));
        }
        (count_work(&published), count_training(&training))
    }
}

/// What makes the run fail, in words (empty: it passed).
pub fn verdict(
    f: &Figures,
    faults: &[FaultRecord],
    settle_error: Option<&anyhow::Error>,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut check = |bad: u64, what: &str| {
        if bad > 0 {
            failures.push(format!("{bad} {what}"));
        }
    };
    check(f.lost, "items lost");
    check(f.failed, "items failed (every image is good)");
    check(f.duplicate_predictions, "duplicated predictions");
    check(f.duplicate_labels_per_task, "review tasks labeled twice");
    check(
        f.duplicate_human_labels_per_item,
        "items labeled twice by people",
    );
    check(f.duplicate_machine_labels, "duplicated machine labels");
    check(f.duplicate_open_tasks, "items with two open tasks");
    check(
        f.duplicate_versions_per_run,
        "runs that registered two versions",
    );
    check(
        f.duplicate_runs_per_request,
        "retrain requests that made two runs",
    );
    check(
        f.training.duplicate_starts,
        "training runs started twice without a kill",
    );
    check(
        f.training.duplicate_completions,
        "training runs trained to the end twice",
    );
    check(
        faults.iter().filter(|x| x.recovered_s.is_none()).count() as u64,
        "faults not recovered from",
    );
    if let Some(err) = settle_error {
        failures.push(format!("did not settle: {err:#}"));
    }
    failures
}

fn print_report(run: &Run, f: &Figures, failures: &[String]) {
    println!(
        "\nsieve-tools bench chaos — {} items, {} workers, {} reviewers, {} build, {} cores",
        run.args.items,
        run.args.workers,
        run.args.reviewers,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>4}  {:<26} {:<10} {:>8} {:>8} {:>13}  note",
        "step", "fault", "moment", "at s", "down s", "recovered s"
    );
    for x in &run.faults {
        println!(
            "{:>4}  {:<26} {:<10} {:>8.1} {:>8.1} {:>13}  {}{}",
            x.step,
            x.fault.label(),
            format!("{:?}", x.moment).to_lowercase(),
            x.at_s,
            x.down_s,
            x.recovered_s.map_or("NOT".into(), |s| format!("{s:.1}")),
            if x.at_moment { "" } else { "(moment missed) " },
            x.note
        );
    }
    println!(
        "items in {}, labeled {} (machine {}, human {}), in review {}, failed {}, lost {} \
         (missing {}, stuck {}, queued {}); not rescored by the active version {}",
        f.items_in,
        f.machine_labeled + f.human_labeled,
        f.machine_labeled,
        f.human_labeled,
        f.in_review,
        f.failed,
        f.lost,
        f.missing,
        f.stuck,
        f.queued,
        f.unrescored
    );
    println!(
        "duplicated effects: predictions {}, labels per review task {}, human labels per item {}, \
         machine labels per (item, version) {}, open tasks per item {}, versions per run {}, \
         runs per retrain request {} ({} runs for {} requests + the first model)",
        f.duplicate_predictions,
        f.duplicate_labels_per_task,
        f.duplicate_human_labels_per_item,
        f.duplicate_machine_labels,
        f.duplicate_open_tasks,
        f.duplicate_versions_per_run,
        f.duplicate_runs_per_request,
        f.training_runs,
        f.retrain_requests
    );
    // A log timestamp as seconds into the run.
    let into_run = |window: &Option<(String, String)>| {
        let secs = |at: &str| {
            chrono::DateTime::parse_from_rfc3339(at).map_or(f64::NAN, |t| {
                (t.with_timezone(&chrono::Utc) - run.started_at).as_seconds_f64()
            })
        };
        window.as_ref().map_or(String::new(), |(first, last)| {
            format!(" at {:.1}–{:.1} s", secs(first), secs(last))
        })
    };
    println!(
        "duplicated work: {} results published for {} (item, version); published again {}: \
         the same job {}{} ({} after its publisher's SIGKILL, {} otherwise), another job {}{}",
        f.work.results,
        f.work.pairs,
        f.work.again(),
        f.work.redelivered_after_kill + f.work.redelivered_otherwise,
        into_run(&f.work.redelivered_between),
        f.work.redelivered_after_kill,
        f.work.redelivered_otherwise,
        f.work.dispatched_again,
        into_run(&f.work.dispatched_again_between),
    );
    println!(
        "training: {} runs started {} times in the workers' logs; {} again after their worker's \
         SIGKILL, {} started twice otherwise, {} trained to the end twice",
        f.training.runs,
        f.training.starts,
        f.training.restarts_after_kill,
        f.training.duplicate_starts,
        f.training.duplicate_completions
    );
    println!(
        "reviewers: {} claims, {} labels acknowledged, {} submits sent again after an unknown \
         outcome, {} refused, {} tasks acknowledged twice; ingest requests {} for {} chunks; \
         dead letters {}; wall {:.0} s",
        f.review_claims,
        f.review_labels,
        f.review_resubmits,
        f.review_refused,
        f.review_acknowledged_twice,
        f.ingest_requests,
        plan(run.args.worker_kills)
            .iter()
            .filter(|s| s.ingest)
            .count(),
        f.dead_letters,
        f.wall_s
    );
    if failures.is_empty() {
        println!("verdict: 0 lost, 0 duplicated labels or effects — passed");
    } else {
        println!("verdict: FAILED: {}", failures.join("; "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_has_every_fault_the_issue_asks_for() {
        let steps = plan(5);
        let n = |f: Fault| steps.iter().filter(|s| s.fault == f).count();
        assert_eq!(n(Fault::KillWorker), 5);
        assert_eq!(n(Fault::KillScheduler), 2);
        assert_eq!(n(Fault::RestartBroker), 1);
        assert_eq!(n(Fault::RestartPostgres), 1);
        assert_eq!(n(Fault::FlushRedis), 1);
        // One scheduler kill during an ingest, one during a training run.
        let scheduler: Vec<Moment> = steps
            .iter()
            .filter(|s| s.fault == Fault::KillScheduler)
            .map(|s| s.moment)
            .collect();
        assert_eq!(scheduler, [Moment::Ingesting, Moment::Training]);
        // Every training moment has a retrain to hit; the seed comes first.
        assert!(
            steps
                .iter()
                .all(|s| s.moment != Moment::Training || s.retrain)
        );
        assert!(steps[0].ingest && !steps[0].retrain);
        assert_eq!(steps.iter().filter(|s| s.retrain).count(), 2);
        // More kills make more steps, never fewer than five.
        assert_eq!(
            plan(8)
                .iter()
                .filter(|s| s.fault == Fault::KillWorker)
                .count(),
            8
        );
        assert_eq!(
            plan(1)
                .iter()
                .filter(|s| s.fault == Fault::KillWorker)
                .count(),
            5
        );
    }

    #[test]
    fn chunks_add_up_with_the_seed_first() {
        let steps = plan(5);
        let sizes = chunk_sizes(10_000, 0.1, &steps);
        assert_eq!(sizes.len(), steps.iter().filter(|s| s.ingest).count());
        assert_eq!(sizes[0], 1_000);
        assert_eq!(sizes.iter().sum::<usize>(), 10_000);
        let sizes = chunk_sizes(2_001, 0.1, &steps);
        assert_eq!(sizes.iter().sum::<usize>(), 2_001);
        assert!(sizes[1..].iter().all(|s| s.abs_diff(sizes[1]) <= 1));
    }

    const ITEM: &str = "0190a1b2-0000-7000-8000-000000000001";
    const VERSION: &str = "0190a1b2-0000-7000-8000-0000000000aa";

    fn published_at(item: &str, job: &str, at: &str) -> Published {
        Published {
            item: item.into(),
            version: VERSION.into(),
            job: job.into(),
            at: at.into(),
        }
    }

    #[test]
    fn published_lines_parse_with_and_without_colours() {
        let line = format!(
            "2026-12-07T01:07:18.123456Z DEBUG results published worker=h-12-abc \
             results={ITEM}:{VERSION}:j1,{ITEM}:{VERSION}:j2"
        );
        let at = "2026-12-07T01:07:18.123456Z";
        assert_eq!(
            parse_published(&line),
            [published_at(ITEM, "j1", at), published_at(ITEM, "j2", at)]
        );
        let coloured = format!(
            "\u{1b}[2m2026-12-07T01:07:18Z\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m results published \
             \u{1b}[3mresults\u{1b}[0m\u{1b}[2m=\u{1b}[0m{ITEM}:{VERSION}:j1"
        );
        assert_eq!(
            parse_published(&coloured),
            [published_at(ITEM, "j1", "2026-12-07T01:07:18Z")]
        );
        assert!(parse_published("2026 INFO training started run=x").is_empty());
        assert_eq!(
            parse_training("2026-12-07T01:07:18Z  INFO training started run=r1 version=2"),
            Some(TrainingLine::Started("r1".into()))
        );
        assert_eq!(
            parse_training(
                "2026-12-07T01:07:18Z  INFO training completed run=r1 version=2 mode=Full"
            ),
            Some(TrainingLine::Completed("r1".into()))
        );
        assert_eq!(
            parse_training(
                "2026 INFO skipping a redelivered run this worker already finished run=r1"
            ),
            None
        );
    }

    #[test]
    fn duplicated_work_is_counted_by_cause() {
        let other = "0190a1b2-0000-7000-8000-000000000002";
        // Killed after publishing j1 and j2 (before acknowledging): both
        // come again from another worker, listed first though it published
        // later; j3 was sent twice by the scheduler; j4 came again to a
        // worker still alive.
        let killed = vec![
            published_at(ITEM, "j1", "t1"),
            published_at(other, "j2", "t2"),
        ];
        let live = vec![
            published_at(ITEM, "j1", "t5"),
            published_at(other, "j2", "t6"),
            published_at("i3", "j3", "t3"),
            published_at("i3", "j3b", "t7"),
            published_at("i4", "j4", "t4"),
            published_at("i4", "j4", "t8"),
        ];
        let count = count_work(&[(live, None), (killed, Some("t2.5".into()))]);
        assert_eq!(
            count,
            WorkCount {
                results: 8,
                pairs: 4,
                redelivered_after_kill: 2,
                redelivered_otherwise: 1,
                dispatched_again: 1,
                dispatched_again_between: Some(("t7".into(), "t7".into())),
                redelivered_between: Some(("t5".into(), "t8".into())),
            }
        );
        assert_eq!(count.again(), 4);
        // Sent again before its publisher was killed: the kill is not why.
        let early = count_work(&[
            (vec![published_at(ITEM, "j1", "t1")], Some("t9".into())),
            (vec![published_at(ITEM, "j1", "t2")], None),
        ]);
        assert_eq!(
            (early.redelivered_after_kill, early.redelivered_otherwise),
            (0, 1)
        );
    }

    #[test]
    fn a_training_restarted_after_a_kill_is_not_a_duplicate() {
        use TrainingLine::*;
        let s = |r: &str| Started(r.into());
        let c = |r: &str| Completed(r.into());
        // r1: its worker killed mid-run, another trains it: a restart.
        // r2: trained by a worker that was later killed: no restart needed.
        // r3: started by two live workers, completed by both: duplicated.
        let count = count_training(&[
            (vec![s("r1")], true),
            (vec![s("r1"), c("r1"), s("r3"), c("r3")], false),
            (vec![s("r2"), c("r2")], true),
            (vec![s("r3"), c("r3")], false),
        ]);
        assert_eq!(
            count,
            TrainingCount {
                runs: 3,
                starts: 5,
                restarts_after_kill: 1,
                duplicate_starts: 1,
                duplicate_completions: 1,
            }
        );
    }

    #[test]
    fn only_test_binaries_hold_a_service_restart() {
        assert!(is_test_binary(
            "/var/tmp/sieve-target/debug/deps/restarts-0123abcd"
        ));
        assert!(is_test_binary("target/debug/deps/it-77"));
        assert!(!is_test_binary("rustc"));
        assert!(!is_test_binary("/var/tmp/sieve-target/debug/sieve"));
        assert!(!is_test_binary(
            "/var/tmp/sieve-target/debug/build/x-1/build-script-build"
        ));
    }
}
