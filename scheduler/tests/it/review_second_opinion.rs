//! Second opinions (the label-error check) over HTTP on the real services:
//! a label that disagrees with a confident model opens exactly one
//! second-opinion task, which its first reviewer cannot take and another
//! reviewer can; the outcome is recorded, counted in the project status and
//! on `/metrics`; undo keeps it consistent; nothing happens with the policy
//! setting off, or when the model was not confident, or when the reviewer
//! agreed with it.

#![allow(clippy::unwrap_used)]

use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QueryOrder, Statement,
};
use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::label::{self, LabelSource};
use sieve_scheduler::entities::review_task::{self, TaskReason, TaskState};
use sieve_testkit::{App, with_app};
use uuid::Uuid;

const CLASSES: [&str; 3] = ["cat", "dog", "bird"];

fn uuid(value: &Value) -> Uuid {
    value.as_str().unwrap().parse().unwrap()
}

/// Claim the next task of `project`: `None` when there is none for this
/// caller (204).
async fn claim(app: &App, project: &str, token: &str) -> Option<Value> {
    let (status, task) = app
        .post(
            &format!("/api/v1/projects/{project}/review/next"),
            token,
            json!({}),
        )
        .await;
    match status {
        200 => Some(task),
        204 => None,
        other => panic!("claim answered {other}: {task}"),
    }
}

async fn submit(app: &App, token: &str, task: &Value, class: &str) -> (u16, Value) {
    app.post(
        &format!(
            "/api/v1/review/{}/submit",
            task["task_id"].as_str().unwrap()
        ),
        token,
        json!({ "fencing_token": task["fencing_token"], "class": class }),
    )
    .await
}

async fn set_second_review(app: &App, project: &str, admin: &str, confidence: Value) {
    let (status, body) = app
        .get(&format!("/api/v1/projects/{project}/policy"), admin)
        .await;
    assert_eq!(status, 200, "{body}");
    let mut policy = body["policy"].clone();
    policy["second_review_confidence"] = confidence;
    let response = app
        .http
        .put(app.url(&format!("/api/v1/projects/{project}/policy")))
        .bearer_auth(admin)
        .json(&policy)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
}

/// Make the model's prediction for `item` this confident.
async fn model_confidence(app: &App, item: Uuid, confidence: f32) {
    app.db()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE predictions SET confidence = $2 WHERE item_id = $1",
            [item.into(), confidence.into()],
        ))
        .await
        .unwrap();
}

async fn tasks_of(app: &App, item: Uuid) -> Vec<review_task::Model> {
    review_task::Entity::find()
        .filter(review_task::Column::ItemId.eq(item))
        .order_by_asc(review_task::Column::CreatedAt)
        .all(app.db())
        .await
        .unwrap()
}

async fn labels_of(app: &App, item: Uuid) -> Vec<label::Model> {
    label::Entity::find()
        .filter(label::Column::ItemId.eq(item))
        .order_by_asc(label::Column::CreatedAt)
        .all(app.db())
        .await
        .unwrap()
}

async fn item_state(app: &App, item: Uuid) -> ItemState {
    item::Entity::find_by_id(item)
        .one(app.db())
        .await
        .unwrap()
        .unwrap()
        .state
}

/// The `second_opinions` rows of an item: (first reviewer, first class,
/// model class, second reviewer, second class, outcome).
type Opinion = (
    String,
    i32,
    i32,
    Option<String>,
    Option<i32>,
    Option<String>,
);

async fn opinions_of(app: &App, item: Uuid) -> Vec<Opinion> {
    let rows = app
        .db()
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT first_reviewer, first_class, model_class, second_reviewer, second_class, \
             outcome FROM second_opinions WHERE item_id = $1 ORDER BY created_at",
            [item.into()],
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            (
                r.try_get("", "first_reviewer").unwrap(),
                r.try_get("", "first_class").unwrap(),
                r.try_get("", "model_class").unwrap(),
                r.try_get("", "second_reviewer").unwrap(),
                r.try_get("", "second_class").unwrap(),
                r.try_get("", "outcome").unwrap(),
            )
        })
        .collect()
}

async fn counts(app: &App, project: &str, token: &str) -> Value {
    let (status, body) = app.get(&format!("/api/v1/projects/{project}"), token).await;
    assert_eq!(status, 200, "{body}");
    body["second_opinions"].clone()
}

