//! The walking skeleton, end to end on the real PostgreSQL, RabbitMQ and
//! Redis: ingest -> prediction naming its model version -> routing -> review
//! claimed and submitted over HTTP -> human label -> retrain -> new version
//! active -> remaining items rescored by it.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use crate::sieve::TestSieve;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde_json::{Value, json};
use sieve_scheduler::auth;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::label::{self, LabelSource};
use sieve_scheduler::entities::model_version::{self, VersionStatus};
use sieve_scheduler::entities::{prediction, review_task};
use sieve_scheduler::ingest;
use sieve_scheduler::operate::workers;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, ProjectName};
use sieve_scheduler::training;
use sieve_shared::messages::ModelArch;
use sieve_testkit::eventually;
use sieve_tools::fashion_mnist::{self, Split};
use uuid::Uuid;

const IMAGES: usize = 40;
const WAIT: Duration = Duration::from_secs(120);

async fn active_version(sieve: &TestSieve, project: &str) -> Option<model_version::Model> {
    let project = projects::get(&sieve.ctx.db, project).await.ok()?;
    let id = project.active_model_version_id?;
    model_version::Entity::find_by_id(id)
        .one(&sieve.ctx.db)
        .await
        .ok()?
}

async fn items_in(sieve: &TestSieve, project: Uuid, state: ItemState) -> u64 {
    item::Entity::find()
        .filter(item::Column::ProjectId.eq(project))
        .filter(item::Column::State.eq(state))
        .count(&sieve.ctx.db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_image_set_through_queue_worker_router_review_and_retrain() {
    let sieve = TestSieve::start().await;
    let db = &sieve.ctx.db;

    // A project whose policy sends everything an untrained model says to review.
    let classes: Vec<String> = fashion_mnist::CLASSES
        .iter()
        .map(|c| c.to_string())
        .collect();
    let policy = Policy {
        confidence_threshold: 0.99,
        disagreement_limit: 1.0,
        audit_rate: 0.0,
        ..Policy::default()
    };
    let project = training::create_project(
        &sieve.ctx,
        &ProjectName::parse("skeleton").unwrap(),
        &ClassNames::parse(&classes).unwrap(),
        &policy,
        ModelArch::SmallCnn,
        "test",
    )
    .await
    .unwrap();
    let pid = project.id.as_uuid();
    let v1 = eventually("the first model to become active", WAIT, || async {
        active_version(&sieve, "skeleton").await
    })
    .await;
    assert_eq!(v1.version, 1);
    assert_eq!(v1.status, VersionStatus::Active);

    // Real Fashion-MNIST images plus one file that is not an image.
    let dir = tempfile::tempdir().unwrap();
    let data = fashion_mnist::load(
        Path::new(fashion_mnist::DEFAULT_DIR),
        Split::Train,
        Some(IMAGES),
    )
    .expect("Fashion-MNIST is installed by .ci/run (apt-get install dataset-fashion-mnist)");
    fashion_mnist::export_png(&data, Split::Train, IMAGES, dir.path()).unwrap();
    std::fs::write(dir.path().join("broken.png"), b"this is not an image").unwrap();

    let project = projects::get(db, "skeleton").await.unwrap();
    let first = ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(first.files_seen, IMAGES as u64 + 1);
    assert_eq!(first.new_items, IMAGES as u64);
    assert_eq!(first.failed, 1);
    assert_eq!(first.dispatched, IMAGES as u64, "one job per new item");
    assert!(
        first.failures[0].reason.contains("not an image"),
        "{:?}",
        first.failures
    );
    let again = ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(
        (again.new_items, again.duplicates, again.dispatched),
        (0, IMAGES as u64 + 1, 0)
    );
    assert_eq!(
        item::Entity::find()
            .filter(item::Column::ProjectId.eq(pid))
            .count(db)
            .await
            .unwrap(),
        IMAGES as u64 + 1
    );
    let broken = item::Entity::find()
        .filter(item::Column::State.eq(ItemState::Failed))
        .filter(item::Column::ProjectId.eq(pid))
        .one(db)
        .await
        .unwrap()
        .unwrap();
    assert!(broken.last_error.unwrap().contains("not an image"));

    // Every image is predicted by v1 and, being uncertain, routed to review.
    eventually("all items routed", WAIT, || async {
        (items_in(&sieve, pid, ItemState::InReview).await == IMAGES as u64).then_some(())
    })
    .await;
    let predictions = prediction::Entity::find().all(db).await.unwrap();
    assert_eq!(predictions.len(), IMAGES);
    for p in &predictions {
        assert_eq!(
            p.model_version_id, v1.id,
            "every prediction names its model version"
        );
        assert_eq!(p.routed_to.as_deref(), Some("review"));
        let probs: Vec<f32> = serde_json::from_value(p.probabilities.clone()).unwrap();
        assert_eq!(probs.len(), 10);
        assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-3);
        let votes: Vec<u32> = serde_json::from_value(p.member_votes.clone()).unwrap();
        assert!(
            votes.len() >= 2,
            "a committee of at least two members voted"
        );
        assert!(p.confidence < 0.99 && p.margin >= 0.0 && p.entropy > 0.0);
    }
    assert_eq!(
        review_task::Entity::find().count(db).await.unwrap(),
        IMAGES as u64
    );

    // The worker is visible through its heartbeat.
    let live = eventually("a heartbeat", WAIT, || async {
        let w = workers::list(&sieve.settings.redis).await.ok()?;
        (!w.is_empty()).then_some(w)
    })
    .await;
    assert_eq!(live[0].heartbeat.backend, "flex");
    assert!(!live[0].lost);

    // Reviewers label over HTTP, with bad input refused and nothing written.
    let reviewer = auth::create_token(db, "test-reviewer", Role::Reviewer)
        .await
        .unwrap();
    let ml = auth::create_token(db, "test-ml", Role::Ml).await.unwrap();
    let claim_url = format!("{}/api/v1/projects/skeleton/review/next", sieve.api);
    let unauthenticated = sieve.http.post(&claim_url).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let missing = sieve
        .http
        .post(format!("{}/api/v1/projects/nope/review/next", sieve.api))
        .bearer_auth(&reviewer)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let labeled = 24;
    for n in 0..labeled {
        let task: Value = sieve
            .http
            .post(&claim_url)
            .bearer_auth(&reviewer)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        let (_, index) = fashion_mnist::index_of(task["source"].as_str().unwrap()).unwrap();
        let truth = fashion_mnist::CLASSES[data.labels[index] as usize];
        let submit_url = format!(
            "{}/api/v1/review/{}/submit",
            sieve.api,
            task["task_id"].as_str().unwrap()
        );
        let token = task["fencing_token"].as_i64().unwrap();
        if n == 0 {
            let bad_class = sieve
                .http
                .post(&submit_url)
                .bearer_auth(&reviewer)
                .json(&json!({ "fencing_token": token, "class": "spaceship" }))
                .send()
                .await
                .unwrap();
            assert_eq!(bad_class.status(), 422);
            let body: Value = bad_class.json().await.unwrap();
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("spaceship")
            );
            let stale = sieve
                .http
                .post(&submit_url)
                .bearer_auth(&reviewer)
                .json(&json!({ "fencing_token": token - 1, "class": truth }))
                .send()
                .await
                .unwrap();
            assert_eq!(stale.status(), 409);
            assert_eq!(
                label::Entity::find().count(db).await.unwrap(),
                0,
                "refused submits write nothing"
            );
        }
        let submitted = sieve
            .http
            .post(&submit_url)
            .bearer_auth(&reviewer)
            .json(&json!({ "fencing_token": token, "class": truth }))
            .send()
            .await
            .unwrap();
        assert_eq!(submitted.status(), 200, "{:?}", submitted.text().await);
    }
    let human = label::Entity::find()
        .filter(label::Column::Source.eq(LabelSource::Human))
        .all(db)
        .await
        .unwrap();
    assert_eq!(human.len(), labeled);
    assert_eq!(
        items_in(&sieve, pid, ItemState::HumanLabeled).await,
        labeled as u64
    );

    // Too few labels per class: a clear refusal saying what is missing.
    let mut strict = sieve.ctx.clone();
    let mut settings = (*strict.settings).clone();
    settings.training.min_labels_per_class = 1000;
    strict.settings = std::sync::Arc::new(settings);
    let project = projects::get(db, "skeleton").await.unwrap();
    let refused =
        sieve_scheduler::training::request(&strict, &project, "test", Default::default(), false)
            .await
            .expect_err("too few labels");
    assert!(
        refused.to_string().contains("tshirt-top needs"),
        "{refused}"
    );
    assert_eq!(
        model_version::Entity::find().count(db).await.unwrap(),
        1,
        "a refusal writes nothing"
    );

    // Retraining is for the ML team, not reviewers.
    let retrain_url = format!("{}/api/v1/projects/skeleton/retrain", sieve.api);
    let forbidden = sieve
        .http
        .post(&retrain_url)
        .bearer_auth(&reviewer)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let queued = sieve
        .http
        .post(&retrain_url)
        .bearer_auth(&ml)
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status(), 202);
    let run: Value = queued.json().await.unwrap();
    assert_eq!(run["version"], 2);
    assert_eq!(run["labels"], labeled);

    // The new version is registered with holdout metrics and activated.
    let v2 = eventually("model v2 to become active", WAIT, || async {
        active_version(&sieve, "skeleton")
            .await
            .filter(|v| v.version == 2)
    })
    .await;
    assert!(v2.checksum.is_some() && v2.artifact_key.is_some());
    assert!(v2.metrics.is_some());
    let v1_now = model_version::Entity::find_by_id(v1.id)
        .one(db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v1_now.status, VersionStatus::Retired);

    // Every item not labeled by a human is rescored by v2; human labels stay.
    let rescored = eventually("the rescore by v2", WAIT, || async {
        let n = prediction::Entity::find()
            .filter(prediction::Column::ModelVersionId.eq(v2.id))
            .count(db)
            .await
            .ok()?;
        (n == (IMAGES - labeled) as u64).then_some(n)
    })
    .await;
    assert_eq!(rescored, (IMAGES - labeled) as u64);
    assert_eq!(
        items_in(&sieve, pid, ItemState::HumanLabeled).await,
        labeled as u64
    );
    let human_after = label::Entity::find()
        .filter(label::Column::Source.eq(LabelSource::Human))
        .count(db)
        .await
        .unwrap();
    assert_eq!(human_after, labeled as u64, "no human label lost");
    for h in &human {
        let p = prediction::Entity::find()
            .filter(prediction::Column::ItemId.eq(h.item_id))
            .filter(prediction::Column::ModelVersionId.eq(v2.id))
            .count(db)
            .await
            .unwrap();
        assert_eq!(p, 0, "human-labeled items are not rescored");
    }
    // Rollback restores the previous version, and promote brings v2 back.
    let project = projects::get(db, "skeleton").await.unwrap();
    assert_eq!(
        sieve_scheduler::training::registry::rollback(&sieve.ctx, &project)
            .await
            .unwrap(),
        1
    );
    assert_eq!(active_version(&sieve, "skeleton").await.unwrap().id, v1.id);
    let project = projects::get(db, "skeleton").await.unwrap();
    sieve_scheduler::training::registry::promote(&sieve.ctx, &project, 2)
        .await
        .unwrap();
    assert_eq!(active_version(&sieve, "skeleton").await.unwrap().id, v2.id);

    // Every item is in exactly one state, and all are accounted for.
    let counted = items_in(&sieve, pid, ItemState::InReview).await
        + items_in(&sieve, pid, ItemState::AutoLabeled).await
        + items_in(&sieve, pid, ItemState::HumanLabeled).await
        + items_in(&sieve, pid, ItemState::Failed).await;
    assert_eq!(counted, IMAGES as u64 + 1);

    sieve.teardown().await;
}
