//! The review API over HTTP on the real services: show, renew, skip, undo,
//! and that every refused request writes nothing.

#![allow(clippy::unwrap_used)]

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter, TransactionTrait,
};
use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::label::{self, LabelSource};
use sieve_scheduler::entities::review_task::TaskState;
use sieve_testkit::{App, with_app};
use uuid::Uuid;

const CLASSES: [&str; 3] = ["cat", "dog", "bird"];

fn at(value: &Value) -> DateTime<Utc> {
    value.as_str().unwrap().parse().unwrap()
}

/// Equal as PostgreSQL stores them (to the microsecond).
fn same_instant(a: DateTime<Utc>, b: DateTime<Utc>) -> bool {
    (a - b).num_microseconds().is_some_and(|d| d.abs() <= 1)
}

fn uuid(value: &Value) -> Uuid {
    value.as_str().unwrap().parse().unwrap()
}

async fn claim(app: &App, project: &str, token: &str) -> Value {
    let (status, task) = app
        .post(
            &format!("/api/v1/projects/{project}/review/next"),
            token,
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{task}");
    task
}

async fn labels(app: &App) -> Vec<label::Model> {
    label::Entity::find().all(app.db()).await.unwrap()
}

#[tokio::test]
async fn show_task_gives_the_image_the_proposal_and_the_reason() {
    with_app(300, |app| async move {
        let seeded = app.seed("show", &CLASSES, 2).await;
        let alice = app.token("alice", Role::Reviewer).await;
        let bob = app.token("bob", Role::Reviewer).await;
        let ops = app.token("ops", Role::Ops).await;
        let claimed = claim(&app, "show", &alice).await;
        let first = &seeded.tasks[0];
        assert_eq!(uuid(&claimed["task_id"]), first.task_id);
        assert_eq!(claimed["lease_seconds"], 300);
        assert_eq!(claimed["remaining"], 1);

        let path = format!("/api/v1/review/{}", first.task_id);
        let (status, shown) = app.get(&path, &alice).await;
        assert_eq!(status, 200, "{shown}");
        assert_eq!(shown["state"], "claimed");
        assert_eq!(shown["reason"], "low_confidence");
        assert_eq!(shown["source"], first.source.as_str());
        assert_eq!(shown["predicted_class"], CLASSES[first.proposed]);
        assert_eq!(shown["probabilities"].as_array().unwrap().len(), 3);
        assert_eq!(shown["member_votes"], json!([0, 0, 1]));
        assert_eq!(shown["lease_holder"], "alice");
        assert_eq!(shown["fencing_token"], claimed["fencing_token"]);
        assert_eq!(shown["skip_count"], 0);
        assert_eq!(shown["label"], Value::Null);

        // Someone else sees the task but not the token that submits it.
        let (status, to_bob) = app.get(&path, &bob).await;
        assert_eq!(status, 200);
        assert!(to_bob.get("fencing_token").is_none(), "{to_bob}");

        // The image URL serves the stored PNG to the same token.
        let image = app
            .http
            .get(app.url(shown["image_url"].as_str().unwrap()))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(image.status(), 200);
        assert_eq!(image.headers()["content-type"], "image/png");
        assert_eq!(image.headers()["x-content-type-options"], "nosniff");
        assert_eq!(
            image.bytes().await.unwrap().as_ref(),
            sieve_testkit::png(0).as_slice()
        );

        assert_eq!(app.get(&path, "not-a-token").await.0, 401);
        assert_eq!(app.get(&path, &ops).await.0, 403, "ops may not review");
        assert_eq!(
            app.get(&format!("/api/v1/review/{}", Uuid::now_v7()), &alice)
                .await
                .0,
            404
        );
        assert_eq!(app.get("/api/v1/review/not-a-task", &alice).await.0, 404);
    })
    .await;
}

#[tokio::test]
async fn renew_extends_the_lease_and_a_stale_token_gets_409() {
    with_app(300, |app| async move {
        let seeded = app.seed("renew", &CLASSES, 1).await;
        let task_id = seeded.tasks[0].task_id;
        let alice = app.token("alice", Role::Reviewer).await;
        let bob = app.token("bob", Role::Reviewer).await;
        let renew = format!("/api/v1/review/{task_id}/renew");

        let claimed = claim(&app, "renew", &alice).await;
        let token = claimed["fencing_token"].as_i64().unwrap();
        let first_expiry = at(&claimed["lease_expires_at"]);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (status, lease) = app
            .post(&renew, &alice, json!({ "fencing_token": token }))
            .await;
        assert_eq!(status, 200, "{lease}");
        let renewed = at(&lease["lease_expires_at"]);
        assert!(renewed > first_expiry, "{renewed} > {first_expiry}");
        let stored = app.task(task_id).await;
        assert!(same_instant(
            stored.lease_expires_at.unwrap().to_utc(),
            renewed
        ));
        assert_eq!(stored.fencing_token, token, "a renewal is not a new claim");

        // Bad requests: nothing changes.
        for (body, expected) in [
            (json!({}), 422),
            (json!({ "fencing_token": "one" }), 422),
            (json!({ "fencing_token": token, "extra": 1 }), 422),
        ] {
            let (status, error) = app.post(&renew, &alice, body).await;
            assert_eq!(status, expected, "{error}");
            assert_eq!(error["error"]["code"], "invalid");
        }
        let (status, error) = app
            .post(&renew, &bob, json!({ "fencing_token": token }))
            .await;
        assert_eq!(status, 409, "only the holder renews: {error}");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("alice")
        );
        assert_eq!(
            app.post(&renew, "nope", json!({ "fencing_token": token }))
                .await
                .0,
            401
        );
        assert_eq!(
            app.post(
                &format!("/api/v1/review/{}/renew", Uuid::now_v7()),
                &alice,
                json!({ "fencing_token": token })
            )
            .await
            .0,
            404
        );
        assert_eq!(app.task(task_id).await, stored, "refusals wrote nothing");

        // A lease that ran out but that nobody took over can be renewed.
        app.expire_lease(task_id).await;
        let (status, _) = app
            .post(&renew, &alice, json!({ "fencing_token": token }))
            .await;
        assert_eq!(status, 200);
        assert!(app.task(task_id).await.lease_expires_at.unwrap() > Utc::now());

        // Once another reviewer claimed it, the old token is stale.
        app.expire_lease(task_id).await;
        let taken = claim(&app, "renew", &bob).await;
        assert_eq!(uuid(&taken["task_id"]), task_id);
        let (status, error) = app
            .post(&renew, &alice, json!({ "fencing_token": token }))
            .await;
        assert_eq!(status, 409, "{error}");
        assert_eq!(error["error"]["code"], "conflict");
        let after = app.task(task_id).await;
        assert_eq!(after.lease_holder.as_deref(), Some("bob"));
        assert_eq!(after.fencing_token, token + 1);
    })
    .await;
}