async fn gauge(app: &App, project: &str, outcome: &str) -> Option<f64> {
    let ops = app.token("scraper", Role::Ops).await;
    let text = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth(ops)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let labels = [
        format!("outcome=\"{outcome}\""),
        format!("project=\"{project}\""),
    ];
    text.lines().find_map(|line| {
        let rest = line.strip_prefix("sieve_review_second_opinions{")?;
        let (inside, value) = rest.split_once("} ")?;
        let mut have: Vec<&str> = inside.split(',').collect();
        have.sort_unstable();
        (have == labels).then(|| value.trim().parse().unwrap())
    })
}

#[tokio::test]
async fn a_disagreement_with_a_confident_model_gets_a_second_opinion_from_someone_else() {
    with_app(300, |app| async move {
        // Handed out in this order; the model proposes cat, dog, bird.
        let seeded = app.seed("second", &CLASSES, 3).await;
        let [confident, unsure, agreed] = [0, 1, 2].map(|i| seeded.tasks[i].item_id);
        model_confidence(&app, confident, 0.95).await;
        model_confidence(&app, unsure, 0.6).await;
        model_confidence(&app, agreed, 0.95).await;
        let alice = app.token("alice", Role::Reviewer).await;
        let bob = app.token("bob", Role::Reviewer).await;
        let admin = app.token("ada", Role::Admin).await;
        set_second_review(&app, "second", &admin, json!(0.9)).await;

        // Alice says dog where the model was 95% sure of cat.
        let task = claim(&app, "second", &alice).await.unwrap();
        assert_eq!(uuid(&task["item_id"]), confident);
        let (status, body) = submit(&app, &alice, &task, "dog").await;
        assert_eq!(status, 200, "{body}");
        let second = uuid(&body["second_opinion_task"]);
        // Her label is stored as usual and the item is labeled meanwhile.
        let labels = labels_of(&app, confident).await;
        assert_eq!(labels.len(), 1);
        assert_eq!(
            (labels[0].reviewer.as_deref(), labels[0].class_index),
            (Some("alice"), Some(1))
        );
        assert_eq!(item_state(&app, confident).await, ItemState::HumanLabeled);
        let tasks = tasks_of(&app, confident).await;
        assert_eq!(tasks.len(), 2, "exactly one second-opinion task");
        assert_eq!(tasks[1].id, second);
        assert_eq!(
            (tasks[1].reason, tasks[1].state),
            (TaskReason::SecondOpinion, TaskState::Open)
        );
        assert_eq!(
            opinions_of(&app, confident).await,
            vec![("alice".into(), 1, 0, None, None, None)]
        );

        // Disagreeing with an unsure model, or agreeing with a sure one,
        // asks for nothing.
        let task = claim(&app, "second", &alice).await.unwrap();
        assert_eq!(uuid(&task["item_id"]), unsure);
        let (status, body) = submit(&app, &alice, &task, "cat").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["second_opinion_task"], Value::Null);
        let task = claim(&app, "second", &alice).await.unwrap();
        assert_eq!(uuid(&task["item_id"]), agreed);
        let (status, body) = submit(&app, &alice, &task, "bird").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["second_opinion_task"], Value::Null);
        assert_eq!(tasks_of(&app, unsure).await.len(), 1);
        assert_eq!(tasks_of(&app, agreed).await.len(), 1);

        // The only open task is the check of her own label: not for her.
        assert!(claim(&app, "second", &alice).await.is_none());
        assert_eq!(
            counts(&app, "second", &admin).await,
            json!({"open": 1, "agreed_with_first": 0, "agreed_with_model": 0, "neither": 0})
        );

        // Bob can take it; he sees the model's proposal, not Alice's label.
        let task = claim(&app, "second", &bob).await.unwrap();
        assert_eq!(uuid(&task["task_id"]), second);
        assert_eq!(task["reason"], "second_opinion");
        assert_eq!(task["predicted_class"], "cat");
        // Alice cannot submit it with Bob's token either.
        let (status, body) = submit(&app, &alice, &task, "dog").await;
        assert_eq!(status, 409, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("held by bob"),
            "{body}"
        );
        assert_eq!(labels_of(&app, confident).await.len(), 1);

        // Bob sides with the model. No 409 for the label being checked, and
        // no third opinion.
        let (status, body) = submit(&app, &bob, &task, "cat").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["second_opinion_task"], Value::Null);
        let labels = labels_of(&app, confident).await;
        assert_eq!(labels.len(), 2, "appended, nothing overwritten");
        assert!(labels.iter().all(|l| l.source == LabelSource::Human));
        assert_eq!(
            (labels[1].reviewer.as_deref(), labels[1].class_index),
            (Some("bob"), Some(0)),
            "the newest human label is the item's label"
        );
        assert_eq!(item_state(&app, confident).await, ItemState::HumanLabeled);
        assert!(
            tasks_of(&app, confident)
                .await
                .iter()
                .all(|t| t.state == TaskState::Done)
        );
        assert_eq!(
            opinions_of(&app, confident).await,
            vec![(
                "alice".into(),
                1,
                0,
                Some("bob".into()),
                Some(0),
                Some("agreed_with_model".into())
            )]
        );
        assert_eq!(
            counts(&app, "second", &admin).await,
            json!({"open": 0, "agreed_with_first": 0, "agreed_with_model": 1, "neither": 0})
        );
        assert_eq!(gauge(&app, "second", "agreed_with_model").await, Some(1.0));
        assert_eq!(gauge(&app, "second", "open").await, Some(0.0));
        assert!(claim(&app, "second", &bob).await.is_none());
    })
    .await;
}

