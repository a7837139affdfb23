//! A classification project on `res_cnn`, the small CNN with two residual
//! blocks and BatchNorm (#28), on the real services: its first model and a
//! retrain on human labels are `res_cnn` versions, the retrained one has
//! learnt (holdout accuracy well above chance), and once it is active every
//! item carries its prediction.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::sieve::TestSieve;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use sieve_scheduler::entities::model_version::VersionStatus;
use sieve_scheduler::entities::prediction;
use sieve_scheduler::ingest;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::training::registry;
use sieve_scheduler::training::{self, RetrainRequest};
use sieve_shared::messages::{HoldoutMetrics, ModelArch};
use sieve_testkit::eventually;
use sieve_tools::fashion_mnist::Split;

const IMAGES: usize = 300;
const WAIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_res_cnn_project_trains_and_predicts_with_the_residual_network() {
    let sieve = TestSieve::start().await;
    let db = &sieve.ctx.db;
    let policy = Policy {
        confidence_threshold: 0.99,
        disagreement_limit: 1.0,
        audit_rate: 0.0,
        ..Policy::default()
    };
    let project =
        crate::sieve::fashion_project_on(&sieve, "residual", policy, ModelArch::ResCnn).await;
    let v1 = crate::sieve::version(&sieve, project.active_model_version_id.unwrap()).await;
    assert_eq!(
        v1.architecture.as_ref().unwrap()["arch"],
        "res_cnn",
        "{:?}",
        v1.architecture
    );

    let (dir, data) = crate::sieve::fashion_images(Split::Train, IMAGES);
    ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    crate::sieve::label_with_truth(&sieve, &project, dir.path(), &data).await;

    let params = RetrainRequest::default().params(&project).unwrap();
    assert_eq!(params.arch, ModelArch::ResCnn);
    let run = training::request(&sieve.ctx, &project, "test", params, false)
        .await
        .unwrap();
    let run = crate::sieve::succeeded(&sieve, run.run_id, WAIT).await;
    let v2 = crate::sieve::version(&sieve, run.model_version_id).await;
    assert_eq!(v2.architecture.as_ref().unwrap()["arch"], "res_cnn");
    let metrics: HoldoutMetrics = serde_json::from_value(v2.metrics.clone().unwrap()).unwrap();
    let accuracy = metrics.accuracy.unwrap();
    println!("res_cnn on {IMAGES} human labels: holdout accuracy {accuracy:.3}");
    // Ten classes: chance is 0.1.
    assert!(accuracy > 0.4, "holdout accuracy {accuracy}: {metrics:?}");

    // v2 takes over (by hand if the gate kept it a candidate) and rescores
    // every item with the residual network's weights read back from the store.
    let decided = crate::sieve::decided(&sieve, v2.id, WAIT).await;
    if decided.status != VersionStatus::Active {
        registry::promote(&sieve.ctx, &project, v2.version)
            .await
            .unwrap();
    }
    eventually("v2's prediction on every item", WAIT, || async {
        let predicted = prediction::Entity::find()
            .filter(prediction::Column::ModelVersionId.eq(v2.id))
            .count(db)
            .await
            .ok()?;
        (predicted == IMAGES as u64).then_some(())
    })
    .await;
    sieve.teardown().await;
}
