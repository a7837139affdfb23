//! Full mode on MobileNetV2, on the real services. A project's heads are
//! trained on the ImageNet backbone first (heads mode, v2); then a full-mode
//! run fine-tunes the backbone's last blocks with the heads from v2's
//! weights (v3). The fine-tuned backbone is v3's own: its architecture
//! says so, and once v3 is active, a heads-mode run trains on embeddings
//! that v3's backbone computed, never on the ImageNet backbone's, which no
//! longer describe the network.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use crate::sieve::TestSieve;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use sieve_scheduler::entities::model_version::VersionStatus;
use sieve_scheduler::entities::prediction;
use sieve_scheduler::entities::training_run;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::Project;
use sieve_scheduler::training::registry;
use sieve_scheduler::training::{self, RetrainRequest};
use sieve_scheduler::{ingest, projects};
use sieve_shared::embedding_table::Embeddings;
use sieve_shared::messages::{HoldoutMetrics, ModelArch, Snapshot, TrainMode};
use sieve_testkit::eventually;
use sieve_tools::fashion_mnist::Split;
use sieve_worker::context::Capability;

const IMAGES: usize = 200;
const WAIT: Duration = Duration::from_secs(300);

/// Runs a retrain as asked and waits for it to succeed; returns the run.
async fn retrain(
    sieve: &TestSieve,
    project: &Project,
    asked: RetrainRequest,
) -> training_run::Model {
    let params = asked.params(project).unwrap();
    let run = training::request(&sieve.ctx, project, "test", params, false)
        .await
        .unwrap();
    crate::sieve::succeeded(sieve, run.run_id, WAIT).await
}

/// A heads run's snapshot and its table of cached embeddings.
async fn snapshot_with_table(
    sieve: &TestSieve,
    run: &training_run::Model,
) -> (Snapshot, Embeddings) {
    let bytes = sieve.ctx.store.get(&run.snapshot_key).await.unwrap();
    let snapshot: Snapshot = serde_json::from_slice(&bytes).unwrap();
    let table = snapshot.embeddings.as_ref().expect("an embedding table");
    let cached = Embeddings::load(&sieve.ctx.store, table).await.unwrap();
    (snapshot, cached)
}