#[tokio::test]
async fn no_second_opinion_while_the_setting_is_off() {
    with_app(300, |app| async move {
        let seeded = app.seed("off", &CLASSES, 2).await;
        let alice = app.token("alice", Role::Reviewer).await;
        let admin = app.token("ada", Role::Admin).await;
        for task in &seeded.tasks {
            model_confidence(&app, task.item_id, 0.99).await;
        }
        // The default policy has it off.
        let task = claim(&app, "off", &alice).await.unwrap();
        let (status, body) = submit(&app, &alice, &task, "bird").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["second_opinion_task"], Value::Null);

        // On, then off again: still nothing.
        set_second_review(&app, "off", &admin, json!(0.5)).await;
        set_second_review(&app, "off", &admin, Value::Null).await;
        let task = claim(&app, "off", &alice).await.unwrap();
        let (status, body) = submit(&app, &alice, &task, "bird").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["second_opinion_task"], Value::Null);

        let tasks = review_task::Entity::find().all(app.db()).await.unwrap();
        assert_eq!(tasks.len(), 2);
        assert!(tasks.iter().all(|t| t.state == TaskState::Done));
        assert_eq!(
            counts(&app, "off", &admin).await,
            json!({"open": 0, "agreed_with_first": 0, "agreed_with_model": 0, "neither": 0})
        );
        // A value out of range is refused.
        let response = app
            .http
            .put(app.url("/api/v1/projects/off/policy"))
            .bearer_auth(&admin)
            .json(&json!({ "second_review_confidence": 1.5 }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422);
    })
    .await;
}

