//! A model activated in the middle of an ingest: every item, whether it
//! was inserted before or after the activation, gets a job naming the new
//! version, so one pass of a worker over the queue routes them all — none
//! waits for the sweeper with only a prediction by the retired version.
//!
//! The ingest is held half-way by a named pipe among its files (reading it
//! blocks until the test writes an image into it), so that the activation,
//! and its rescore, land between the first half's inserts and the second
//! half's, as when `sieve serve` activates a model during a long
//! `sieve ingest`. No worker runs: the test takes the jobs from the queue
//! and applies a result for each, as a worker would, through the result
//! consumer's own function.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};
use sieve_scheduler::entities::item::ItemState;
use sieve_scheduler::entities::model_version::VersionStatus;
use sieve_scheduler::entities::prediction;
use sieve_scheduler::ingest;
use sieve_scheduler::routing::results;
use sieve_scheduler::training::registry;
use sieve_shared::ids::ProjectId;
use sieve_shared::messages::PrelabelResult;
use sieve_testkit::{ProjectEnv, Scored, StubVersion, pngs};
use uuid::Uuid;

const IMAGES: u32 = 24;

/// A confident result for `item` by `version`, as a worker sends it.
fn scored(project: ProjectId, item: Uuid, version: Uuid) -> PrelabelResult {
    Scored::probabilities(vec![0.99, 0.01], 0)
        .margin(0.98)
        .entropy(0.06)
        .result(project, version, item)
}

