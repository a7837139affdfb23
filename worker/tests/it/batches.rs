//! One micro-batch of mixed good and bad images through a real worker on the
//! real RabbitMQ, with no scheduler: jobs are published straight onto the
//! prelabel queue of a private prefix, and results are read straight off the
//! results queue. What `faults.rs` and `end_to_end.rs` do not show: bad
//! images of every kind *inside one batch* with good ones (ingest refuses most
//! of them before a worker ever sees them), and a transient failure burning
//! through the delivery limit into the dead-letter queue.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Cursor;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use sieve_shared::Settings;
use sieve_shared::broker::{self, Publisher};
use sieve_shared::ids::{ItemId, JobId, ModelVersionId, ProjectId};
use sieve_shared::messages::{
    ModelRef, PrelabelJob, PrelabelOutcome, PrelabelResult, SCHEMA_VERSION, decode, decode_results,
};
use sieve_shared::retry;
use sieve_shared::store::Store;
use sieve_shared::topology::Topology;
use sieve_worker::context::Capability;
use sieve_worker::model::{ArchitectureConfig, Committee};
use sieve_worker::service;
use tokio_util::sync::CancellationToken;

use crate::sieve::bomb_png;

const WAIT: Duration = Duration::from_secs(60);

/// A worker on its own prefix and store, and a way to feed it jobs.
struct Harness {
    settings: Settings,
    topology: Topology,
    connection: lapin::Connection,
    publisher: Publisher,
    store: Store,
    model: ModelRef,
    stop: CancellationToken,
    worker: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _sandbox: sieve_testkit::Sandbox,
}

impl Harness {
    /// Declare the topology and store a model; the worker starts later, so
    /// that every job published before [`Harness::start_worker`] lands in
    /// its first micro-batch.
    async fn new() -> Self {
        Self::with_retry_delays(&[1_000, 5_000]).await
    }

    /// Like [`Harness::new`], waiting `delays_ms` before each retry of a
    /// transient failure.
    async fn with_retry_delays(delays_ms: &[u64]) -> Self {
        let sandbox = sieve_testkit::Sandbox::start(crate::sieve::worker_settings).await;
        let mut settings = sandbox.settings.clone();
        settings.broker.delivery_limit = 3;
        settings.broker.retry_delays_ms = delays_ms.to_vec();
        settings.worker.batch_size = 16;
        settings.worker.batch_timeout_ms = 500;
        let topology = Topology::from_settings(&settings.broker);
        let connection = broker::connect(&settings.broker, "batches test")
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        topology.declare(&channel).await.unwrap();
        channel.close(200, "declared".into()).await.ok();
        let publisher = Publisher::new(&connection, topology.clone()).await.unwrap();
        let store = Store::open(&settings.store).unwrap();
        let committee = Committee::init(
            &ArchitectureConfig::small_cnn(10, 3),
            1,
            &sieve_worker::backend::device(),
        )
        .unwrap();
        let (bytes, checksum) = sieve_worker::artifact::encode(&committee).unwrap();
        store
            .put("models/test/1.sievemodel", bytes.into())
            .await
            .unwrap();
        let model = ModelRef {
            version_id: ModelVersionId::new(),
            version: 1,
            artifact_key: "models/test/1.sievemodel".into(),
            checksum,
        };
        Self {
            settings,
            topology,
            connection,
            publisher,
            store,
            model,
            stop: CancellationToken::new(),
            worker: None,
            _sandbox: sandbox,
        }
    }

    fn start_worker(&mut self) {
        self.worker = Some(self.spawn_worker(self.settings.clone()));
    }

