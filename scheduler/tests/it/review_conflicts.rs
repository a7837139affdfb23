//! A label for an item that people already labeled, over HTTP on the real
//! services: 409 with a JSON error and nothing written, unless `force` is
//! sent by an `ml` or `admin` token; a reviewer's `force` is 403.

#![allow(clippy::unwrap_used)]

use chrono::Utc;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::label::{self, LabelSource};
use sieve_scheduler::entities::review_task::{self, TaskReason, TaskState};
use sieve_testkit::{App, with_app};
use uuid::Uuid;

const CLASSES: [&str; 3] = ["cat", "dog", "bird"];

async fn claim(app: &App, token: &str) -> Value {
    let (status, task) = app
        .post("/api/v1/projects/again/review/next", token, json!({}))
        .await;
    assert_eq!(status, 200, "{task}");
    task
}

async fn labels_of(app: &App, item_id: Uuid) -> Vec<label::Model> {
    label::Entity::find()
        .filter(label::Column::ItemId.eq(item_id))
        .order_by_asc(label::Column::CreatedAt)
        .all(app.db())
        .await
        .unwrap()
}

/// Put an item up for review again (as a re-review or a second review
/// does): a new open task beside its done one.
async fn reopen(app: &App, project_id: Uuid, item_id: Uuid) -> Uuid {
    let now = Utc::now().fixed_offset();
    let id = Uuid::now_v7();
    review_task::Entity::insert(review_task::ActiveModel {
        id: Set(id),
        project_id: Set(project_id),
        item_id: Set(item_id),
        prediction_id: Set(None),
        reason: Set(TaskReason::LowConfidence),
        priority: Set(100.0),
        state: Set(TaskState::Open),
        lease_holder: Set(None),
        lease_expires_at: Set(None),
        fencing_token: Set(0),
        created_at: Set(now),
        updated_at: Set(now),
        closed_at: Set(None),
    })
    .exec_without_returning(app.db())
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn a_second_human_label_needs_force_from_ml_or_admin() {
    with_app(300, |app| async move {
        let seeded = app.seed("again", &CLASSES, 1).await;
        let item_id = seeded.tasks[0].item_id;
        let alice = app.token("alice", Role::Reviewer).await;
        let bob = app.token("bob", Role::Reviewer).await;
        let ml = app.token("mia", Role::Ml).await;
        let admin = app.token("ada", Role::Admin).await;

        // Alice labels the item through the queue.
        let first = claim(&app, &alice).await;
        let (status, body) = app
            .post(
                &format!(
                    "/api/v1/review/{}/submit",
                    first["task_id"].as_str().unwrap()
                ),
                &alice,
                json!({ "fencing_token": first["fencing_token"], "class": "cat" }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(labels_of(&app, item_id).await.len(), 1);

        // The item comes up again; Bob claims it and disagrees.
        let again = reopen(&app, seeded.project.id.as_uuid(), item_id).await;
        let task = claim(&app, &bob).await;
        assert_eq!(task["task_id"].as_str().unwrap(), again.to_string());
        let submit = format!("/api/v1/review/{again}/submit");
        let token = task["fencing_token"].clone();

        let (status, body) = app
            .post(
                &submit,
                &bob,
                json!({ "fencing_token": token, "class": "dog" }),
            )
            .await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "conflict", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("already labeled") && message.contains("alice"),
            "{message}"
        );

        let (status, body) = app
            .post(
                &submit,
                &bob,
                json!({ "fencing_token": token, "class": "dog", "force": true }),
            )
            .await;
        assert_eq!(status, 403, "a reviewer may not force: {body}");
        assert_eq!(body["error"]["code"], "forbidden", "{body}");

        // Nothing was written by either refusal: one label, task still Bob's.
        let labels = labels_of(&app, item_id).await;
        assert_eq!(labels.len(), 1);
        assert_eq!(labels[0].reviewer.as_deref(), Some("alice"));
        let stored = app.task(again).await;
        assert_eq!(stored.state, TaskState::Claimed);
        assert_eq!(stored.lease_holder.as_deref(), Some("bob"));
        assert_eq!(stored.closed_at, None);

        // Bob hands it to the ML engineer, who also needs force.
        let (status, _) = app
            .post(
                &format!("/api/v1/review/{again}/release"),
                &bob,
                json!({ "fencing_token": token }),
            )
            .await;
        assert_eq!(status, 204);
        let task = claim(&app, &ml).await;
        let token = task["fencing_token"].clone();
        let (status, body) = app
            .post(
                &submit,
                &ml,
                json!({ "fencing_token": token, "class": "dog" }),
            )
            .await;
        assert_eq!(status, 409, "force is never implied: {body}");
        assert_eq!(labels_of(&app, item_id).await.len(), 1);

        let (status, body) = app
            .post(
                &submit,
                &ml,
                json!({ "fencing_token": token, "class": "dog", "force": true }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["class"], "dog");

        // Appended, not overwritten: the newest human label wins.
        let labels = labels_of(&app, item_id).await;
        assert_eq!(labels.len(), 2);
        assert!(labels.iter().all(|l| l.source == LabelSource::Human));
        assert_eq!(labels[1].reviewer.as_deref(), Some("mia"));
        assert_eq!(labels[1].class_index, Some(1));
        assert_eq!(app.task(again).await.state, TaskState::Done);
        let item = item::Entity::find_by_id(item_id)
            .one(app.db())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(item.state, ItemState::HumanLabeled);

        // An admin may force too; without force an admin is refused as well.
        let third = reopen(&app, seeded.project.id.as_uuid(), item_id).await;
        let task = claim(&app, &admin).await;
        assert_eq!(task["task_id"].as_str().unwrap(), third.to_string());
        let submit = format!("/api/v1/review/{third}/submit");
        let token = task["fencing_token"].clone();
        let (status, _) = app
            .post(
                &submit,
                &admin,
                json!({ "fencing_token": token, "class": "bird" }),
            )
            .await;
        assert_eq!(status, 409);
        let (status, body) = app
            .post(
                &submit,
                &admin,
                json!({ "fencing_token": token, "class": "bird", "force": true }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(labels_of(&app, item_id).await.len(), 3);
    })
    .await;
}

#[tokio::test]
async fn an_imported_label_counts_as_human() {
    with_app(300, |app| async move {
        let seeded = app.seed("again", &CLASSES, 1).await;
        let item_id = seeded.tasks[0].item_id;
        let bob = app.token("bob", Role::Reviewer).await;
        label::Entity::insert(label::ActiveModel {
            id: Set(Uuid::now_v7()),
            item_id: Set(item_id),
            class_index: Set(Some(2)),
            boxes: Set(None),
            source: Set(LabelSource::Import),
            reviewer: Set(None),
            prediction_id: Set(None),
            model_version_id: Set(None),
            review_task_id: Set(None),
            created_at: Set(Utc::now().fixed_offset()),
        })
        .exec_without_returning(app.db())
        .await
        .unwrap();
        let task = claim(&app, &bob).await;
        let (status, body) = app
            .post(
                &format!(
                    "/api/v1/review/{}/submit",
                    task["task_id"].as_str().unwrap()
                ),
                &bob,
                json!({ "fencing_token": task["fencing_token"], "class": "cat" }),
            )
            .await;
        assert_eq!(status, 409, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("by an import"),
            "{body}"
        );
        assert_eq!(labels_of(&app, item_id).await.len(), 1);
    })
    .await;
}
