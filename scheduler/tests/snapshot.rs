//! Training snapshots on the real services: the audit sample is never
//! trained on, and every example says whether it was picked at random — the
//! only evidence calibration may use.

#![allow(clippy::unwrap_used)]

mod review_support;

use review_support::with_app;
use sea_orm::{ActiveValue::Set, EntityTrait};
use serde_json::json;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::review_task::{self, TaskReason};
use sieve_scheduler::training;
use sieve_shared::messages::{Snapshot, Split, TrainParams};

#[tokio::test]
async fn audit_sample_is_holdout_and_random_picks_are_flagged() {
    with_app(60, |app| async move {
        let reasons = [
            TaskReason::LowConfidence,
            TaskReason::Disagreement,
            TaskReason::Seed,
            TaskReason::Audit,
            TaskReason::Sample,
        ];
        let seeded = app.seed("snap", &["cat", "dog"], 40).await;
        for (i, task) in seeded.tasks.iter().enumerate() {
            review_task::Entity::update(review_task::ActiveModel {
                id: Set(task.task_id),
                reason: Set(reasons[i % reasons.len()]),
                ..Default::default()
            })
            .exec(app.db())
            .await
            .unwrap();
        }
        let token = app.token("rev", Role::Reviewer).await;
        for _ in 0..seeded.tasks.len() {
            let (status, task) = app
                .post("/api/v1/projects/snap/review/next", &token, json!({}))
                .await;
            assert_eq!(status, 200, "{task}");
            let (status, body) = app
                .post(
                    &format!("/api/v1/review/{}/submit", task["task_id"].as_str().unwrap()),
                    &token,
                    json!({ "fencing_token": task["fencing_token"], "class": "cat" }),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }

        let run = training::request(
            &app.ctx,
            &seeded.project,
            "test",
            TrainParams::default(),
            true,
        )
        .await
        .unwrap();
        let key = format!("projects/{}/snapshots/{}.json", seeded.project.id, run.run_id);
        let snapshot: Snapshot =
            serde_json::from_slice(&app.ctx.store.get(&key).await.unwrap()).unwrap();
        assert_eq!(snapshot.examples.len(), seeded.tasks.len());

        let mut by_hash_holdout = 0;
        for example in &snapshot.examples {
            let i = seeded
                .tasks
                .iter()
                .position(|t| t.item_id == example.item_id.as_uuid())
                .unwrap();
            let reason = reasons[i % reasons.len()];
            assert_eq!(example.random, reason.is_random(), "{reason:?}");
            match reason {
                TaskReason::Audit | TaskReason::Sample => {
                    assert_eq!(example.split, Split::Holdout, "{reason:?} is never trained on");
                }
                _ => {
                    let item = sieve_scheduler::entities::item::Entity::find_by_id(
                        example.item_id.as_uuid(),
                    )
                    .one(app.db())
                    .await
                    .unwrap()
                    .unwrap();
                    assert_eq!(example.split, Split::of_hash(&item.content_hash));
                    by_hash_holdout += usize::from(example.split == Split::Holdout);
                }
            }
        }
        let audit_sample = 2 * seeded.tasks.len() / reasons.len();
        assert_eq!(run.holdout, audit_sample + by_hash_holdout);
        println!(
            "{} examples: {audit_sample} from the audit sample, {by_hash_holdout} more holdout by hash",
            snapshot.examples.len()
        );
    })
    .await;
}
