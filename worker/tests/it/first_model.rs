//! A project can always get a model. A worker whose store is not mounted
//! takes a new project's first-model training job and fails it ("snapshot
//! unavailable"); the project then has no active version, and the items
//! ingested into it wait `queued` with nothing dispatched. A retrain over
//! HTTP (what `sieve retrain` calls too) queues the untrained first model
//! again instead of refusing for want of human labels, a good training
//! worker trains it, and the waiting items are pre-labeled and routed.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::sieve::{TestSieve, fashion_images};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder};
use serde_json::Value;
use sieve_scheduler::auth;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::prediction;
use sieve_scheduler::entities::training_run::{self, RunState};
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, ProjectName};
use sieve_scheduler::{ingest, training};
use sieve_shared::messages::ModelArch;
use sieve_testkit::eventually;
use sieve_tools::fashion_mnist::{self, Split};
use sieve_worker::context::Capability;
use sieve_worker::service;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const IMAGES: usize = 40;
const WAIT: Duration = Duration::from_secs(120);

async fn runs(sieve: &TestSieve) -> Vec<training_run::Model> {
    training_run::Entity::find()
        .order_by_asc(training_run::Column::CreatedAt)
        .all(&sieve.ctx.db)
        .await
        .unwrap()
}

async fn items_in(sieve: &TestSieve, state: ItemState) -> u64 {
    item::Entity::find()
        .filter(item::Column::State.eq(state))
        .count(&sieve.ctx.db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_first_model_is_queued_again_by_retrain_and_the_project_gets_going() {
    // The harness's worker only pre-labels: no training until the bad
    // worker below has failed the first model and stopped.
    let mut sieve = TestSieve::start_with(vec![Capability::Prelabel]).await;
    let db = sieve.ctx.db.clone();

    // A training worker whose store is not the shared one: another sieve
    // store, marked as such (an unmarked or missing root is refused at
    // start; see own_faults.rs), so it cannot find the project's snapshot.
    let unmounted = tempfile::tempdir().unwrap();
    let mut bad = sieve.settings.clone();
    bad.store.root = unmounted.path().join("another-store");
    sieve_shared::store::Store::open(&bad.store).unwrap();
    bad.http.worker_bind = SocketAddr::from(([127, 0, 0, 1], 0));
    let bad_stop = CancellationToken::new();
    let s = bad_stop.clone();
    let bad_worker = tokio::spawn(service::run(
        bad,
        vec![Capability::Train],
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        async move { s.cancelled().await },
    ));

    let classes: Vec<String> = fashion_mnist::CLASSES
        .iter()
        .map(|c| c.to_string())
        .collect();
    let project = training::create_project(
        &sieve.ctx,
        &ProjectName::parse("stuck").unwrap(),
        &ClassNames::parse(&classes).unwrap(),
        &Policy::default(),
        ModelArch::SmallCnn,
        "test",
    )
    .await
    .unwrap();
    let failed = eventually("the first model to fail", WAIT, || async {
        runs(&sieve)
            .await
            .into_iter()
            .find(|r| r.state == RunState::Failed)
    })
    .await;
    let reason = failed.error.clone().unwrap_or_default();
    assert!(reason.contains("snapshot"), "{reason}");
    bad_stop.cancel();
    bad_worker.await.unwrap().unwrap();

    // Items ingested now wait: no model, nothing dispatched.
    let (dir, _) = fashion_images(Split::Train, IMAGES);
    let ingested = ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(ingested.new_items, IMAGES as u64);
    assert!(
        projects::get(&db, "stuck")
            .await
            .unwrap()
            .active_model_version_id
            .is_none()
    );
    assert_eq!(items_in(&sieve, ItemState::Queued).await, IMAGES as u64);

    // The way out: retrain, with no human label anywhere.
    let ml = auth::create_token(&db, "ml", Role::Ml).await.unwrap();
    let queued = sieve
        .http
        .post(format!("{}/api/v1/projects/stuck/retrain", sieve.api))
        .bearer_auth(&ml)
        .send()
        .await
        .unwrap();
    let status = queued.status().as_u16();
    let run: Value = queued.json().await.unwrap();
    assert_eq!(status, 202, "retrain without an active version: {run}");
    assert_eq!(run["labels"], 0, "the untrained first model: {run}");
    assert_eq!(run["version"], 2, "{run}");
    let all = runs(&sieve).await;
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].state, RunState::Queued);
    assert_eq!(all[1].base_version_id, None);
    assert_eq!(all[1].label_count, 0);

    // A good training worker joins and the project gets going.
    sieve.spawn_worker(vec![Capability::Train]).await;
    let active = eventually("a model to become active", WAIT, || async {
        projects::get(&db, "stuck")
            .await
            .ok()?
            .active_model_version_id
    })
    .await;
    assert_eq!(Some(active), Some(all[1].model_version_id));
    eventually(
        "every waiting item pre-labeled and routed",
        WAIT,
        || async {
            let predicted = prediction::Entity::find()
                .filter(prediction::Column::ModelVersionId.eq(active))
                .count(&db)
                .await
                .ok()?;
            let queued = items_in(&sieve, ItemState::Queued).await;
            (predicted == IMAGES as u64 && queued == 0).then_some(())
        },
    )
    .await;
    let runs = runs(&sieve).await;
    println!(
        "runs: {:?}; items queued {}, in review {}, auto-labeled {}",
        runs.iter().map(|r| r.state).collect::<Vec<_>>(),
        items_in(&sieve, ItemState::Queued).await,
        items_in(&sieve, ItemState::InReview).await,
        items_in(&sieve, ItemState::AutoLabeled).await,
    );
    assert_eq!(runs[1].state, RunState::Succeeded);
    sieve.teardown().await;
}
