//! An ingest running in the scheduler (as `POST …/ingest` starts them) when
//! the scheduler shuts down: it stops between batches, what it inserted is
//! published, its row says `interrupted` with the counts so far, and
//! running it again finishes the job with every image once.
//!
//! A named pipe among the manifest's files holds the ingest half-way
//! (reading it waits until the test writes an image into it).

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use sieve_scheduler::ingest::runs::{self, RunState};
use sieve_scheduler::ingest::{self, Source};
use sieve_testkit::{ProjectEnv, pngs};
use uuid::Uuid;

const IMAGES: u32 = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_interrupts_a_running_ingest_and_a_rerun_completes_it() {
    let env = ProjectEnv::start("control", |s| s.ingest.batch_size = 3).await;
    let dir = tempfile::tempdir().unwrap();
    pngs(dir.path(), 1, IMAGES);
    let gate = dir.path().join("gate.png");
    let made = std::process::Command::new("mkfifo")
        .arg(&gate)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo failed");
    let mut manifest = String::from("path\n");
    for n in 1..=IMAGES {
        manifest.push_str(&format!("{n}.png\n"));
        if n == IMAGES / 2 {
            manifest.push_str("gate.png\n");
        }
    }
    let list = dir.path().join("list.csv");
    std::fs::write(&list, manifest).unwrap();
    let source = Source::ManifestFile {
        path: list.clone(),
        root: None,
    };

    // Should an assertion fail while the reader still waits on the pipe,
    // open it on the way out, or the runtime would wait for that blocked
    // thread and the test hang instead of failing.
    let _unblock = Unblock(gate.clone());
    let run = runs::start(&env.ctx, &env.project, source, "ops", None, None)
        .await
        .unwrap();
    assert_eq!(run.state, RunState::Running);
    let started = Instant::now();
    while env.items().await.len() < IMAGES as usize / 2 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nothing ingested"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    env.ctx.ingest_runs.shutdown(Duration::from_secs(30)).await;
    let stopped = runs::show(&env.ctx.db, run.id).await.unwrap();
    assert_eq!(stopped.state, RunState::Interrupted, "{stopped:?}");
    assert!(
        stopped.error.as_deref().unwrap().contains("shut down"),
        "{stopped:?}"
    );
    assert_eq!(stopped.new_items, i64::from(IMAGES / 2), "{stopped:?}");
    assert!(stopped.finished_at.is_some());
    let items = env.items().await;
    assert_eq!(items.len(), IMAGES as usize / 2);
    assert!(
        items.iter().all(|i| i.dispatched_at.is_some()),
        "what was inserted before the stop is published"
    );

    // The stopped reading stage may still wait on the pipe: release it,
    // then put a plain file in its place and run the same ingest again.
    let bytes = gate_png();
    let released = {
        let (gate, bytes) = (gate.clone(), bytes.clone());
        tokio::task::spawn_blocking(move || release(&gate, &bytes))
    };
    tokio::time::timeout(Duration::from_secs(30), released)
        .await
        .expect("the pipe was not released")
        .unwrap();
    std::fs::remove_file(&gate).unwrap();
    std::fs::write(&gate, &bytes).unwrap();
    let again = tokio::time::timeout(
        Duration::from_secs(60),
        ingest::ingest_manifest(&env.ctx, &env.project, &list, None, false),
    )
    .await
    .expect("the re-run did not finish")
    .unwrap();
    assert_eq!(
        (again.new_items, again.duplicates),
        (u64::from(IMAGES / 2) + 1, u64::from(IMAGES / 2)),
        "{again:?}"
    );
    let items = env.items().await;
    assert_eq!(items.len(), IMAGES as usize + 1);
    let hashes: HashSet<&str> = items.iter().map(|i| i.content_hash.as_str()).collect();
    assert_eq!(hashes.len(), items.len(), "every image once");
    let jobs = env.drain().await;
    let published: HashSet<Uuid> = jobs.iter().map(|(j, _)| j.item_id.as_uuid()).collect();
    assert_eq!(published.len(), items.len(), "every item published");
    env.teardown().await;
}

struct Unblock(std::path::PathBuf);

impl Drop for Unblock {
    fn drop(&mut self) {
        if std::thread::panicking() && self.0.exists() {
            release(&self.0, &gate_png());
        }
    }
}

fn gate_png() -> Vec<u8> {
    let img = image::GrayImage::from_pixel(6, 6, image::Luma([200]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    bytes.into_inner()
}

/// Write `bytes` into the pipe if a reader waits on it (within a few
/// seconds); a reader that never opened it needs nothing.
fn release(pipe: &std::path::Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Linux's O_NONBLOCK: opening a pipe for writing fails at once (ENXIO)
    // while nobody has it open for reading, instead of waiting.
    const O_NONBLOCK: i32 = 0o4000;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(O_NONBLOCK)
            .open(pipe)
        {
            Ok(mut writer) => {
                writer.write_all(bytes).unwrap();
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
