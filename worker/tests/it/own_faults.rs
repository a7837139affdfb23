//! A worker's own fault is not the items' fault (issue 25 item 1).
//!
//! A worker whose store root does not exist, or is not a sieve store (an
//! empty mount point), refuses to start. A worker pointed at another sieve
//! store, where none of a batch's images can be found, retries those jobs
//! (for a worker that can read them) instead of failing the items, and its
//! `/healthz` answers 503 with the reason. Stopped, as its failing probe
//! would have it, and replaced by a good worker, every item is labeled and
//! none is failed.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use crate::sieve::{TestSieve, fashion_images, fashion_project};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::ingest;
use sieve_scheduler::policy::Policy;
use sieve_shared::Settings;
use sieve_testkit::eventually;
use sieve_tools::fashion_mnist::Split;
use sieve_worker::context::Capability;
use sieve_worker::service;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const IMAGES: usize = 40;

async fn refused(settings: Settings) -> String {
    let run = service::run(
        settings,
        vec![Capability::Prelabel],
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        std::future::pending(),
    );
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Err(err)) => format!("{err:#}"),
        Ok(Ok(())) => panic!("the worker ran and stopped instead of refusing"),
        Err(_) => panic!("the worker started instead of refusing"),
    }
}

async fn items_in(sieve: &TestSieve, state: ItemState) -> u64 {
    item::Entity::find()
        .filter(item::Column::State.eq(state))
        .count(&sieve.ctx.db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_with_the_wrong_store_fails_no_item() {
    // The harness's worker only trains: the first model becomes active, and
    // no good worker pre-labels until the bad one has had the jobs.
    let mut sieve = TestSieve::start_with(vec![Capability::Train]).await;
    let project = fashion_project(&sieve, "faults", Policy::default()).await;

    // No such directory, and an empty one (a volume not mounted): refused.
    let elsewhere = tempfile::tempdir().unwrap();
    let mut missing = sieve.settings.clone();
    missing.store.root = elsewhere.path().join("no-such-dir");
    let why = refused(missing).await;
    assert!(why.contains("no such directory"), "{why}");
    let mut empty = sieve.settings.clone();
    empty.store.root = elsewhere.path().to_owned();
    let why = refused(empty).await;
    assert!(why.contains(".sieve-store"), "{why}");

    // Another sieve store: it starts, and finds none of the images.
    let mut other = sieve.settings.clone();
    other.store.root = elsewhere.path().join("another-store");
    other.http.worker_bind = SocketAddr::from(([127, 0, 0, 1], 0));
    sieve_shared::store::Store::open(&other.store).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health = format!("http://{}/healthz", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    let bad = tokio::spawn(service::run(
        other,
        vec![Capability::Prelabel],
        listener,
        async move { s.cancelled().await },
    ));

    let (dir, _) = fashion_images(Split::Train, IMAGES);
    let ingested = ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(ingested.new_items, IMAGES as u64);

    let reasons = eventually(
        "the bad worker to say why",
        Duration::from_secs(30),
        || async {
            let response = sieve.http.get(&health).send().await.ok()?;
            if response.status() != 503 {
                return None;
            }
            let body: serde_json::Value = response.json().await.ok()?;
            let reasons = body["reasons"].to_string();
            reasons.contains("store").then_some(reasons)
        },
    )
    .await;
    assert!(reasons.contains("mounted"), "{reasons}");
    // It had the jobs, and failed none of the items.
    assert_eq!(items_in(&sieve, ItemState::Failed).await, 0);

    // Its probe fails and it is stopped; a good worker takes over.
    stop.cancel();
    bad.await.unwrap().unwrap();
    sieve.spawn_worker(vec![Capability::Prelabel]).await;
    eventually("every item labeled", Duration::from_secs(120), || async {
        (items_in(&sieve, ItemState::Queued).await == 0).then_some(())
    })
    .await;
    assert_eq!(items_in(&sieve, ItemState::Failed).await, 0);
    sieve.teardown().await;
}