/// A candidate version 2, child of `v1`, ready to be activated.
async fn candidate(env: &ProjectEnv, v1: Uuid) -> Uuid {
    StubVersion {
        number: 2,
        parent: Some(v1),
        status: VersionStatus::Candidate,
        artifact_key: "m2".into(),
        checksum: "c2".into(),
        metrics: None,
    }
    .insert(&env.ctx.db, env.project.id.as_uuid())
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_ingested_around_an_activation_are_routed_by_the_new_version() {
    let env = ProjectEnv::start("control", |s| s.ingest.batch_size = 4).await;
    let v1 = env.project.active_model_version_id.unwrap();
    let v2 = candidate(&env, v1).await;
    // A manifest of 24 images with a named pipe in the middle: batches of 4,
    // so the first 12 items are inserted and published, then reading waits.
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
    let running = {
        let (ctx, project, list) = (env.ctx.clone(), env.project.clone(), list.clone());
        tokio::spawn(
            async move { ingest::ingest_manifest(&ctx, &project, &list, None, false).await },
        )
    };
    let started = Instant::now();
    loop {
        let items = env.items().await;
        if items.len() == IMAGES as usize / 2 && items.iter().all(|i| i.dispatched_at.is_some()) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the first half was not ingested: {} items",
            items.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Activate (and rescore) while the ingest waits, then let it go on.
    registry::activate(&env.ctx, &env.project, v2)
        .await
        .unwrap();
    let feed = tokio::task::spawn_blocking(move || {
        let img = image::GrayImage::from_pixel(6, 6, image::Luma([200]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        img.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        // Opening a pipe for writing waits for its reader: the ingest.
        std::fs::write(&gate, bytes.into_inner()).unwrap();
    });
    let limit = Duration::from_secs(60);
    tokio::time::timeout(limit, feed)
        .await
        .expect("the ingest never read the pipe")
        .unwrap();
    let summary = tokio::time::timeout(limit, running)
        .await
        .expect("the ingest did not finish")
        .unwrap()
        .unwrap();
    assert_eq!(summary.new_items, u64::from(IMAGES) + 1, "{summary:?}");
    let before = IMAGES as usize / 2;

    // Every item has a job naming the new version, whenever it was inserted.
    let jobs = env.drain().await;
    let items: HashSet<Uuid> = env.items().await.iter().map(|i| i.id).collect();
    let by_v2: HashSet<Uuid> = jobs
        .iter()
        .filter(|(job, _)| job.model.version_id.as_uuid() == v2)
        .map(|(job, _)| job.item_id.as_uuid())
        .collect();
    let missing = items.difference(&by_v2).count();
    assert_eq!(
        missing,
        0,
        "{missing} of {} items have no job for the new version ({} inserted before the activation)",
        items.len(),
        before
    );

    // A worker's pass over the queue: one result per job, by the version
    // the job names. Every item ends routed, by the new version.
    let outcomes: Vec<PrelabelResult> = jobs
        .iter()
        .map(|(job, _)| {
            scored(
                job.project_id,
                job.item_id.as_uuid(),
                job.model.version_id.as_uuid(),
            )
        })
        .collect();
    for chunk in outcomes.chunks(16) {
        results::apply(&env.ctx.db, chunk).await.unwrap();
    }
    let waiting: Vec<_> = env
        .items()
        .await
        .into_iter()
        .filter(|i| i.state == ItemState::Queued)
        .collect();
    assert!(
        waiting.is_empty(),
        "{} items still wait for a prediction that routes them",
        waiting.len()
    );
    let routed_by_v2 = prediction::Entity::find()
        .filter(prediction::Column::ModelVersionId.eq(v2))
        .all(&env.ctx.db)
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.routed_to.as_deref() != Some("kept"))
        .count();
    assert_eq!(routed_by_v2, items.len());
    env.teardown().await;
}

/// An ingest batch publishes its jobs before it commits. While one is in
/// flight (its transaction holding the project's row in share mode, its
/// item inserted but not visible), an activation waits for it and then
/// rescores its item, and a result that comes back for the item waits for
/// the commit instead of being dropped as one for an unknown item. A
/// result for an item that never commits is still dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_flight_holds_back_activations_and_early_results() {
    use sea_orm::TransactionTrait;
    use sieve_scheduler::dispatch;
    use sieve_scheduler::entities::item;

    let env = ProjectEnv::start("control", |s| s.ingest.batch_size = 4).await;
    let v1 = env.project.active_model_version_id.unwrap();
    let v2 = candidate(&env, v1).await;

    // The batch: lock, read the model, insert one item (as ingest does).
    let txn = env.ctx.db.begin().await.unwrap();
    let target = dispatch::lock_for_ingest(&txn, env.project.id)
        .await
        .unwrap();
    assert_eq!(target.model.unwrap().version_id.as_uuid(), v1);
    let now = Utc::now().fixed_offset();
    let item_id = Uuid::now_v7();
    item::Entity::insert(item::ActiveModel {
        id: Set(item_id),
        project_id: Set(env.project.id.as_uuid()),
        object_key: Set("k".into()),
        source: Set("in flight".into()),
        content_hash: Set("ab".repeat(32)),
        size_bytes: Set(1),
        width: Set(Some(1)),
        height: Set(Some(1)),
        state: Set(ItemState::Queued),
        attempts: Set(0),
        last_error: Set(None),
        dispatched_at: Set(Some(now)),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec_without_returning(&txn)
    .await
    .unwrap();

    let result_for = |item: Uuid, version: Uuid| scored(env.project.id, item, version);
    // The worker was fast: the result is back before the commit.
    let early = {
        let (db, result) = (env.ctx.db.clone(), result_for(item_id, v1));
        tokio::spawn(async move { results::apply(&db, &[result]).await })
    };
    let activation = {
        let (ctx, project) = (env.ctx.clone(), env.project.clone());
        tokio::spawn(async move { registry::activate(&ctx, &project, v2).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !early.is_finished(),
        "the result did not wait for the batch"
    );
    assert!(
        !activation.is_finished(),
        "the activation did not wait for the batch"
    );

    txn.commit().await.unwrap();
    let limit = Duration::from_secs(30);
    let applied = tokio::time::timeout(limit, early)
        .await
        .expect("the result still waits after the commit")
        .unwrap()
        .unwrap();
    // Routed if it went before the activation, kept (a retired version's)
    // after it; either way applied to the item, not dropped.
    assert_ne!(applied, vec![results::Applied::UnknownItem]);
    tokio::time::timeout(limit, activation)
        .await
        .expect("the activation still waits after the commit")
        .unwrap()
        .unwrap();
    // The activation's rescore saw the batch's item.
    let jobs = env.drain().await;
    assert!(
        jobs.iter().any(
            |(job, _)| job.item_id.as_uuid() == item_id && job.model.version_id.as_uuid() == v2
        ),
        "no job for the new version: {jobs:?}"
    );

    // A result for an item that never committed: dropped, not waited on.
    let orphan = tokio::time::timeout(
        limit,
        results::apply(&env.ctx.db, &[result_for(Uuid::now_v7(), v2)]),
    )
    .await
    .expect("a result for an orphan hung")
    .unwrap();
    assert_eq!(orphan, vec![results::Applied::UnknownItem]);
    env.teardown().await;
}

/// A new version gives the items a prediction failed another try: the
/// failure may have been the old model's (NaN weights) or a worker's taken
/// for the item's. A file that never was an image, and an item that failed
/// `RESCORE_RETRIES` times, stay failed for people to look at. Each job
/// carries its image's size, for the worker's byte cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_gives_failed_items_another_try() {
    use sea_orm::ActiveModelTrait;
    use sieve_scheduler::dispatch::RESCORE_RETRIES;
    use sieve_scheduler::entities::item;
    use sieve_shared::messages::{PrelabelOutcome, SCHEMA_VERSION};

    let env = ProjectEnv::start("control", |_| {}).await;
    let v1 = env.project.active_model_version_id.unwrap();
    let dir = tempfile::tempdir().unwrap();
    pngs(dir.path(), 1, 3);
    std::fs::write(dir.path().join("notes.png"), b"not an image").unwrap();
    let summary = ingest::ingest_folder(&env.ctx, &env.project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!((summary.new_items, summary.failed), (3, 1), "{summary:?}");
    let jobs = env.drain().await;
    assert_eq!(jobs.len(), 3);
    let sizes: HashSet<Option<u64>> = jobs.iter().map(|(job, _)| job.size_bytes).collect();
    assert!(
        sizes.iter().all(|s| s.is_some_and(|s| s > 0)),
        "every job declares its image's size: {sizes:?}"
    );

    // v1 fails all three.
    let failures: Vec<PrelabelResult> = jobs
        .iter()
        .map(|(job, _)| PrelabelResult {
            schema: SCHEMA_VERSION,
            job_id: job.job_id,
            project_id: job.project_id,
            item_id: job.item_id,
            model_version_id: job.model.version_id,
            worker_id: "test".into(),
            outcome: PrelabelOutcome::Failed {
                reason: "inference produced NaN".into(),
            },
        })
        .collect();
    results::apply(&env.ctx.db, &failures).await.unwrap();
    let failed: Vec<Uuid> = jobs.iter().map(|(job, _)| job.item_id.as_uuid()).collect();
    // One of them has failed as often as a rescore retries.
    item::ActiveModel {
        id: Set(failed[2]),
        attempts: Set(RESCORE_RETRIES),
        ..Default::default()
    }
    .update(&env.ctx.db)
    .await
    .unwrap();

    let v2 = candidate(&env, v1).await;
    registry::activate(&env.ctx, &env.project, v2)
        .await
        .unwrap();
    let retried: HashSet<Uuid> = env
        .drain()
        .await
        .iter()
        .filter(|(job, _)| job.model.version_id.as_uuid() == v2)
        .map(|(job, _)| job.item_id.as_uuid())
        .collect();
    assert_eq!(retried, HashSet::from([failed[0], failed[1]]));
    let items = env.items().await;
    let state = |id: Uuid| items.iter().find(|i| i.id == id).unwrap().state;
    assert_eq!(state(failed[0]), ItemState::Queued);
    assert_eq!(state(failed[1]), ItemState::Queued);
    assert_eq!(state(failed[2]), ItemState::Failed);
    let never_an_image = items
        .iter()
        .filter(|i| i.width.is_none())
        .collect::<Vec<_>>();
    assert_eq!(never_an_image.len(), 1);
    assert_eq!(never_an_image[0].state, ItemState::Failed);

    // v2 scores them: routed like any item.
    let scored: Vec<PrelabelResult> = retried
        .iter()
        .map(|&item| scored(env.project.id, item, v2))
        .collect();
    results::apply(&env.ctx.db, &scored).await.unwrap();
    let items = env.items().await;
    for id in [failed[0], failed[1]] {
        let item = items.iter().find(|i| i.id == id).unwrap();
        assert_ne!(item.state, ItemState::Queued, "{item:?}");
        assert_ne!(item.state, ItemState::Failed, "{item:?}");
    }
    env.teardown().await;
}
