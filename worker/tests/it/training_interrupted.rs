//! A training worker interrupted mid-run. SIGTERM: it stops at the next
//! epoch, puts the job back and exits 0. SIGKILL: no chance to clean up, the
//! broker redelivers its unacknowledged job. Either way nothing is
//! half-registered, and another worker then completes the run with exactly
//! one version registered for it.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::sieve::TestSieve;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use sieve_scheduler::entities::model_version::{self, VersionStatus};
use sieve_scheduler::entities::training_run::{self, RunState};
use sieve_scheduler::policy::Policy;
use sieve_testkit::eventually;

use sieve_scheduler::training;
use sieve_shared::messages::TrainParams;
use sieve_worker::context::Capability;

const WAIT: Duration = Duration::from_secs(120);
const IMAGES: usize = 1500;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Interrupt {
    Term,
    Kill,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_training_requeues_and_a_rerun_succeeds() {
    interrupted_run_completes_once(Interrupt::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_training_redelivers_and_a_rerun_succeeds() {
    interrupted_run_completes_once(Interrupt::Kill).await;
}

async fn interrupted_run_completes_once(interrupt: Interrupt) {
    let mut sieve = TestSieve::start_with(vec![Capability::Prelabel]).await;
    let conn = sieve.ctx.db.clone();
    let db = &conn;
    let trainer = || {
        Command::new(env!("CARGO_BIN_EXE_sieve-worker"))
            .args(["--capabilities", "train", "--listen", "127.0.0.1:0"])
            .env("SIEVE_BROKER__PREFIX", &sieve.settings.broker.prefix)
            .env("SIEVE_REDIS__PREFIX", &sieve.settings.redis.prefix)
            .env("SIEVE_STORE__ROOT", &sieve.settings.store.root)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut process = trainer();

    let project = crate::sieve::fashion_project(&sieve, "interrupted", Policy::default()).await;

    // Known labels through a manifest: training data without reviewers.
    assert_eq!(
        crate::sieve::ingest_labeled(&sieve, &project, IMAGES).await,
        IMAGES as u64
    );

    let params = TrainParams {
        epochs: 200,
        batch_size: 32,
        ..TrainParams::default()
    };
    let run = training::request(&sieve.ctx, &project, "test", params, false)
        .await
        .unwrap();
    eventually("training progress", WAIT, || async {
        let r = training_run::Entity::find_by_id(run.run_id)
            .one(db)
            .await
            .ok()??;
        r.progress.is_some().then_some(())
    })
    .await;

    if interrupt == Interrupt::Kill {
        process.kill().unwrap(); // SIGKILL: no drain, no requeue by the worker
        let status = process.wait().unwrap();
        assert!(!status.success(), "{status:?}");
    } else {
        let signalled = Instant::now();
        Command::new("kill")
            .args(["-TERM", &process.id().to_string()])
            .status()
            .unwrap();
        let status = loop {
            if let Some(status) = process.try_wait().unwrap() {
                break status;
            }
            assert!(
                signalled.elapsed() < Duration::from_secs(30),
                "the trainer did not drain"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "{status:?}");
        println!("trainer drained in {:?}", signalled.elapsed());
    }

    // Clean state: the run is not failed, its version not registered, the job queued again.
    let r = training_run::Entity::find_by_id(run.run_id)
        .one(db)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(r.state, RunState::Queued | RunState::Running),
        "{:?}",
        r.state
    );
    let v = model_version::Entity::find()
        .filter(model_version::Column::Version.eq(run.version))
        .one(db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.status, VersionStatus::Training);
    assert!(v.artifact_key.is_none());
    // The job is back in the queue (the broker notices a killed worker's
    // closed connection at once, but not within the same instant).
    let queue = sieve.ctx.topology().train_queue();
    eventually("the job back in the queue", WAIT, || async {
        let (queued, _) = sieve_shared::broker::queue_counts(&sieve.ctx.connection, &queue)
            .await
            .ok()?;
        (queued == 1).then_some(())
    })
    .await;

    // Another trainer picks it up and finishes: one version for the run.
    sieve.spawn_worker(vec![Capability::Train]).await;
    eventually("the run to succeed", WAIT, || async {
        let r = training_run::Entity::find_by_id(run.run_id)
            .one(db)
            .await
            .ok()??;
        (r.state == RunState::Succeeded).then_some(())
    })
    .await;
    let registered = model_version::Entity::find()
        .filter(model_version::Column::TrainingRunId.eq(run.run_id))
        .count(db)
        .await
        .unwrap();
    assert_eq!(registered, 1);
    let v = model_version::Entity::find()
        .filter(model_version::Column::Version.eq(run.version))
        .one(db)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        v.status,
        VersionStatus::Active | VersionStatus::Candidate
    ));
    assert!(v.artifact_key.is_some() && v.checksum.is_some());
    sieve.teardown().await;
}