#[tokio::test]
async fn skip_sends_the_task_behind_the_others_and_records_why() {
    with_app(300, |app| async move {
        let seeded = app.seed("skips", &CLASSES, 3).await;
        let [a, b, c] = [0, 1, 2].map(|i| seeded.tasks[i].task_id);
        let alice = app.token("alice", Role::Reviewer).await;
        let bob = app.token("bob", Role::Reviewer).await;

        let claimed = claim(&app, "skips", &alice).await;
        assert_eq!(uuid(&claimed["task_id"]), a, "highest priority first");
        let token = claimed["fencing_token"].as_i64().unwrap();
        let skip = format!("/api/v1/review/{a}/skip");

        // Refused skips write nothing and keep the claim.
        let before = app.task(a).await;
        for (who, body, expected) in [
            (
                &alice,
                json!({ "fencing_token": token, "reason": "  " }),
                422,
            ),
            (&alice, json!({ "fencing_token": token }), 422),
            (
                &alice,
                json!({ "fencing_token": token, "reason": "x".repeat(501) }),
                422,
            ),
            (
                &alice,
                json!({ "fencing_token": token, "reason": "a\nb" }),
                422,
            ),
            (
                &alice,
                json!({ "fencing_token": token + 1, "reason": "blurry" }),
                409,
            ),
            (
                &bob,
                json!({ "fencing_token": token, "reason": "blurry" }),
                409,
            ),
        ] {
            let (status, error) = app.post(&skip, who, body).await;
            assert_eq!(status, expected, "{error}");
            assert!(error["error"]["message"].is_string(), "{error}");
        }
        assert_eq!(app.task(a).await, before);
        assert_eq!(app.skips(a).await, (0, None, None));

        let (status, skipped) = app
            .post(
                &skip,
                &alice,
                json!({ "fencing_token": token, "reason": " blurry " }),
            )
            .await;
        assert_eq!(status, 200, "{skipped}");
        assert_eq!(skipped["skip_count"], 1);
        assert_eq!(skipped["remaining"], 3, "the skipped task is open again");
        let task = app.task(a).await;
        assert_eq!(task.state, TaskState::Open);
        assert_eq!(task.lease_holder, None);
        assert_eq!(task.lease_expires_at, None);
        assert_eq!(
            app.skips(a).await,
            (1, Some("blurry".into()), Some("alice".into()))
        );
        let item = item::Entity::find_by_id(seeded.tasks[0].item_id)
            .one(app.db())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(item.state, ItemState::InReview, "a skip is not a label");
        // Skipping twice with the same claim is stale.
        let (status, _) = app
            .post(
                &skip,
                &alice,
                json!({ "fencing_token": token, "reason": "again" }),
            )
            .await;
        assert_eq!(status, 409);

        // A rescore that raises its priority does not bring it forward.
        app.db()
            .execute_unprepared(&format!(
                "UPDATE review_tasks SET priority = 1000 WHERE id = '{a}'"
            ))
            .await
            .unwrap();
        let order: Vec<Uuid> = [
            claim(&app, "skips", &bob).await,
            claim(&app, "skips", &bob).await,
            claim(&app, "skips", &bob).await,
        ]
        .iter()
        .map(|t| uuid(&t["task_id"]))
        .collect();
        assert_eq!(order, vec![b, c, a], "skipped tasks come last");

        let (_, shown) = app.get(&format!("/api/v1/review/{a}"), &alice).await;
        assert_eq!(shown["skip_count"], 1);
        assert_eq!(shown["last_skip_reason"], "blurry");
        assert_eq!(shown["last_skipped_by"], "alice");
        assert!(labels(&app).await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn undo_takes_back_only_your_own_submit_within_its_lease() {
    with_app(300, |app| async move {
        let seeded = app.seed("undo", &CLASSES, 3).await;
        let first = seeded.tasks[0].clone();
        let alice = app.token("alice", Role::Reviewer).await;
        let bob = app.token("bob", Role::Reviewer).await;
        let undo = format!("/api/v1/review/{}/undo", first.task_id);

        let claimed = claim(&app, "undo", &alice).await;
        let token = claimed["fencing_token"].as_i64().unwrap();
        // Nothing submitted yet: nothing to undo.
        let (status, error) = app
            .post(&undo, &alice, json!({ "fencing_token": token }))
            .await;
        assert_eq!(status, 409, "{error}");

        let (status, submitted) = app
            .post(
                &format!("/api/v1/review/{}/submit", first.task_id),
                &alice,
                json!({ "fencing_token": token, "class": "dog" }),
            )
            .await;
        assert_eq!(status, 200, "{submitted}");
        assert!(
            same_instant(
                at(&submitted["undo_until"]),
                at(&claimed["lease_expires_at"])
            ),
            "the undo window is the lease the submit was made under: {submitted}"
        );
        let label = uuid(&submitted["label_id"]);

        // Refusals: someone else, a wrong token, a bad body.
        let (status, error) = app
            .post(&undo, &bob, json!({ "fencing_token": token }))
            .await;
        assert_eq!(status, 403, "{error}");
        let (status, _) = app
            .post(&undo, &alice, json!({ "fencing_token": token - 1 }))
            .await;
        assert_eq!(status, 409);
        let (status, _) = app.post(&undo, &alice, json!({ "token": token })).await;
        assert_eq!(status, 422);
        assert_eq!(labels(&app).await.len(), 1, "refused undos keep the label");
        assert_eq!(app.task(first.task_id).await.state, TaskState::Done);

        // The author, in time: the label goes, the task is hers again.
        let (status, reopened) = app
            .post(&undo, &alice, json!({ "fencing_token": token }))
            .await;
        assert_eq!(status, 200, "{reopened}");
        assert_eq!(uuid(&reopened["task_id"]), first.task_id);
        assert_eq!(reopened["source"], first.source.as_str());
        let new_token = reopened["fencing_token"].as_i64().unwrap();
        assert_eq!(new_token, token + 1, "undo fences the old token");
        assert!(
            label::Entity::find_by_id(label)
                .one(app.db())
                .await
                .unwrap()
                .is_none()
        );
        let task = app.task(first.task_id).await;
        assert_eq!(task.state, TaskState::Claimed);
        assert_eq!(task.lease_holder.as_deref(), Some("alice"));
        assert_eq!(task.closed_at, None);
        let item = item::Entity::find_by_id(first.item_id)
            .one(app.db())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(item.state, ItemState::InReview);
        // Undo once; the old token submits nothing now.
        let (status, _) = app
            .post(&undo, &alice, json!({ "fencing_token": token }))
            .await;
        assert_eq!(status, 409);
        let (status, _) = app
            .post(
                &format!("/api/v1/review/{}/submit", first.task_id),
                &alice,
                json!({ "fencing_token": token, "class": "cat" }),
            )
            .await;
        assert_eq!(status, 409);

        // Label again with the new token.
        let (status, relabeled) = app
            .post(
                &format!("/api/v1/review/{}/submit", first.task_id),
                &alice,
                json!({ "fencing_token": new_token, "class": "cat" }),
            )
            .await;
        assert_eq!(status, 200, "{relabeled}");
        let stored = labels(&app).await;
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].class_index, Some(0));
        assert_eq!(stored[0].source, LabelSource::Human);
        assert_eq!(stored[0].reviewer.as_deref(), Some("alice"));

        // After the lease ran out the label stays, even for its author.
        app.expire_lease(first.task_id).await;
        let (status, error) = app
            .post(&undo, &alice, json!({ "fencing_token": new_token }))
            .await;
        assert_eq!(status, 409, "{error}");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("undo window")
        );
        assert_eq!(labels(&app).await.len(), 1);

        // A submit made after the lease ran out cannot be undone at all.
        let second = claim(&app, "undo", &bob).await;
        let second_id = uuid(&second["task_id"]);
        app.expire_lease(second_id).await;
        let (status, late) = app
            .post(
                &format!("/api/v1/review/{second_id}/submit"),
                &bob,
                json!({ "fencing_token": second["fencing_token"], "class": "bird" }),
            )
            .await;
        assert_eq!(status, 200, "a late submit nobody took over still counts");
        assert_eq!(late["undo_until"], Value::Null);
        let (status, _) = app
            .post(
                &format!("/api/v1/review/{second_id}/undo"),
                &bob,
                json!({ "fencing_token": second["fencing_token"] }),
            )
            .await;
        assert_eq!(status, 409);
        assert_eq!(
            label::Entity::find()
                .filter(label::Column::Source.eq(LabelSource::Human))
                .count(app.db())
                .await
                .unwrap(),
            2,
            "every human label that was not undone by its author is kept"
        );
    })
    .await;
}

#[tokio::test]
async fn a_claim_is_served_while_every_other_connection_is_busy() {
    with_app(300, |app| async move {
        let seeded = app.seed("busy", &CLASSES, 2).await;
        let alice = app.token("alice", Role::Reviewer).await;
        // Take every connection of the main pool, as submits waiting for the
        // disk would, and keep them until the claim has been answered.
        let mut held = Vec::new();
        for _ in 0..app.settings.database.max_connections {
            held.push(app.ctx.db.begin().await.unwrap());
        }
        // With one shared pool the claim would wait for a connection until
        // the pool's acquire timeout (10 s); the claim pool serves it.
        let claimed = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            claim(&app, "busy", &alice),
        )
        .await
        .expect("a claim must not wait for the main pool");
        assert_eq!(uuid(&claimed["task_id"]), seeded.tasks[0].task_id);
        assert_eq!(claimed["remaining"], 1);
        for transaction in held {
            transaction.rollback().await.unwrap();
        }
        // The claim took the task for alice, durably enough to be seen
        // through the main pool.
        let task = app.task(seeded.tasks[0].task_id).await;
        assert_eq!(task.state, TaskState::Claimed);
        assert_eq!(task.lease_holder.as_deref(), Some("alice"));
    })
    .await;
}
