//! An image that kills every worker that decodes it (issue 25 item 4).
//!
//! The image is a PNG whose header claims 23,000 × 23,000 grey pixels: it
//! passes the pixel limit this test sets, and decoding it allocates 529 MB,
//! past the address-space limit the worker processes run under (`ulimit
//! -v`), so each real `sieve-worker` that tries aborts, as a worker under a
//! container memory limit is killed. A supervisor (the test) starts another
//! each time.
//!
//! Before, every crash returned every job the worker held, spending each
//! one's delivery count: the jobs beside the image came back with it, were
//! batched with it again, and after `broker.delivery_limit` crashes were
//! dead-lettered with it. Now a job that came back unanswered runs alone,
//! with nothing else held, so only its own count is spent, and at the limit
//! it is quarantined (dead-lettered; the item marked). Every other image is
//! predicted.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, PaginatorTrait, Statement};
use sieve_scheduler::entities::prediction;
use sieve_scheduler::ingest;
use sieve_scheduler::policy::Policy;
use sieve_tools::fashion_mnist::Split;
use sieve_worker::context::Capability;

use crate::sieve::{TestSieve, bomb_png, fashion_images, fashion_project};

const GOOD: usize = 40;
const DELIVERY_LIMIT: u32 = 3;
/// The bomb's side: 529 MB to decode, under the image crate's own 512 MiB
/// allocation limit (which would refuse it cleanly), over what the workers
/// may map beside their own ~170 MB.
const SIDE: u32 = 23_000;
/// The workers' address-space limit, in KiB.
const ULIMIT_KIB: u64 = 614_400;

fn spawn_worker(sieve: &TestSieve) -> Child {
    Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit -v {ULIMIT_KIB} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_sieve-worker"))
        .args([
            "--capabilities",
            "prelabel",
            "--batch-size",
            "16",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("SIEVE_BROKER__PREFIX", &sieve.settings.broker.prefix)
        .env("SIEVE_BROKER__DELIVERY_LIMIT", DELIVERY_LIMIT.to_string())
        .env("SIEVE_REDIS__PREFIX", &sieve.settings.redis.prefix)
        .env("SIEVE_STORE__ROOT", &sieve.settings.store.root)
        .env("SIEVE_INGEST__MAX_PIXELS", "1000000000")
        .env("MALLOC_ARENA_MAX", "2")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// (good items predicted, whether the bomb's item is marked dead-lettered
/// and why).
async fn progress(sieve: &TestSieve, bomb: uuid::Uuid) -> (u64, Option<String>) {
    let predicted = prediction::Entity::find()
        .count(&sieve.ctx.db)
        .await
        .unwrap();
    let row = sieve
        .ctx
        .db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT dead_letter_reason FROM items WHERE id = $1 AND dead_lettered_at IS NOT NULL",
            [bomb.into()],
        ))
        .await
        .unwrap();
    let reason = row.map(|r| {
        r.try_get::<Option<String>>("", "dead_letter_reason")
            .unwrap()
            .unwrap_or_default()
    });
    (predicted, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_that_kills_workers_is_quarantined_alone() {
    // The in-process worker only trains (the first model); every prediction
    // comes from worker processes that the image kills.
    let sieve = TestSieve::start_configured(vec![Capability::Train], |s| {
        s.broker.delivery_limit = DELIVERY_LIMIT;
        s.ingest.max_pixels = 1_000_000_000;
    })
    .await;
    let project = fashion_project(&sieve, "quarantine", Policy::default()).await;
    let (dir, _) = fashion_images(Split::Train, GOOD);
    // Sorted among the others by name: in the middle of the first batch.
    std::fs::write(dir.path().join("train-00005-bomb.png"), bomb_png(SIDE)).unwrap();
    let summary = ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(summary.new_items, GOOD as u64 + 1, "{summary:?}");
    let bomb = sieve
        .ctx
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT id FROM items WHERE source LIKE '%bomb%'",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<uuid::Uuid>("", "id")
        .unwrap();

    let mut workers: Vec<Child> = (0..2).map(|_| spawn_worker(&sieve)).collect();
    let mut crashes = 0u32;
    let deadline = Instant::now() + Duration::from_secs(180);
    let reason = loop {
        for worker in &mut workers {
            if worker.try_wait().unwrap().is_some() {
                crashes += 1;
                *worker = spawn_worker(&sieve);
            }
        }
        let (predicted, reason) = progress(&sieve, bomb).await;
        if predicted >= GOOD as u64
            && let Some(reason) = reason
        {
            break reason;
        }
        assert!(
            Instant::now() < deadline,
            "stalled: {predicted} of {GOOD} predicted, the bomb's item marked: {reason:?}, after {crashes} crashes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for mut worker in workers {
        worker.kill().ok();
        worker.wait().ok();
    }
    println!("quarantine: {crashes} worker crashes; the image's job dead-lettered as {reason}");

    // It did kill workers, and no more often than the limit allows.
    assert!(crashes >= 1, "the image never crashed a worker");
    assert!(crashes <= DELIVERY_LIMIT, "{crashes} crashes");
    assert!(
        ["quarantined", "delivery_limit"].contains(&reason.as_str()),
        "{reason}"
    );
    // Every other image was predicted, none of them marked or failed.
    let (predicted, _) = progress(&sieve, bomb).await;
    assert_eq!(predicted, GOOD as u64);
    let others_marked = sieve
        .ctx
        .db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM items
             WHERE id <> $1 AND (dead_lettered_at IS NOT NULL OR state = 'failed')",
            [bomb.into()],
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    assert_eq!(others_marked, 0, "jobs beside the image were dead-lettered");
    sieve.teardown().await;
}