    /// A prelabel worker with `settings`, stopped by the harness's token.
    fn spawn_worker(&self, settings: Settings) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let listener = tokio::net::TcpListener::bind(settings.http.worker_bind).await?;
            service::run(settings, vec![Capability::Prelabel], listener, async move {
                stop.cancelled().await
            })
            .await
        })
    }

    fn job(&self, key: &str) -> PrelabelJob {
        PrelabelJob {
            size_bytes: None,
            schema: SCHEMA_VERSION,
            job_id: JobId::new(),
            project_id: ProjectId::new(),
            item_id: ItemId::new(),
            object_key: key.into(),
            model: self.model.clone(),
        }
    }

    /// Every result until `n` distinct jobs have one, then one more second
    /// to catch a duplicate; returns all results received, in order.
    async fn results(&self, n: usize) -> Vec<PrelabelResult> {
        self.result_messages(n).await.concat()
    }

    /// [`Harness::results`] as the messages carried them: one per batch.
    async fn result_messages(&self, n: usize) -> Vec<Vec<PrelabelResult>> {
        let (channel, mut consumer) = broker::consume(
            &self.connection,
            &self.topology.results_queue(),
            100,
            "batches-test-results",
        )
        .await
        .unwrap();
        let mut all: Vec<Vec<PrelabelResult>> = Vec::new();
        let mut distinct = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let wait = if distinct.len() < n {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            } else {
                Duration::from_secs(1)
            };
            match tokio::time::timeout(wait, consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    let message = decode_results(&delivery.data).unwrap();
                    distinct.extend(message.iter().map(|r| r.job_id));
                    all.push(message);
                    delivery.ack(BasicAckOptions::default()).await.unwrap();
                }
                Ok(other) => panic!("results consumer ended: {other:?}"),
                Err(_) => {
                    assert!(
                        distinct.len() >= n,
                        "only {} of {n} results within {WAIT:?}",
                        distinct.len()
                    );
                    break;
                }
            }
        }
        channel.close(200, "done".into()).await.ok();
        all
    }

    /// Ready messages of a queue.
    async fn ready(&self, queue: &str) -> u32 {
        broker::queue_counts(&self.connection, queue)
            .await
            .unwrap()
            .0
    }

    async fn teardown(mut self) {
        self.stop.cancel();
        if let Some(worker) = self.worker.take() {
            worker.await.unwrap().unwrap();
        }
        self.connection.close(200, "bye".into()).await.ok();
    }
}

fn png(width: u32, height: u32, gray: bool) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    if gray {
        image::GrayImage::from_fn(width, height, |x, y| image::Luma([(x * 7 + y * 3) as u8]))
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
    } else {
        image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([x as u8, y as u8, (x ^ y) as u8])
        })
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    }
    out.into_inner()
}

