//! Heads mode on the real services. A `mobilenet_v2` project's first model
//! is torchvision's ImageNet MobileNetV2 (the real weights, from
//! `ops/fetch-weights.sh`) with untrained heads; the items it predicts come
//! back with 1280-wide embeddings; people label them; a retrain then trains
//! K heads on those
//! cached embeddings alone — the images are deleted from the store before it
//! starts, so a worker that still needed them would fail — registers a
//! version with holdout metrics, and that version is promoted over the
//! untrained one and takes over prediction.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::sieve::TestSieve;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use sieve_scheduler::entities::model_version::{self, VersionStatus};
use sieve_scheduler::entities::prediction;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::{ingest, projects, training};
use sieve_shared::embedding_table::Embeddings;
use sieve_shared::messages::{HoldoutMetrics, ModelArch, Snapshot, TrainMode};
use sieve_testkit::eventually;
use sieve_tools::fashion_mnist::Split;

const IMAGES: usize = 200;
const WAIT: Duration = Duration::from_secs(300);

async fn predictions_with_embeddings(sieve: &TestSieve, version: uuid::Uuid) -> Vec<usize> {
    prediction::Entity::find()
        .filter(prediction::Column::ModelVersionId.eq(version))
        .all(&sieve.ctx.db)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|p| p.embedding.and_then(|e| e.as_array().map(Vec::len)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heads_retrain_learns_from_cached_embeddings_alone() {
    let sieve = TestSieve::start().await;
    let db = &sieve.ctx.db;
    let policy = Policy {
        confidence_threshold: 0.99,
        disagreement_limit: 1.0,
        audit_rate: 0.0,
        ..Policy::default()
    };
    let project =
        crate::sieve::fashion_project_on(&sieve, "heads", policy, ModelArch::MobilenetV2).await;
    assert_eq!(project.arch, ModelArch::MobilenetV2);
    let v1 = model_version::Entity::find_by_id(project.active_model_version_id.unwrap())
        .one(db)
        .await
        .unwrap()
        .unwrap();
    let arch = v1.architecture.clone().unwrap();
    assert_eq!(arch["arch"], "mobilenet_v2", "{arch}");
    assert_eq!(arch["embedding_dim"], 1280, "{arch}");

    // Unlabeled images: v1 predicts them (and returns their embeddings).
    let (dir, data) = crate::sieve::fashion_images(Split::Train, IMAGES);
    let ingested = ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    let items_made = ingested.new_items as usize;
    assert!(items_made > IMAGES - 5, "{ingested:?}");
    let widths = eventually("v1's predictions with embeddings", WAIT, || async {
        let widths = predictions_with_embeddings(&sieve, v1.id).await;
        (widths.len() == items_made).then_some(widths)
    })
    .await;
    assert!(widths.iter().all(|&w| w == 1280), "{widths:?}");

    // People label them (the ground truth, written as review would).
    let items = crate::sieve::label_with_truth(&sieve, &project, dir.path(), &data).await;
    assert_eq!(items.len(), items_made);

    // The images go away: heads mode must train from the cached embeddings.
    for item in &items {
        std::fs::remove_file(sieve.settings.store.root.join(&item.object_key)).unwrap();
    }

    let project = projects::get(db, "heads").await.unwrap();
    let params = project.train_params();
    assert_eq!(
        (params.arch, params.mode),
        (ModelArch::MobilenetV2, TrainMode::Heads)
    );
    let run = training::request(&sieve.ctx, &project, "test", params, false)
        .await
        .unwrap();
    let finished = crate::sieve::succeeded(&sieve, run.run_id, WAIT).await;

    let bytes = sieve.ctx.store.get(&finished.snapshot_key).await.unwrap();
    let snapshot: Snapshot = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(snapshot.examples.len(), items_made);
    // Every example's cached embedding is in the snapshot's table, none
    // inline; the table checks out and each row is the backbone's width.
    let table = snapshot.embeddings.as_ref().expect("an embedding table");
    assert_eq!((table.rows as usize, table.dim), (items_made, 1280));
    let cached = Embeddings::load(&sieve.ctx.store, table).await.unwrap();
    assert!(
        snapshot.examples.iter().all(|e| e.embedding.is_none()
            && e.embedding_row.and_then(|r| cached.row(r)).is_some()),
        "every example carries its cached embedding"
    );

    let v2 = eventually("v2 promoted", WAIT, || async {
        let v = model_version::Entity::find_by_id(finished.model_version_id)
            .one(db)
            .await
            .ok()??;
        (v.status == VersionStatus::Active).then_some(v)
    })
    .await;
    assert_eq!(v2.architecture.as_ref().unwrap()["arch"], "mobilenet_v2");
    let metrics: HoldoutMetrics = serde_json::from_value(v2.metrics.clone().unwrap()).unwrap();
    let accuracy = metrics.accuracy.unwrap();
    println!(
        "heads on {} cached embeddings: holdout accuracy {accuracy:.3} on {} (untrained heads: {:?})",
        metrics.train_size, metrics.holdout_size, metrics.base_accuracy
    );
    assert_eq!(
        (metrics.train_size + metrics.holdout_size) as usize,
        items_made,
        "every example used"
    );
    // Ten classes: chance is 0.1. ImageNet features with a linear probe on
    // 160 examples do far better: 0.38 to 0.69 over runs on 42 holdout
    // examples (the heads' initial weights are not seeded), so three times
    // chance is the bar.
    assert!(accuracy > 0.3, "holdout accuracy {accuracy}");
    assert!(
        metrics.base_accuracy.is_some_and(|base| base < accuracy),
        "compared with the untrained heads on the same holdout: {metrics:?}"
    );

    let versions = model_version::Entity::find()
        .filter(model_version::Column::ProjectId.eq(project.id.as_uuid()))
        .count(db)
        .await
        .unwrap();
    assert_eq!(versions, 2);
    sieve.teardown().await;
}
