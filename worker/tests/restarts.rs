//! The real services restarted in the middle of a run: RabbitMQ
//! (`rabbitmqctl stop_app` / `start_app`), PostgreSQL (the cluster stopped
//! and started) and Redis (`shutdown nosave`, started again), each while
//! images are being ingested, predicted and routed. Afterwards the run
//! finishes by itself and the accounting is exact: every image is one item in
//! one state, no prediction is duplicated per model version, every failure
//! carries its reason.
//!
//! RabbitMQ is also restarted while a training run is in progress: the run
//! ends registered exactly once, its job is not trained twice, and the
//! worker's `/healthz` answers 503 while its broker connections are down.
//!
//! These tests stop services that everything on the machine shares. The
//! scenarios take one process-wide lock so they never overlap, and a guard
//! brings the service back up when it is dropped, even if the test panics.
//! (`cargo test` runs test binaries one after another, so in CI nothing else
//! is running while a service is down.)

#![allow(clippy::unwrap_used)]

// A binary of its own, apart from `it`: while a service is down, no other
// test may be running.
#[path = "it/sieve.rs"]
mod sieve;

use std::collections::HashSet;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::sieve::{TestSieve, account, settled};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use sieve_scheduler::entities::prediction;
use sieve_scheduler::entities::training_run::{self, RunState};
use sieve_scheduler::ingest;
use sieve_scheduler::operate::status;
use sieve_scheduler::operate::workers;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::Project;
use sieve_testkit::eventually;
use sieve_tools::fashion_mnist::Split;

/// One service down at a time, across the whole test binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a run may take to finish after the service is back.
const SETTLE: Duration = Duration::from_secs(240);
/// How long the service stays down.
const OUTAGE: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug)]
enum Service {
    RabbitMq,
    Postgres,
    Redis,
}

fn sh(program: &str, args: &[&str]) -> bool {
    match Command::new(program).args(args).status() {
        Ok(status) => status.success(),
        Err(err) => {
            eprintln!("could not run {program}: {err}");
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
            Service::Redis => 6379,
        }
    }

    fn stop(self) {
        let stopped = match self {
            Service::RabbitMq => sh("rabbitmqctl", &["stop_app"]),
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
            Service::Redis => sh("redis-cli", &["shutdown", "nosave"]),
        };
        assert!(stopped, "could not stop {self:?}");
        println!("{self:?} stopped");
    }

    /// Start the service unless it answers already, then wait until it does.
    fn start(self) {
        match self {
            // `start_app` is harmless on a running broker; `await_startup`
            // waits until it accepts logins, not just connections.
            Service::RabbitMq => {
                sh("rabbitmqctl", &["start_app"]);
                sh("rabbitmqctl", &["await_startup"]);
            }
            Service::Postgres if !answers(self.port()) => {
                sh(
                    "pg_ctlcluster",
                    &["--skip-systemctl-redirect", &pg_version(), "main", "start"],
                );
            }
            Service::Redis if !answers(self.port()) => {
                std::fs::create_dir_all("/var/lib/redis").ok();
                std::fs::create_dir_all("/var/log/redis").ok();
                sh(
                    "redis-server",
                    &[
                        "--daemonize",
                        "yes",
                        "--bind",
                        "127.0.0.1",
                        "-::1",
                        "--port",
                        "6379",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        "/var/lib/redis",
                        "--logfile",
                        "/var/log/redis/ci.log",
                    ],
                );
            }
            _ => {}
        }
        let start = Instant::now();
        while !answers(self.port()) && start.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(200));
        }
        println!(
            "{self:?} answering again: {}",
            if answers(self.port()) { "yes" } else { "NO" }
        );
    }

    /// Stop the service; it is started again when the guard drops.
    fn down(self) -> Outage {
        let guard = Outage(self);
        self.stop();
        guard
    }
}

/// While this lives, the service may be down; dropping it (also while a
/// failing test unwinds) brings the service back.
struct Outage(Service);

impl Drop for Outage {
    fn drop(&mut self) {
        self.0.start();
    }
}

/// (queue, prefetch) of every consumer on this test's queues, as the broker
/// sees them: after a restart they must all be back, with their QoS.
fn consumers(prefix: &str) -> Vec<(String, u64)> {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_consumers",
            "--formatter",
            "json",
            "queue_name",
            "prefetch_count",
        ])
        .output()
        .unwrap();
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut mine: Vec<(String, u64)> = all
        .iter()
        .filter_map(|c| {
            let queue = c["queue_name"].as_str()?;
            queue
                .starts_with(&format!("{prefix}."))
                .then(|| (queue.to_owned(), c["prefetch_count"].as_u64().unwrap_or(0)))
        })
        .collect();
    mine.sort();
    mine
}