fn reason(result: &PrelabelResult) -> &str {
    match &result.outcome {
        PrelabelOutcome::Failed { reason } => reason,
        PrelabelOutcome::Scored(_) => "scored",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_batch_of_good_and_bad_images() {
    let mut h = Harness::new().await;
    let good_gray = png(28, 28, true);
    let good_rgb = png(50, 30, false);
    let truncated = png(64, 64, false);
    let truncated = truncated[..truncated.len() / 2].to_vec();
    let bomb = bomb_png(100_000);
    assert!(
        u64::from(100_000_u32).pow(2) > h.settings.ingest.max_pixels,
        "the bomb must be over the limit"
    );
    let objects: [(&str, Option<Vec<u8>>); 6] = [
        ("images/good-gray.png", Some(good_gray)),
        ("images/good-rgb.png", Some(good_rgb)),
        (
            "images/corrupt.png",
            Some(b"\x89PNG\r\n\x1a\nthis is not a PNG".to_vec()),
        ),
        ("images/truncated.png", Some(truncated)),
        ("images/bomb.png", Some(bomb)),
        ("images/missing.png", None),
    ];
    for (key, bytes) in &objects {
        if let Some(bytes) = bytes {
            h.store.put(key, bytes.clone().into()).await.unwrap();
        }
    }
    let jobs: Vec<PrelabelJob> = objects.iter().map(|(key, _)| h.job(key)).collect();
    let by_job: HashMap<JobId, &str> = jobs
        .iter()
        .map(|j| (j.job_id, j.object_key.as_str()))
        .collect();
    h.publisher.publish_all(&jobs).await.unwrap();
    h.start_worker();

    let results = h.results(jobs.len()).await;
    assert_eq!(
        results.len(),
        jobs.len(),
        "one result per job, no duplicate"
    );
    let mut outcome: HashMap<&str, &PrelabelResult> = HashMap::new();
    for r in &results {
        assert_eq!(r.model_version_id, h.model.version_id);
        let key = by_job[&r.job_id];
        assert!(outcome.insert(key, r).is_none(), "two results for {key}");
    }
    for key in ["images/good-gray.png", "images/good-rgb.png"] {
        let PrelabelOutcome::Scored(p) = &outcome[key].outcome else {
            panic!("{key}: {}", reason(outcome[key]));
        };
        assert_eq!(p.probabilities.len(), 10);
        assert!((p.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-3);
        assert_eq!(p.member_votes.len(), 3);
        // The small CNN's embedding changes with every version: nothing keeps it.
        assert_eq!(p.embedding, None);
    }
    let expect = [
        ("images/corrupt.png", "not a decodable image"),
        ("images/truncated.png", "not a decodable image"),
        ("images/bomb.png", "over the pixel limit"),
        ("images/missing.png", "does not exist"),
    ];
    for (key, why) in expect {
        let r = reason(outcome[key]);
        assert!(r.contains(why), "{key}: reason {r:?} should say {why:?}");
    }
    // Every job was acknowledged: nothing waits, nothing was dead-lettered.
    assert_eq!(h.ready(&h.topology.prelabel_queue()).await, 0);
    assert_eq!(h.ready(&h.topology.dead_queue()).await, 0);
    h.teardown().await;
}

/// Make `key` unreadable without it being missing: a symlink to itself
/// ("too many levels of symbolic links"), which the store reports as a
/// backend error, so the worker retries the job rather than fail the item.
async fn unreadable(h: &Harness, key: &str) {
    let path = h.settings.store.root.join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(path.file_name().unwrap(), &path).unwrap();
    let err = h
        .store
        .get(key)
        .await
        .expect_err("a symlink loop is unreadable");
    assert!(err.is_transient(), "{err}");
}

/// Where a job is: (ready in each delay queue, in the dead-letter queue).
async fn whereabouts(h: &Harness) -> (Vec<u32>, u32) {
    let mut delayed = Vec::new();
    for queue in h.topology.retry_queues() {
        delayed.push(h.ready(&queue).await);
    }
    (delayed, h.ready(&h.topology.dead_queue()).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_readable_only_after_a_while_is_retried_until_it_succeeds() {
    // With the old immediate requeue, three deliveries (the limit here)
    // would have gone by within a second and dead-lettered the job.
    let mut h = Harness::with_retry_delays(&[1_000; 6]).await;
    unreadable(&h, "images/late.png").await;
    let job = h.job("images/late.png");
    let published = std::time::Instant::now();
    h.publisher.publish(&job).await.unwrap();
    h.start_worker();

    // It failed and waits in the delay queue; later the image can be read.
    sieve_testkit::eventually("the job waiting to be retried", WAIT, || async {
        (whereabouts(&h).await.0 == [1]).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    std::fs::remove_file(h.settings.store.root.join("images/late.png")).unwrap();
    h.store
        .put("images/late.png", png(28, 28, true).into())
        .await
        .unwrap();

    let results = h.results(1).await;
    let waited = published.elapsed();
    assert_eq!(results.len(), 1, "one result, no duplicate: {results:?}");
    assert_eq!(results[0].job_id, job.job_id);
    assert!(
        matches!(results[0].outcome, PrelabelOutcome::Scored(_)),
        "{}",
        reason(&results[0])
    );
    assert!(
        waited >= Duration::from_millis(2_500),
        "scored only once the image could be read: {waited:?}"
    );
    println!("scored {waited:?} after publishing, after several retries");
    assert_eq!(whereabouts(&h).await, (vec![0], 0), "nothing dead-lettered");
    assert_eq!(h.ready(&h.topology.prelabel_queue()).await, 0);
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transient_failure_waits_each_delay_then_is_dead_lettered_with_its_reason() {
    let delays = [500_u64, 1_500];
    let mut h = Harness::with_retry_delays(&delays).await;
    h.store
        .put("images/good.png", png(28, 28, true).into())
        .await
        .unwrap();
    unreadable(&h, "images/loop.png").await;
    let good = h.job("images/good.png");
    let stuck = h.job("images/loop.png");
    let published = std::time::Instant::now();
    h.publisher
        .publish_all(&[good.clone(), stuck.clone()])
        .await
        .unwrap();
    h.start_worker();

    // Follow the stuck job: 1st delay queue, 2nd delay queue, dead letters.
    // `seen[k]` is when it was first seen at stage k; a poll takes at most
    // `slop`, so a stage that lasted `d` is seen to last at least `d - slop`.
    let mut seen: [Option<std::time::Instant>; 3] = [None; 3];
    let mut slop = Duration::ZERO;
    while seen[2].is_none() {
        assert!(published.elapsed() < WAIT, "the job went missing: {seen:?}");
        let polled = std::time::Instant::now();
        let (delayed, dead) = whereabouts(&h).await;
        let stage = match (delayed.as_slice(), dead) {
            ([1, 0], 0) => Some(0),
            ([0, 1], 0) => Some(1),
            ([0, 0], 1) => Some(2),
            _ => None,
        };
        if let Some(stage) = stage {
            seen[stage].get_or_insert(polled);
        }
        slop = slop.max(polled.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let [Some(first), Some(second), Some(dead)] = seen else {
        panic!("a stage was never seen: {seen:?}");
    };
    slop += Duration::from_millis(10);
    println!(
        "waited {:?} then {:?} (delays {delays:?} ms, poll slop {slop:?}); dead-lettered {:?} after publishing",
        second - first,
        dead - second,
        dead - published
    );
    for (waited, delay) in [(second - first, delays[0]), (dead - second, delays[1])] {
        assert!(
            waited + slop >= Duration::from_millis(delay),
            "a retry came after {waited:?}, before its delay of {delay} ms"
        );
    }
    assert!(dead - published >= Duration::from_millis(delays.iter().sum()));

    // The good image in the same batch is scored once; the stuck one never
    // gets a result.
    let results = h.results(1).await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0].job_id, good.job_id);
    assert!(matches!(results[0].outcome, PrelabelOutcome::Scored(_)));

    // The dead letter is the job, with why and after how many attempts.
    let channel = h.connection.create_channel().await.unwrap();
    let message = channel
        .basic_get(
            h.topology.dead_queue().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("a dead letter");
    let letter = decode::<PrelabelJob>(&message.delivery.data).unwrap();
    assert_eq!(letter, stuck);
    let properties = &message.delivery.properties;
    assert_eq!(
        retry::origin(properties),
        (
            Some(h.topology.prelabel_queue()),
            Some(retry::RETRIES_EXHAUSTED.to_owned())
        )
    );
    assert_eq!(
        retry::attempt(properties),
        3,
        "the first try and two retries"
    );
    let error = retry::header_text(properties, retry::ERROR_HEADER).unwrap();
    assert!(error.contains("symbolic links"), "{error}");
    channel.close(200, "done".into()).await.ok();
    assert_eq!(h.ready(&h.topology.prelabel_queue()).await, 0);
    assert_eq!(h.ready(&h.topology.results_queue()).await, 0);
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_closes_at_its_byte_cap() {
    let mut h = Harness::new().await;
    h.settings.worker.batch_max_bytes = 2_500;
    h.store
        .put("images/any.png", png(28, 28, true).into())
        .await
        .unwrap();
    // The sizes the scheduler would declare; the last but one is over the
    // cap by itself.
    let sizes = [1_000_u64, 1_000, 1_000, 5_000, 1_000];
    let jobs: Vec<PrelabelJob> = sizes
        .iter()
        .map(|&size| PrelabelJob {
            size_bytes: Some(size),
            ..h.job("images/any.png")
        })
        .collect();
    h.publisher.publish_all(&jobs).await.unwrap();
    h.start_worker();

    let messages = h.result_messages(jobs.len()).await;
    let batches: Vec<usize> = messages.iter().map(Vec::len).collect();
    // Without the cap the five would be one batch (16 jobs, 500 ms).
    assert_eq!(batches, [2, 1, 1, 1], "batch sizes");
    let order: Vec<JobId> = messages.concat().iter().map(|r| r.job_id).collect();
    let published: Vec<JobId> = jobs.iter().map(|j| j.job_id).collect();
    assert_eq!(order, published, "a held-over job opens the next batch");
    assert_eq!(h.ready(&h.topology.prelabel_queue()).await, 0);
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_image_alone_in_its_batch_is_its_own_fault() {
    // The worker's store holds the job's model, so it is the right store,
    // mounted: the image is missing, not the store.
    let mut h = Harness::new().await;
    let job = h.job("images/deleted.png");
    h.publisher.publish(&job).await.unwrap();
    h.start_worker();
    let results = h.results(1).await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert!(
        reason(&results[0]).contains("does not exist"),
        "{}",
        reason(&results[0])
    );
    assert_eq!(whereabouts(&h).await, (vec![0, 0], 0), "not retried");
    h.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_on_the_wrong_store_beside_a_good_one_costs_no_job() {
    // One delay only: a job that a worker's own fault sent round twice
    // would be dead-lettered, if own faults spent the job's attempts.
    let mut h = Harness::with_retry_delays(&[200]).await;
    let jobs: Vec<PrelabelJob> = (0..64)
        .map(|i| format!("images/{i}.png"))
        .map(|key| h.job(&key))
        .collect();
    for job in &jobs {
        h.store
            .put(&job.object_key, png(28, 28, true).into())
            .await
            .unwrap();
    }
    // Another sieve store: it opens, and holds neither model nor images.
    let elsewhere = tempfile::tempdir().unwrap();
    let mut wrong = h.settings.clone();
    wrong.store.root = elsewhere.path().to_owned();
    Store::open(&wrong.store).unwrap();

    h.publisher.publish_all(&jobs).await.unwrap();
    let bad = h.spawn_worker(wrong);
    sieve_testkit::eventually("the bad worker to put jobs back", WAIT, || async {
        (whereabouts(&h).await.0.iter().sum::<u32>() > 0).then_some(())
    })
    .await;
    // Alone a while longer, it takes the same jobs again after its first
    // pauses (half a second, then one).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    h.start_worker();

    let results = h.results(jobs.len()).await;
    let scored = results
        .iter()
        .filter(|r| matches!(r.outcome, PrelabelOutcome::Scored(_)))
        .count();
    assert_eq!(scored, jobs.len(), "every job scored once: {results:?}");
    assert_eq!(whereabouts(&h).await.1, 0, "nothing dead-lettered");
    h.stop.cancel();
    bad.await.unwrap().unwrap();
    h.teardown().await;
}