#[tokio::test]
async fn outcomes_are_counted_and_undo_keeps_them_consistent() {
    with_app(300, |app| async move {
        // The model proposes cat, dog, bird, each 97% sure.
        let seeded = app.seed("undo", &CLASSES, 3).await;
        let items: Vec<Uuid> = seeded.tasks.iter().map(|t| t.item_id).collect();
        for item in &items {
            model_confidence(&app, *item, 0.97).await;
        }
        let alice = app.token("alice", Role::Reviewer).await;
        let bob = app.token("bob", Role::Reviewer).await;
        let admin = app.token("ada", Role::Admin).await;
        set_second_review(&app, "undo", &admin, json!(0.95)).await;

        // Alice disagrees with the model on the first two items and holds
        // the third for now; Bob checks the first two.
        let task = claim(&app, "undo", &alice).await.unwrap();
        assert_eq!(submit(&app, &alice, &task, "dog").await.0, 200);
        let task = claim(&app, "undo", &alice).await.unwrap();
        assert_eq!(submit(&app, &alice, &task, "bird").await.0, 200);
        let mine = claim(&app, "undo", &alice).await.unwrap();
        assert_eq!(uuid(&mine["item_id"]), items[2]);

        // Bob agrees with Alice on the first item (dog).
        let check = claim(&app, "undo", &bob).await.unwrap();
        assert_eq!(uuid(&check["item_id"]), items[0]);
        assert_eq!(submit(&app, &bob, &check, "dog").await.0, 200);
        // On the second (model dog, Alice bird) he says cat: neither.
        let check = claim(&app, "undo", &bob).await.unwrap();
        assert_eq!(uuid(&check["item_id"]), items[1]);
        let (status, body) = submit(&app, &bob, &check, "cat").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            counts(&app, "undo", &admin).await,
            json!({"open": 0, "agreed_with_first": 1, "agreed_with_model": 0, "neither": 1})
        );

        // Bob takes his second opinion back: the outcome is open again, the
        // first label stands and the item stays human-labeled.
        let (status, again) = app
            .post(
                &format!("/api/v1/review/{}/undo", check["task_id"].as_str().unwrap()),
                &bob,
                json!({ "fencing_token": check["fencing_token"] }),
            )
            .await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(item_state(&app, items[1]).await, ItemState::HumanLabeled);
        let labels = labels_of(&app, items[1]).await;
        assert_eq!(labels.len(), 1);
        assert_eq!(labels[0].reviewer.as_deref(), Some("alice"));
        assert_eq!(
            counts(&app, "undo", &admin).await,
            json!({"open": 1, "agreed_with_first": 1, "agreed_with_model": 0, "neither": 0})
        );
        // He answers again, with the model this time.
        let (status, body) = submit(&app, &bob, &again, "dog").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            opinions_of(&app, items[1]).await,
            vec![(
                "alice".into(),
                2,
                1,
                Some("bob".into()),
                Some(1),
                Some("agreed_with_model".into())
            )]
        );

        // Alice labels the third item cat (model bird) and takes it back
        // before anyone checked it: the second opinion goes with the label.
        let (status, body) = submit(&app, &alice, &mine, "cat").await;
        assert_eq!(status, 200, "{body}");
        let asked = uuid(&body["second_opinion_task"]);
        let (status, mine) = app
            .post(
                &format!("/api/v1/review/{}/undo", mine["task_id"].as_str().unwrap()),
                &alice,
                json!({ "fencing_token": mine["fencing_token"] }),
            )
            .await;
        assert_eq!(status, 200, "{mine}");
        assert_eq!(app.task(asked).await.state, TaskState::Cancelled);
        assert!(opinions_of(&app, items[2]).await.is_empty());
        assert_eq!(item_state(&app, items[2]).await, ItemState::InReview);
        assert!(
            claim(&app, "undo", &bob).await.is_none(),
            "nothing left to check"
        );

        // She submits it again: a new check, which Bob now holds, so her
        // undo is refused and writes nothing.
        let (status, body) = submit(&app, &alice, &mine, "cat").await;
        assert_eq!(status, 200, "{body}");
        let asked = uuid(&body["second_opinion_task"]);
        let check = claim(&app, "undo", &bob).await.unwrap();
        assert_eq!(uuid(&check["task_id"]), asked);
        let (status, body) = app
            .post(
                &format!("/api/v1/review/{}/undo", mine["task_id"].as_str().unwrap()),
                &alice,
                json!({ "fencing_token": mine["fencing_token"] }),
            )
            .await;
        assert_eq!(status, 409, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("bob is giving a second opinion"),
            "{body}"
        );
        assert_eq!(labels_of(&app, items[2]).await.len(), 1);
        assert_eq!(app.task(asked).await.state, TaskState::Claimed);

        // Even holding the check, Alice could not answer it herself.
        app.db()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE review_tasks SET lease_holder = 'alice', \
                 lease_holder_token = (SELECT id FROM api_tokens WHERE name = 'alice') \
                 WHERE id = $1",
                [asked.into()],
            ))
            .await
            .unwrap();
        let (status, body) = submit(&app, &alice, &check, "cat").await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(labels_of(&app, items[2]).await.len(), 1);
        assert_eq!(
            counts(&app, "undo", &admin).await,
            json!({"open": 1, "agreed_with_first": 1, "agreed_with_model": 1, "neither": 0})
        );
    })
    .await;
}

/// A person is their token, not their name: the author of a label may not
/// check it, but another reviewer who happens to share the name may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namesake_with_another_token_may_give_the_second_opinion() {
    with_app(300, |app| async move {
        let seeded = app.seed("namesakes", &CLASSES, 1).await;
        let item = seeded.tasks[0].item_id;
        let admin = app.token("ada", Role::Admin).await;
        set_second_review(&app, "namesakes", &admin, json!(0.9)).await;
        model_confidence(&app, item, 0.95).await;
        let first = app.token("alice", Role::Reviewer).await;
        let namesake = app.token("alice", Role::Reviewer).await;

        let task = claim(&app, "namesakes", &first).await.unwrap();
        // The model says cat; alice says dog: a second opinion is opened.
        let (status, body) = submit(&app, &first, &task, "dog").await;
        assert_eq!(status, 200, "{body}");
        assert!(body["second_opinion_task"].is_string(), "{body}");

        // Not for the author's own token ...
        assert!(claim(&app, "namesakes", &first).await.is_none());
        // ... but for the other alice, who is someone else.
        let check = claim(&app, "namesakes", &namesake)
            .await
            .expect("a namesake with another token may give the second opinion");
        assert_eq!(uuid(&check["task_id"]), uuid(&body["second_opinion_task"]));
        let (status, decided) = submit(&app, &namesake, &check, "dog").await;
        assert_eq!(status, 200, "{decided}");
    })
    .await;
}