/// `n` Fashion-MNIST images split into folders of `per` files, plus one
/// file that is not an image in the first folder; the number of distinct
/// contents (what the items must number).
fn image_batches(split: Split, n: usize, per: usize) -> (tempfile::TempDir, Vec<PathBuf>, u64) {
    let (flat, _) = crate::sieve::fashion_images(split, n);
    let root = tempfile::tempdir().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(flat.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut contents = HashSet::new();
    let mut folders = Vec::new();
    for (i, chunk) in files.chunks(per).enumerate() {
        let folder = root.path().join(format!("part-{i:04}"));
        std::fs::create_dir(&folder).unwrap();
        for file in chunk {
            contents.insert(std::fs::read(file).unwrap());
            std::fs::copy(file, folder.join(file.file_name().unwrap())).unwrap();
        }
        folders.push(folder);
    }
    let junk = b"this is not an image".to_vec();
    std::fs::write(folders[0].join("not-an-image.png"), &junk).unwrap();
    contents.insert(junk);
    (root, folders, contents.len() as u64)
}

/// Ingest each folder in turn; a failed ingest is retried (as an operator
/// would re-run it: items already stored are duplicates).
async fn ingest_all(sieve: &TestSieve, project: &Project, folders: &[PathBuf]) -> Vec<String> {
    let mut errors = Vec::new();
    for folder in folders {
        loop {
            match ingest::ingest_folder(&sieve.ctx, project, folder, false).await {
                Ok(_) => break,
                Err(err) => {
                    errors.push(format!("{}: {err:#}", folder.display()));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    errors
}

async fn predictions(sieve: &TestSieve) -> u64 {
    prediction::Entity::find()
        .count(&sieve.ctx.db)
        .await
        .unwrap_or(0)
}

/// Wait until some predictions exist (work is flowing), but not too long.
async fn flowing(sieve: &TestSieve, at_least: u64) {
    eventually("predictions to flow", Duration::from_secs(120), || async {
        (predictions(sieve).await >= at_least).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_restart_while_publishing_consuming_and_routing() {
    let _serial = SERIAL.lock().await;
    let sieve = TestSieve::start().await;
    let project = crate::sieve::fashion_project(&sieve, "rabbit-restart", Policy::default()).await;
    let (_root, folders, images) = image_batches(Split::Train, 600, 25);

    // Ingest (publishing jobs) goes on across the restart while the worker
    // consumes jobs and publishes results and the scheduler routes them.
    let before = consumers(&sieve.settings.broker.prefix);
    let ingesting = ingest_all(&sieve, &project, &folders);
    let restart = async {
        flowing(&sieve, 50).await;
        let outage = Service::RabbitMq.down();
        tokio::time::sleep(OUTAGE).await;
        drop(outage);
    };
    let (errors, ()) = tokio::join!(ingesting, restart);
    println!("ingest errors during the outage: {errors:?}");
    assert!(
        errors.is_empty(),
        "publishing rode out the restart: {errors:?}"
    );
    settled(&sieve.ctx.db, project.id, SETTLE).await;
    let counts = account(&sieve.ctx.db, project.id, images).await;
    assert_eq!(
        counts.failed, 1,
        "only the file that is not an image failed"
    );
    assert_eq!(counts.predictions, images - 1, "one prediction per image");

    // Every consumer re-subscribed, its queue re-declared, its QoS re-applied.
    let after = consumers(&sieve.settings.broker.prefix);
    println!("consumers before {before:?}\nconsumers after  {after:?}");
    assert_eq!(
        before.len(),
        6,
        "prelabel, train, results, events, dead notices, control"
    );
    assert!(
        before
            .iter()
            .filter(|(queue, _)| !queue.contains(".control."))
            .all(|(_, prefetch)| *prefetch > 0)
    );
    assert_eq!(after, before);

    // Training works end to end after the restart: job, events, activation
    // notice on the re-bound control queue, rescore of every item.
    let run =
        sieve_scheduler::training::request(&sieve.ctx, &project, "test", Default::default(), true)
            .await
            .unwrap();
    let run = eventually("the training run to finish", SETTLE, || async {
        let r = training_run::Entity::find_by_id(run.run_id)
            .one(&sieve.ctx.db)
            .await
            .ok()??;
        matches!(r.state, RunState::Succeeded | RunState::Failed).then_some(r)
    })
    .await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    eventually("the rescore by the new version", SETTLE, || async {
        (predictions(&sieve).await == 2 * (images - 1)).then_some(())
    })
    .await;
    account(&sieve.ctx.db, project.id, images).await;
    sieve.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart_while_results_are_routed() {
    let _serial = SERIAL.lock().await;
    let sieve = TestSieve::start().await;
    let project = crate::sieve::fashion_project(&sieve, "pg-restart", Policy::default()).await;
    let (_root, folders, images) = image_batches(Split::Train, 600, 200);
    // Everything queued and published; the worker and the router work
    // through it while the database goes away.
    assert!(ingest_all(&sieve, &project, &folders).await.is_empty());
    flowing(&sieve, 30).await;
    let before = predictions(&sieve).await;
    {
        let _outage = Service::Postgres.down();
        tokio::time::sleep(OUTAGE).await;
    }
    println!("{before} predictions stored before the restart");

    settled(&sieve.ctx.db, project.id, SETTLE).await;
    let counts = account(&sieve.ctx.db, project.id, images).await;
    assert_eq!(
        counts.failed, 1,
        "only the file that is not an image failed"
    );
    assert_eq!(
        counts.predictions,
        images - 1,
        "one prediction per image, none lost in the outage"
    );
    // Ingesting the same images again adds nothing.
    for folder in &folders {
        let again = ingest::ingest_folder(&sieve.ctx, &project, folder, false)
            .await
            .unwrap();
        assert_eq!(again.new_items, 0);
    }
    assert_eq!(account(&sieve.ctx.db, project.id, images).await, counts);
    sieve.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restart_while_workers_beat() {
    let _serial = SERIAL.lock().await;
    let sieve = TestSieve::start().await;
    let project = crate::sieve::fashion_project(&sieve, "redis-restart", Policy::default()).await;
    let (_root, folders, images) = image_batches(Split::Train, 300, 100);
    eventually(
        "the worker's heartbeat",
        Duration::from_secs(30),
        || async {
            let w = workers::list(&sieve.settings.redis).await.ok()?;
            (w.len() == 1).then_some(())
        },
    )
    .await;
    assert!(ingest_all(&sieve, &project, &folders).await.is_empty());
    flowing(&sieve, 10).await;
    {
        let _outage = Service::Redis.down();
        // Status still answers, and says what it cannot see.
        let asked = Instant::now();
        let fleet = status::fleet_status(&sieve.ctx).await.unwrap();
        println!(
            "status while Redis is down, in {} ms: {:?}",
            asked.elapsed().as_millis(),
            fleet.workers_error
        );
        assert!(fleet.workers_error.is_some());
        tokio::time::sleep(OUTAGE).await;
    }
    // The heartbeat comes back by itself (nosave: Redis starts empty).
    eventually(
        "the heartbeat to return",
        Duration::from_secs(60),
        || async {
            let w = workers::list(&sieve.settings.redis).await.ok()?;
            (w.len() == 1 && !w[0].lost).then_some(())
        },
    )
    .await;
    settled(&sieve.ctx.db, project.id, SETTLE).await;
    let counts = account(&sieve.ctx.db, project.id, images).await;
    assert_eq!(counts.failed, 1);
    assert_eq!(counts.predictions, images - 1);
    sieve.teardown().await;
}

/// Ready and unacknowledged messages of a queue, from the broker itself.
fn queue_messages(name: &str) -> (u64, u64) {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--formatter",
            "json",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .unwrap();
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let queue = all
        .iter()
        .find(|q| q["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no queue {name}"));
    (
        queue["messages_ready"].as_u64().unwrap_or(0),
        queue["messages_unacknowledged"].as_u64().unwrap_or(0),
    )
}

/// The worker's `/healthz`: its status code and body.
async fn health(http: &reqwest::Client, worker: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let response = http
        .get(format!("http://{worker}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_restart_while_training() {
    use sieve_scheduler::entities::model_version::{self, VersionStatus};
    use sieve_shared::messages::TrainParams;

    let _serial = SERIAL.lock().await;
    let sieve = TestSieve::start().await;
    let db = &sieve.ctx.db;
    let worker = sieve.worker_addrs[0];
    let project = crate::sieve::fashion_project(&sieve, "train-restart", Policy::default()).await;
    let images = crate::sieve::ingest_labeled(&sieve, &project, 1_000).await;
    settled(db, project.id, SETTLE).await;
    let (status, body) = health(&sieve.http, worker).await;
    assert_eq!(status, 200, "{body}");

    let params = TrainParams {
        epochs: 30,
        batch_size: 32,
        ..TrainParams::default()
    };
    let run = sieve_scheduler::training::request(&sieve.ctx, &project, "test", params, false)
        .await
        .unwrap();
    let in_progress = eventually("training progress", SETTLE, || async {
        let r = training_run::Entity::find_by_id(run.run_id)
            .one(db)
            .await
            .ok()??;
        r.progress.is_some().then_some(r)
    })
    .await;
    println!(
        "training at {:?} when the broker stops",
        in_progress.progress
    );
    assert_eq!(in_progress.state, RunState::Running);

    // The broker goes away under the running training: the worker says so
    // on /healthz (503, with the reasons) until its connections and
    // consumers are back.
    let started = Instant::now();
    {
        let _outage = Service::RabbitMq.down();
        // (`stop_app` returns once the broker is down.)
        let down = Instant::now();
        let mut unhealthy = None;
        while down.elapsed() < OUTAGE {
            let (status, body) = health(&sieve.http, worker).await;
            if status == 503 {
                unhealthy.get_or_insert(body);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let body = unhealthy.expect("/healthz answered 503 while the broker was down");
        println!("/healthz during the outage: {body}");
        assert_eq!(body["status"], "unavailable");
        let reasons = body["reasons"].to_string();
        assert!(reasons.contains("connection to RabbitMQ"), "{reasons}");
    }
    let healthy = eventually("/healthz ok again", SETTLE, || async {
        let (status, body) = health(&sieve.http, worker).await;
        (status == 200).then_some(body)
    })
    .await;
    println!(
        "/healthz ok {:?} after the broker stopped: {healthy}",
        started.elapsed()
    );
    for consumer in ["prelabel", "train", "control"] {
        assert_eq!(healthy["consumers"][consumer], "consuming", "{healthy}");
    }

    // The run that was training across the restart completes, once.
    let finished = eventually("the training run to finish", SETTLE, || async {
        let r = training_run::Entity::find_by_id(run.run_id)
            .one(db)
            .await
            .ok()??;
        matches!(r.state, RunState::Succeeded | RunState::Failed).then_some(r)
    })
    .await;
    assert_eq!(finished.state, RunState::Succeeded, "{:?}", finished.error);
    // The broker gave the job back when the worker's connection dropped, and
    // delivered it again after the restart, to the same worker, while it was
    // still training it. That redelivery must end acknowledged, not trained
    // a second time.
    let train_queue = sieve.ctx.topology().train_queue();
    eventually("the train queue empty", SETTLE, || async {
        (queue_messages(&train_queue) == (0, 0)).then_some(())
    })
    .await;
    let versions = model_version::Entity::find()
        .filter(model_version::Column::TrainingRunId.eq(run.run_id))
        .all(db)
        .await
        .unwrap();
    assert_eq!(versions.len(), 1, "one version registered for the run");
    let version = &versions[0];
    assert!(
        matches!(
            version.status,
            VersionStatus::Active | VersionStatus::Candidate
        ),
        "{:?}",
        version.status
    );
    // The registered artifact is the bytes the checksum names, and it is
    // the only artifact of the version, written before the run was
    // registered: the redelivered job was not trained a second time.
    let key = version.artifact_key.clone().unwrap();
    let store = sieve_shared::store::Store::open(&sieve.settings.store).unwrap();
    let bytes = store.get(&key).await.unwrap();
    assert_eq!(
        Some(sieve_shared::store::sha256_hex(&bytes)),
        version.checksum
    );
    let models = sieve
        .settings
        .store
        .root
        .join(format!("projects/{}/models", project.id));
    let registered = finished.finished_at.unwrap().with_timezone(&chrono::Utc);
    let artifacts: Vec<(String, chrono::DateTime<chrono::Utc>)> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&version.id.to_string())
        })
        .map(|e| {
            let written = e.metadata().unwrap().modified().unwrap();
            (e.file_name().to_string_lossy().into_owned(), written.into())
        })
        .collect();
    println!("run registered at {registered}; artifacts {artifacts:?}");
    assert_eq!(artifacts.len(), 1, "trained once: {artifacts:?}");
    assert!(
        artifacts.iter().all(|(_, written)| *written <= registered),
        "an artifact was written after the run was registered: trained twice"
    );
    let (dead, _) = queue_messages(&sieve.ctx.topology().dead_queue());
    assert_eq!(dead, 0, "nothing dead-lettered");

    settled(db, project.id, SETTLE).await;
    let counts = account(db, project.id, images).await;
    assert_eq!(counts.failed, 0);
    sieve.teardown().await;
}