/// Item id -> embedding of that version's prediction, where it has one.
async fn embeddings_of(sieve: &TestSieve, version: uuid::Uuid) -> HashMap<uuid::Uuid, Vec<f32>> {
    prediction::Entity::find()
        .filter(prediction::Column::ModelVersionId.eq(version))
        .all(&sieve.ctx.db)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|p| Some((p.item_id, serde_json::from_value(p.embedding?).ok()?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_mode_fine_tunes_the_backbone_and_its_embeddings_replace_the_old_ones() {
    let sieve = TestSieve::start().await;
    let db = &sieve.ctx.db;
    let policy = Policy {
        confidence_threshold: 0.99,
        disagreement_limit: 1.0,
        audit_rate: 0.0,
        ..Policy::default()
    };
    let project =
        crate::sieve::fashion_project_on(&sieve, "full", policy, ModelArch::MobilenetV2).await;
    let v1 = project.active_model_version_id.unwrap();

    let (dir, data) = crate::sieve::fashion_images(Split::Train, IMAGES);
    let ingested = ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    let items_made = ingested.new_items as usize;
    eventually("v1's predictions with embeddings", WAIT, || async {
        (embeddings_of(&sieve, v1).await.len() == items_made).then_some(())
    })
    .await;
    crate::sieve::label_with_truth(&sieve, &project, dir.path(), &data).await;

    // Heads on the ImageNet backbone: v2, promoted over the untrained heads.
    let heads = retrain(&sieve, &project, RetrainRequest::default()).await;
    let v2 = eventually("v2 promoted", WAIT, || async {
        let v = crate::sieve::version(&sieve, heads.model_version_id).await;
        (v.status == VersionStatus::Active).then_some(v)
    })
    .await;
    let v2_arch = v2.architecture.clone().unwrap();
    assert!(
        v2_arch.get("backbone").is_none(),
        "the ImageNet backbone: {v2_arch}"
    );

    // A person asks for more blocks than the architecture has:
    // a clear refusal, nothing queued.
    let project = projects::get(db, "full").await.unwrap();
    let too_many = RetrainRequest {
        mode: Some(TrainMode::Full),
        unfrozen_blocks: Some(18),
        ..RetrainRequest::default()
    };
    let refused = too_many.params(&project).unwrap_err().to_string();
    assert!(refused.contains("17 blocks"), "{refused}");

    // Full mode: the last two blocks, the final convolution and the heads,
    // from v2's weights.
    let full = retrain(
        &sieve,
        &project,
        RetrainRequest {
            mode: Some(TrainMode::Full),
            unfrozen_blocks: Some(2),
            epochs: Some(1),
            ..RetrainRequest::default()
        },
    )
    .await;
    let params: sieve_shared::messages::TrainParams =
        serde_json::from_value(full.params.clone()).unwrap();
    assert_eq!(
        (params.mode, params.unfrozen_blocks, params.epochs),
        (TrainMode::Full, Some(2), 1)
    );
    let snapshot: Snapshot =
        serde_json::from_slice(&sieve.ctx.store.get(&full.snapshot_key).await.unwrap()).unwrap();
    assert!(
        snapshot.embeddings.is_none(),
        "full mode trains on images, not cached embeddings"
    );
    let v3 = crate::sieve::version(&sieve, full.model_version_id).await;
    let v3_arch = v3.architecture.clone().unwrap();
    assert_eq!(
        v3_arch["backbone"],
        full.model_version_id.to_string(),
        "the fine-tuned backbone is v3's own: {v3_arch}"
    );
    let metrics: HoldoutMetrics = serde_json::from_value(v3.metrics.clone().unwrap()).unwrap();
    let accuracy = metrics.accuracy.unwrap();
    println!(
        "full mode, 2 blocks, 1 epoch from v2: holdout accuracy {accuracy:.3} (v2: {:?})",
        metrics.base_accuracy
    );
    assert!(
        metrics.base_accuracy.is_some(),
        "scored beside its base on the same holdout: {metrics:?}"
    );
    // Ten classes: chance is 0.1; one gentle epoch keeps most of what v2 knew.
    assert!(accuracy > 0.25, "holdout accuracy {accuracy}");

    // v3 takes over (promoted by hand if the policy kept it a candidate);
    // the items in review are rescored by it, with its own embeddings.
    if crate::sieve::decided(&sieve, v3.id, WAIT).await.status != VersionStatus::Active {
        registry::promote(&sieve.ctx, &project, v3.version)
            .await
            .unwrap();
    }
    let v3_embeddings = eventually("v3's rescore with embeddings", WAIT, || async {
        let found = embeddings_of(&sieve, v3.id).await;
        (found.len() == items_made).then_some(found)
    })
    .await;
    let v1_embeddings = embeddings_of(&sieve, v1).await;
    let differs = v3_embeddings
        .iter()
        .filter(|(item, e)| v1_embeddings.get(item).is_some_and(|old| old != *e))
        .count();
    assert_eq!(
        differs, items_made,
        "every embedding changed with the backbone"
    );

    // Heads mode on v3: its cached embeddings, v3's, never v1's or v2's.
    let project = projects::get(db, "full").await.unwrap();
    let heads_again = retrain(&sieve, &project, RetrainRequest::default()).await;
    let (snapshot, cached) = snapshot_with_table(&sieve, &heads_again).await;
    for example in &snapshot.examples {
        let row = example
            .embedding_row
            .and_then(|r| cached.row(r))
            .expect("every example has v3's embedding");
        assert_eq!(
            row,
            v3_embeddings[&example.item_id.as_uuid()].as_slice(),
            "item {}: the snapshot must carry v3's embedding",
            example.item_id
        );
    }
    let v4 = crate::sieve::decided(&sieve, heads_again.model_version_id, WAIT).await;
    assert_eq!(
        v4.architecture.unwrap()["backbone"],
        v3.id.to_string(),
        "heads trained on v3's backbone keep it"
    );

    // Back to v2, on the ImageNet backbone: although v3's embeddings are
    // the newest, a heads run from v2 trains on the ImageNet backbone's.
    registry::promote(&sieve.ctx, &project, v2.version)
        .await
        .unwrap();
    let project = projects::get(db, "full").await.unwrap();
    let on_imagenet = retrain(&sieve, &project, RetrainRequest::default()).await;
    let (snapshot, cached) = snapshot_with_table(&sieve, &on_imagenet).await;
    for example in &snapshot.examples {
        let item = example.item_id.as_uuid();
        let row = example
            .embedding_row
            .and_then(|r| cached.row(r))
            .expect("every example has an ImageNet embedding");
        // v1's or v2's (the same backbone weights, computed in other batches).
        let close = |other: &[f32]| {
            row.iter()
                .zip(other)
                .all(|(a, b)| (a - b).abs() <= 1e-4 * (1.0 + b.abs()))
        };
        assert!(
            close(&v1_embeddings[&item]),
            "item {item}: not the ImageNet backbone's embedding"
        );
        assert!(
            !close(&v3_embeddings[&item]),
            "item {item}: v3's embedding leaked in"
        );
    }
    sieve.teardown().await;
}

/// A full-mode run whose images would not fit the worker's
/// `worker.train_images_mib` is refused with the figure before it loads
/// them; the run ends `failed` with the reason and the champion stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_mode_run_too_large_for_the_workers_memory_is_refused_with_the_figure() {
    let mut sieve = TestSieve::start_with(vec![Capability::Prelabel]).await;
    sieve.settings.worker.train_images_mib = 1;
    sieve.spawn_worker(vec![Capability::Train]).await;
    let db = &sieve.ctx.db;
    let project =
        crate::sieve::fashion_project_on(&sieve, "big", Policy::default(), ModelArch::MobilenetV2)
            .await;
    let champion = project.active_model_version_id;
    let (dir, data) = crate::sieve::fashion_images(Split::Train, 40);
    ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    crate::sieve::label_with_truth(&sieve, &project, dir.path(), &data).await;

    let asked = RetrainRequest {
        mode: Some(TrainMode::Full),
        ..RetrainRequest::default()
    };
    let run = training::request(
        &sieve.ctx,
        &project,
        "test",
        asked.params(&project).unwrap(),
        false,
    )
    .await
    .unwrap();
    let failed = eventually("the run to fail", WAIT, || async {
        let r = training_run::Entity::find_by_id(run.run_id)
            .one(db)
            .await
            .ok()??;
        (r.state == training_run::RunState::Failed).then_some(r)
    })
    .await;
    let error = failed.error.unwrap_or_default();
    assert!(
        error.contains("worker.train_images_mib = 1 MiB") && error.contains("40 images"),
        "{error}"
    );
    assert_eq!(
        projects::get(db, "big")
            .await
            .unwrap()
            .active_model_version_id,
        champion
    );
    sieve.teardown().await;
}
