//! `sieve retrain cancel` on the real services: a run cancelled mid-training
//! ends `cancelled`, its version is never registered, the champion stays
//! active, the worker drops the job (nothing requeued) and trains the next
//! run as usual.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::sieve::TestSieve;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use sieve_scheduler::entities::model_version::{self, VersionStatus};
use sieve_scheduler::entities::training_run::{self, RunState};
use sieve_scheduler::policy::Policy;
use sieve_scheduler::{projects, training};
use sieve_shared::messages::TrainParams;
use sieve_testkit::eventually;
use sieve_worker::context::Capability;

const WAIT: Duration = Duration::from_secs(120);
const IMAGES: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_run_stops_registers_nothing_and_the_next_run_trains() {
    let sieve = TestSieve::start_with(vec![Capability::Prelabel, Capability::Train]).await;
    let db = sieve.ctx.db.clone();
    let project = crate::sieve::fashion_project(&sieve, "cancel", Policy::default()).await;
    let champion = projects::get(&db, "cancel")
        .await
        .unwrap()
        .active_model_version_id;
    assert!(champion.is_some());

    crate::sieve::ingest_labeled(&sieve, &project, IMAGES).await;

    let long = TrainParams {
        epochs: 500,
        batch_size: 16,
        ..TrainParams::default()
    };
    let run = training::request(&sieve.ctx, &project, "test", long, false)
        .await
        .unwrap();
    eventually("training progress", WAIT, || async {
        let r = training_run::Entity::find_by_id(run.run_id)
            .one(&db)
            .await
            .ok()??;
        r.progress.is_some().then_some(())
    })
    .await;

    let cancelled = training::cancel(&sieve.ctx, &project, "test")
        .await
        .unwrap();
    assert_eq!(cancelled, run.run_id);
    let err = training::cancel(&sieve.ctx, &project, "test")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no queued or running"), "{err}");

    let r = training_run::Entity::find_by_id(run.run_id)
        .one(&db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.state, RunState::Cancelled);
    assert_eq!(r.error.as_deref(), Some("cancelled by test"));
    let v = model_version::Entity::find()
        .filter(model_version::Column::TrainingRunId.eq(run.run_id))
        .one(&db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.status, VersionStatus::Failed, "never registered");
    assert!(v.artifact_key.is_none());
    assert_eq!(
        projects::get(&db, "cancel")
            .await
            .unwrap()
            .active_model_version_id,
        champion,
        "the champion stays active"
    );

    // The only training worker stops at the next epoch and drops the job:
    // it is free for the next run, which it trains to the end.
    let short = TrainParams {
        epochs: 2,
        ..TrainParams::default()
    };
    let next = training::request(&sieve.ctx, &project, "test", short, false)
        .await
        .unwrap();
    eventually("the next run to succeed", WAIT, || async {
        let r = training_run::Entity::find_by_id(next.run_id)
            .one(&db)
            .await
            .ok()??;
        (r.state == RunState::Succeeded).then_some(())
    })
    .await;
    let (ready, _) = sieve_shared::broker::queue_counts(
        &sieve.ctx.connection,
        &sieve.ctx.topology().train_queue(),
    )
    .await
    .unwrap();
    assert_eq!(ready, 0, "the cancelled job was not requeued");
    // A late event of the cancelled run changes nothing.
    let r = training_run::Entity::find_by_id(run.run_id)
        .one(&db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.state, RunState::Cancelled);
    sieve.teardown().await;
}
