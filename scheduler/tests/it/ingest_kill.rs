//! An ingest killed with SIGKILL half-way, then run again, on the real
//! services: every image ends up exactly once, every item is published or
//! picked up by the re-publish sweep (here: published, as a batch commits
//! only after its jobs are confirmed), and every item's bytes are stored.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use sieve_scheduler::dispatch::{self, Sweep};
use sieve_scheduler::ingest::runs::{self, RunState};
use sieve_shared::store::image_key;
use sieve_testkit::{ProjectEnv, item_ids, pngs};

const IMAGES: u32 = 4000;

/// `sieve ingest DIR` against the test's database, queues and store.
fn sieve_ingest(env: &ProjectEnv, dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sieve"));
    command
        .arg("ingest")
        .arg(dir)
        .args(["--project", &env.project.name])
        .env("SIEVE_DATABASE__URL", &env.settings.database.url)
        .env("SIEVE_BROKER__PREFIX", &env.settings.broker.prefix)
        .env("SIEVE_STORE__ROOT", env.store.path())
        // Small batches: many commits and publishes to be killed between.
        .env("SIEVE_INGEST__BATCH_SIZE", "10")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    command
}

#[tokio::test]
async fn an_ingest_killed_half_way_and_run_again_has_every_image_once_and_published() {
    let env = ProjectEnv::start("control", |s| s.ingest.batch_size = 10).await;
    let dir = tempfile::tempdir().unwrap();
    pngs(dir.path(), 0, IMAGES);

    // Start, wait until part of it is in, and kill -9.
    let mut child = sieve_ingest(&env, dir.path()).spawn().unwrap();
    let started = Instant::now();
    let at_kill = loop {
        let n = env.items().await.len();
        if n >= 300 {
            break n;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the ingest ended before it could be killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the ingest made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let after_kill = env.items().await.len();
    assert!(
        after_kill < IMAGES as usize,
        "killed half-way: {at_kill} items when the kill was sent, {after_kill} after"
    );

    // Again, to the end.
    let status = sieve_ingest(&env, dir.path()).status().unwrap();
    assert!(status.success(), "the second ingest failed: {status}");

    // Both runs are recorded: the finished one with its counts, the killed
    // one as running until its heartbeat goes stale, then interrupted.
    let runs = runs::list(&env.ctx.db, &env.project, 10).await.unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
    let (second, first) = (&runs[0], &runs[1]);
    assert_eq!(second.state, RunState::Done, "{second:?}");
    assert_eq!(second.files_seen, i64::from(IMAGES));
    assert_eq!(second.new_items + second.duplicates, i64::from(IMAGES));
    assert!(second.requested_by.starts_with("cli:"), "{second:?}");
    assert!(
        matches!(first.state, RunState::Running | RunState::Interrupted),
        "{first:?}"
    );

    // Exactly once: one item per image (the schema also forbids a second).
    let items = env.items().await;
    assert_eq!(items.len(), IMAGES as usize);
    let hashes: std::collections::HashSet<_> = items.iter().map(|i| &i.content_hash).collect();
    assert_eq!(hashes.len(), IMAGES as usize);
    // No orphans: every item's bytes are in the store.
    for item in &items {
        let key = image_key(&env.project.id.to_string(), &item.content_hash);
        assert_eq!(item.object_key, key);
        env.ctx.store.get(&key).await.unwrap();
    }

    // A batch commits only once its jobs are confirmed, so the killed run
    // left no item unpublished: the sweep finds nothing to do.
    let unpublished = items.iter().filter(|i| i.dispatched_at.is_none()).count();
    assert_eq!(unpublished, 0, "items committed without their jobs");
    let sweep = Sweep {
        created_before: Utc::now() + chrono::Duration::seconds(1),
        dispatched_before: None,
    };
    let swept = dispatch::dispatch_pending(&env.ctx, &env.project, Some(sweep))
        .await
        .unwrap();
    assert_eq!(swept, 0);

    // Every item has a job in the queue. The batches in flight at the kill
    // (at most 4 of 10) may have published jobs and never committed: those
    // jobs name items that do not exist, and their results are dropped.
    let jobs = env.drain().await;
    let all: std::collections::HashSet<_> = items.iter().map(|i| i.id).collect();
    let published = item_ids(&jobs);
    assert!(
        published.is_superset(&all),
        "{} items have no job",
        all.difference(&published).count()
    );
    let orphans = published.difference(&all).count();
    assert!(
        orphans <= 4 * 10,
        "{orphans} jobs for items that do not exist: more than the batches in flight at the kill"
    );
    assert_eq!(jobs.len(), all.len() + orphans, "an item got two jobs");
    env.teardown().await;
}
