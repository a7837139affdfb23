//! Only a claim's holder acts on it, and the holder is a token, not a
//! name: release is refused to another reviewer like submit, renew and skip
//! are, and a second token that happens to carry the holder's name can do
//! none of them, nor see the fencing token. Refusals write nothing.

#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::review_task::TaskState;
use sieve_testkit::{App, with_app};
use uuid::Uuid;

const CLASSES: [&str; 3] = ["cat", "dog", "bird"];

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

fn uuid(value: &Value) -> Uuid {
    value.as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn release_is_refused_to_a_reviewer_who_does_not_hold_the_claim() {
    with_app(300, |app| async move {
        let seeded = app.seed("release", &CLASSES, 2).await;
        let alice = app.token("alice", Role::Reviewer).await;
        let bob = app.token("bob", Role::Reviewer).await;
        let claimed = claim(&app, "release", &alice).await;
        let task_id = uuid(&claimed["task_id"]);
        assert_eq!(task_id, seeded.tasks[0].task_id);
        let token = claimed["fencing_token"].as_i64().unwrap();
        let release = format!("/api/v1/review/{task_id}/release");
        let before = app.task(task_id).await;

        let (status, error) = app
            .post(&release, &bob, json!({ "fencing_token": token }))
            .await;
        assert_eq!(status, 409, "bob released alice's claim: {error}");
        assert_eq!(error["error"]["code"], "conflict");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("held by alice"), "{message}");
        assert_eq!(app.task(task_id).await, before, "the refusal wrote nothing");

        // A stale token is refused to the holder too.
        let (status, error) = app
            .post(&release, &alice, json!({ "fencing_token": token - 1 }))
            .await;
        assert_eq!(status, 409, "{error}");
        assert_eq!(app.task(task_id).await, before);

        // Bob cannot take it by claiming either: it is not handed out again.
        let other = claim(&app, "release", &bob).await;
        assert_ne!(uuid(&other["task_id"]), task_id);

        let (status, body) = app
            .post(&release, &alice, json!({ "fencing_token": token }))
            .await;
        assert_eq!(status, 204, "{body}");
        let task = app.task(task_id).await;
        assert_eq!(task.state, TaskState::Open);
        assert_eq!(task.lease_holder, None);
        assert_eq!(task.fencing_token, token, "a release keeps the token");
    })
    .await;
}

#[tokio::test]
async fn a_second_token_with_the_holders_name_does_not_hold_the_claim() {
    with_app(300, |app| async move {
        app.seed("namesakes", &CLASSES, 2).await;
        let alice = app.token("alice", Role::Reviewer).await;
        let namesake = app.token("alice", Role::Reviewer).await;
        let claimed = claim(&app, "namesakes", &alice).await;
        let task_id = uuid(&claimed["task_id"]);
        let token = claimed["fencing_token"].as_i64().unwrap();
        let before = app.task(task_id).await;
        assert_eq!(before.lease_holder.as_deref(), Some("alice"));

        for (step, body) in [
            ("release", json!({ "fencing_token": token })),
            ("renew", json!({ "fencing_token": token })),
            (
                "skip",
                json!({ "fencing_token": token, "reason": "blurry" }),
            ),
            ("submit", json!({ "fencing_token": token, "class": "dog" })),
        ] {
            let (status, error) = app
                .post(&format!("/api/v1/review/{task_id}/{step}"), &namesake, body)
                .await;
            assert_eq!(status, 409, "{step} by a namesake: {error}");
            let message = error["error"]["message"].as_str().unwrap();
            assert!(message.contains("another token named alice"), "{message}");
            assert_eq!(app.task(task_id).await, before, "{step} wrote nothing");
        }
        let (status, shown) = app
            .get(&format!("/api/v1/review/{task_id}"), &namesake)
            .await;
        assert_eq!(status, 200, "{shown}");
        assert_eq!(shown["lease_holder"], "alice");
        assert_eq!(shown["fencing_token"], Value::Null, "{shown}");

        // The holder's own token does all of it.
        let (status, shown) = app.get(&format!("/api/v1/review/{task_id}"), &alice).await;
        assert_eq!(status, 200);
        assert_eq!(shown["fencing_token"], token);
        let (status, body) = app
            .post(
                &format!("/api/v1/review/{task_id}/submit"),
                &alice,
                json!({ "fencing_token": token, "class": "dog" }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = app
            .post(
                &format!("/api/v1/review/{task_id}/undo"),
                &namesake,
                json!({ "fencing_token": token }),
            )
            .await;
        assert_eq!(status, 403, "undo by a namesake: {body}");
        let (status, body) = app
            .post(
                &format!("/api/v1/review/{task_id}/undo"),
                &alice,
                json!({ "fencing_token": token }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let again = body["fencing_token"].as_i64().unwrap();
        let (status, body) = app
            .post(
                &format!("/api/v1/review/{task_id}/release"),
                &namesake,
                json!({ "fencing_token": again }),
            )
            .await;
        assert_eq!(
            status, 409,
            "the undo's claim is the holder's token's: {body}"
        );
        let (status, _) = app
            .post(
                &format!("/api/v1/review/{task_id}/release"),
                &alice,
                json!({ "fencing_token": again }),
            )
            .await;
        assert_eq!(status, 204);
    })
    .await;
}
