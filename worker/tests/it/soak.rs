//! Soak: real `sieve-worker` processes SIGKILLed mid-batch, again and
//! again, while N images flow through prediction and routing. Nothing may
//! be lost or duplicated: every image ends as exactly one item, out of
//! `queued`, with exactly one prediction by the model version; the results
//! redelivered after each kill are absorbed as duplicates.
//!
//! N is 2,000 by default (CI); `SIEVE_SOAK_ITEMS=10000` makes it a soak run.
//! The figures are printed (`--nocapture`); the last soak run's are in
//! docs/reliability.md.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::sieve::{TestSieve, account};
use rand::Rng;
use sea_orm::{EntityTrait, PaginatorTrait};
use sieve_scheduler::entities::prediction;
use sieve_scheduler::ingest;
use sieve_scheduler::policy::Policy;
use sieve_testkit::eventually;
use sieve_tools::fashion_mnist::Split;
use sieve_worker::context::Capability;

/// Prediction workers alive at any time.
const WORKERS: usize = 2;

/// Returns before a job is quarantined, for the scheduler and every worker
/// alike (the queues are declared with it). At a kill a second, the jobs
/// that came back run alone at the head of the queue, and an ordinary one
/// can be caught in the default five kills: quarantined as a poison image
/// it is not. This test is about loss and duplication; quarantine.rs holds
/// the poison image to the default's kind of limit.
const DELIVERY_LIMIT: u32 = 50;

fn items() -> usize {
    std::env::var("SIEVE_SOAK_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn spawn_worker(sieve: &TestSieve) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sieve-worker"))
        .args([
            "--capabilities",
            "prelabel",
            "--batch-size",
            "32",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("SIEVE_BROKER__PREFIX", &sieve.settings.broker.prefix)
        .env("SIEVE_BROKER__DELIVERY_LIMIT", DELIVERY_LIMIT.to_string())
        .env("SIEVE_REDIS__PREFIX", &sieve.settings.redis.prefix)
        .env("SIEVE_STORE__ROOT", &sieve.settings.store.root)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

async fn predictions(sieve: &TestSieve) -> u64 {
    prediction::Entity::find()
        .count(&sieve.ctx.db)
        .await
        .unwrap_or(0)
}

/// `sieve_results_routed_total` by outcome, from the scheduler's metrics.
async fn routed(sieve: &TestSieve) -> Vec<(String, f64)> {
    let text = sieve.scheduler_metrics().await;
    text.lines()
        .filter(|l| l.starts_with("sieve_results_routed_total"))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            let outcome = name.split('"').nth(1).unwrap_or(name).to_owned();
            Some((outcome, value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_sigkilled_mid_batch_lose_and_duplicate_nothing() {
    let n = items();
    // The in-process worker only trains (the project's first model); the
    // predictions all come from worker processes that get killed.
    let sieve = TestSieve::start_configured(vec![Capability::Train], |s| {
        s.broker.delivery_limit = DELIVERY_LIMIT;
    })
    .await;
    let project = crate::sieve::fashion_project(&sieve, "soak", Policy::default()).await;
    let (dir, _) = crate::sieve::fashion_images(Split::Train, n);
    let distinct: HashSet<Vec<u8>> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    let images = distinct.len() as u64;
    drop(distinct);

    let started = Instant::now();
    let summary = ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(summary.new_items, images);
    println!(
        "soak: {n} images ({images} distinct) ingested in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut workers: Vec<Child> = (0..WORKERS).map(|_| spawn_worker(&sieve)).collect();
    let mut kills = 0u32;
    let mut rng = rand::rng();
    let deadline = Instant::now() + Duration::from_secs(120 + n as u64 / 10);
    loop {
        let before = predictions(&sieve).await;
        if before >= images {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stalled at {before} of {images} predictions after {kills} kills"
        );
        // Let the workers get into their batches, then kill one without
        // warning: whatever it holds unacknowledged goes back to the queue.
        tokio::time::sleep(Duration::from_millis(rng.random_range(400..1500))).await;
        if predictions(&sieve).await == before {
            continue; // nothing flowing yet (workers starting): no kill
        }
        let victim = rng.random_range(0..workers.len());
        workers[victim].kill().unwrap();
        workers[victim].wait().unwrap();
        kills += 1;
        workers[victim] = spawn_worker(&sieve);
    }
    let flowed = started.elapsed();
    crate::sieve::settled(&sieve.ctx.db, project.id, Duration::from_secs(120)).await;
    // Redelivered jobs of the last kills may still be in flight: wait for the
    // queues to empty so their duplicates are counted, too.
    eventually("the queues to drain", Duration::from_secs(120), || async {
        let (jobs, _) = sieve_shared::broker::queue_counts(
            &sieve.ctx.connection,
            &sieve.ctx.topology().prelabel_queue(),
        )
        .await
        .ok()?;
        let (results, _) = sieve_shared::broker::queue_counts(
            &sieve.ctx.connection,
            &sieve.ctx.topology().results_queue(),
        )
        .await
        .ok()?;
        (jobs == 0 && results == 0).then_some(())
    })
    .await;
    for mut w in workers {
        w.kill().ok();
        w.wait().ok();
    }

    let counts = account(&sieve.ctx.db, project.id, images).await;
    let lost = images.saturating_sub(counts.predictions + counts.failed);
    let routed = routed(&sieve).await;
    let absorbed = routed
        .iter()
        .find(|(o, _)| o == "duplicate")
        .map_or(0.0, |(_, v)| *v);
    let dead = sieve_scheduler::operate::failed::dead_letters(&sieve.ctx, 100)
        .await
        .unwrap();
    println!(
        "soak figures: items {images}, SIGKILLs {kills}, lost {lost}, duplicated {}, \
         redelivered results absorbed {absorbed}, dead letters {}, wall {:.1} s",
        counts.duplicate_predictions,
        dead.len(),
        flowed.as_secs_f64()
    );
    println!("routed by outcome: {routed:?}");
    assert_eq!(counts.failed, 0, "Fashion-MNIST images are all good");
    assert_eq!(lost, 0, "every item predicted");
    assert_eq!(
        counts.predictions, images,
        "exactly one prediction per item"
    );
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
    assert!(kills > 0, "the workers were killed at least once");
    sieve.teardown().await;
}
