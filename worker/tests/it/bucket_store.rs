//! A scheduler and a worker that share no directory: sieve's store is an
//! S3 bucket prefix (the kit's [`Moto`], a real S3 API) and `store.root`
//! names a directory that does not exist. The whole loop runs through the
//! bucket: the first model trained and its artifact written there, images
//! copied in at ingest and read back by the worker, a retrain's snapshot
//! and new model, the rescore.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use futures_util::TryStreamExt;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::model_version::{self, VersionStatus};
use sieve_scheduler::entities::prediction;
use sieve_scheduler::ingest;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects;
use sieve_scheduler::training::{self, registry};
use sieve_shared::store::{Listed, Store};
use sieve_testkit::{Moto, eventually};
use sieve_tools::fashion_mnist::Split;
use sieve_worker::context::Capability;

use crate::sieve::{TestSieve, fashion_images, fashion_project, ingest_labeled, succeeded};

const WAIT: Duration = Duration::from_secs(180);
const UNLABELED: u64 = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_project_is_labeled_end_to_end_through_a_bucket() {
    let moto = Moto::start().await;
    moto.create_bucket("labels").await;
    let nowhere = PathBuf::from("/nonexistent/sieve-store");
    let sieve = TestSieve::start_configured(vec![Capability::Prelabel, Capability::Train], |s| {
        moto.store_in(s, "labels", "team/sieve");
        s.store.root = nowhere.clone();
    })
    .await;
    let db = &sieve.ctx.db;

    // The first model: trained by the worker, its artifact in the bucket.
    let policy = Policy {
        confidence_threshold: 0.99,
        ..Policy::default()
    };
    let project = fashion_project(&sieve, "bucket", policy).await;
    let pid = project.id.as_uuid();

    // Labeled images for training and unlabeled ones to predict, both
    // copied into the bucket and read back by the worker.
    assert_eq!(ingest_labeled(&sieve, &project, 40).await, 40);
    let (dir, _) = fashion_images(Split::Test, UNLABELED as usize);
    let summary = ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(summary.new_items, UNLABELED, "{summary:?}");
    eventually("every image predicted", WAIT, || async {
        let queued = item::Entity::find()
            .filter(item::Column::ProjectId.eq(pid))
            .filter(item::Column::State.eq(ItemState::Queued))
            .count(db)
            .await
            .ok()?;
        (queued == 0).then_some(())
    })
    .await;

    // A retrain: its snapshot written by the scheduler, read by the worker,
    // its model written back; the new version rescores what is unlabeled.
    let project = projects::get(db, "bucket").await.unwrap();
    let run = training::request(&sieve.ctx, &project, "test", Default::default(), false)
        .await
        .unwrap();
    succeeded(&sieve, run.run_id, WAIT).await;
    // Promoted on its holdout figures, or by hand if it fell short of the
    // untrained first model on so few labels: either way its activation
    // loads the new artifact from the bucket.
    let v2 = eventually("version 2 registered", WAIT, || async {
        let v = model_version::Entity::find()
            .filter(model_version::Column::ProjectId.eq(pid))
            .filter(model_version::Column::Version.eq(2))
            .one(db)
            .await
            .ok()??;
        matches!(v.status, VersionStatus::Active | VersionStatus::Candidate).then_some(v)
    })
    .await;
    if v2.status == VersionStatus::Candidate {
        registry::promote(&sieve.ctx, &project, 2).await.unwrap();
    }
    let v2 = v2.id;
    eventually("the rescore by version 2", WAIT, || async {
        let n = prediction::Entity::find()
            .filter(prediction::Column::ModelVersionId.eq(v2))
            .count(db)
            .await
            .ok()?;
        (n == UNLABELED).then_some(())
    })
    .await;
    let failed = item::Entity::find()
        .filter(item::Column::ProjectId.eq(pid))
        .filter(item::Column::State.eq(ItemState::Failed))
        .count(db)
        .await
        .unwrap();
    assert_eq!(failed, 0);

    // Everything lives under the bucket's prefix, nothing on disk.
    let bucket = Store::s3_bucket(&sieve.settings.s3, "labels").unwrap();
    let keys: Vec<String> = bucket
        .list(&format!("team/sieve/projects/{pid}"))
        .map_ok(|l: Listed| l.key)
        .try_collect()
        .await
        .unwrap();
    let under = |part: &str| keys.iter().filter(|k| k.contains(part)).count();
    assert_eq!(under("/images/"), 40 + UNLABELED as usize, "{keys:?}");
    assert!(under("/models/") >= 2, "two model artifacts: {keys:?}");
    assert!(
        under("/snapshots/") >= 1,
        "the retrain's snapshot: {keys:?}"
    );
    assert!(!nowhere.exists(), "nothing written to store.root");
    sieve.teardown().await;
}
