//! The `null` architecture, for measuring the machinery around the model
//! (`sieve-tools bench ceiling`): refused for a project unless asked for as
//! measurement-only, and, once asked for, a real worker answers every image
//! with the same uniform probabilities without decoding it, so every item
//! goes the same way through routing.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use sieve_scheduler::auth;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::prediction;
use sieve_scheduler::ingest;
use sieve_scheduler::projects;
use sieve_shared::messages::ModelArch;
use sieve_testkit::eventually;
use sieve_tools::fashion_mnist::Split;

use crate::sieve::{TestSieve, fashion_images};

const IMAGES: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_null_project_is_measurement_only_and_answers_every_image_alike() {
    let sieve = TestSieve::start().await;
    let db = &sieve.ctx.db;
    let admin = auth::create_token(db, "test-admin", Role::Admin)
        .await
        .unwrap();
    let create = |body: Value| {
        sieve
            .http
            .post(format!("{}/api/v1/projects", sieve.api))
            .bearer_auth(&admin)
            .json(&body)
            .send()
    };

    let refused = create(json!({"name": "plain", "classes": ["a", "b", "c", "d"], "arch": "null"}))
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("measurement-only"),
        "{body}"
    );
    assert!(projects::get(db, "plain").await.is_err(), "nothing written");

    let created = create(json!({
        "name": "ceiling",
        "classes": ["a", "b", "c", "d"],
        "arch": "null",
        "measurement_only": true
    }))
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let project = eventually("the null model active", Duration::from_secs(60), || async {
        projects::get(db, "ceiling")
            .await
            .ok()
            .filter(|p| p.active_model_version_id.is_some())
    })
    .await;
    assert_eq!(project.arch, ModelArch::Null);

    let (dir, _) = fashion_images(Split::Test, IMAGES);
    let summary = ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(summary.new_items, IMAGES as u64);
    let pid = project.id.as_uuid();
    let items = eventually("every item routed", Duration::from_secs(60), || async {
        let items = item::Entity::find()
            .filter(item::Column::ProjectId.eq(pid))
            .all(db)
            .await
            .ok()?;
        items
            .iter()
            .all(|i| i.state != ItemState::Queued)
            .then_some(items)
    })
    .await;
    // A quarter each, no member disagreeing: too unsure for the machine.
    assert!(items.iter().all(|i| i.state == ItemState::InReview));
    let predictions = prediction::Entity::find()
        .filter(prediction::Column::ItemId.is_in(items.iter().map(|i| i.id)))
        .all(db)
        .await
        .unwrap();
    assert_eq!(predictions.len(), IMAGES);
    for p in &predictions {
        let probabilities: Vec<f32> = serde_json::from_value(p.probabilities.clone()).unwrap();
        assert_eq!(probabilities, vec![0.25; 4]);
        assert!((p.confidence - 0.25).abs() < 1e-6 && p.disagreement.abs() < 1e-6);
    }
    sieve.teardown().await;
}
