//! `GET /projects/{p}/items`, `GET /items/{id}` and
//! `POST /items/{id}/reopen` on the real services: keyset pages that list
//! every item once in a stable order, the filters, an item's whole
//! history, project scoping; a reported machine or imported label back in
//! review at the top, decided by the reviewer who labels it, counted apart
//! from audits, left alone by routing meanwhile; a human label refused
//! unless forced by ml or admin.

#![allow(clippy::unwrap_used)]

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use sieve_scheduler::auth;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::review_task::TaskReason;
use sieve_scheduler::ingest;
use sieve_scheduler::operate::status;
use sieve_scheduler::projects;
use sieve_scheduler::routing::results::{self, Applied};
use sieve_shared::ids::{ItemId, JobId, ModelVersionId};
use sieve_shared::messages::{PredictionOutput, PrelabelOutcome, PrelabelResult, SCHEMA_VERSION};
use sieve_shared::scores::Scores;
use sieve_testkit::{App, png, with_app};
use uuid::Uuid;

const CLASSES: [&str; 3] = ["sneaker", "boot", "sandal"];

pub(super) async fn sql(app: &App, text: &str, values: Vec<sea_orm::Value>) {
    app.db()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            text,
            values,
        ))
        .await
        .unwrap();
}

/// Label `item` by machine with its prediction's class, as routing does.
pub(super) async fn machine_label(app: &App, item: Uuid) {
    sql(
        app,
        "INSERT INTO labels (id, item_id, class_index, source, prediction_id, model_version_id)
         SELECT $1, p.item_id, p.top_class, 'machine', p.id, p.model_version_id
         FROM predictions p WHERE p.item_id = $2",
        vec![Uuid::now_v7().into(), item.into()],
    )
    .await;
    sql(
        app,
        "UPDATE items SET state = 'auto_labeled' WHERE id = $1",
        vec![item.into()],
    )
    .await;
    sql(
        app,
        "UPDATE review_tasks SET state = 'cancelled', closed_at = now() WHERE item_id = $1",
        vec![item.into()],
    )
    .await;
}

/// Claim the next task as `token` (it must be `task`) and label it `class`.
async fn review(app: &App, project: &str, token: &str, task: Uuid, class: &str) -> Value {
    let (status, claimed) = app
        .post(
            &format!("/api/v1/projects/{project}/review/next"),
            token,
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{claimed}");
    assert_eq!(claimed["task_id"], task.to_string(), "{claimed}");
    let (status, submitted) = app
        .post(
            &format!("/api/v1/review/{task}/submit"),
            token,
            json!({ "fencing_token": claimed["fencing_token"], "class": class }),
        )
        .await;
    assert_eq!(status, 200, "{submitted}");
    submitted
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn lists_every_item_once_in_pages_with_filters() {
    with_app(60, |app| async move {
        let seeded = app.seed("shoes", &CLASSES, 7).await;
        let items: Vec<Uuid> = seeded.tasks.iter().map(|t| t.item_id).collect();
        // 0, 1 by machine (sneaker, boot); 2 by alice (sandal); the rest in review.
        machine_label(&app, items[0]).await;
        machine_label(&app, items[1]).await;
        let alice = app.token("alice", Role::Reviewer).await;
        review(&app, "shoes", &alice, seeded.tasks[2].task_id, "sandal").await;

        // Pages of 3: every item once, in id order, the cursor from the body.
        let mut listed = Vec::new();
        let mut cursor = String::new();
        let mut pages = 0;
        loop {
            let (status, page) = app
                .get(
                    &format!("/api/v1/projects/shoes/items?limit=3&cursor={cursor}"),
                    &alice,
                )
                .await;
            assert_eq!(status, 200, "{page}");
            pages += 1;
            listed.extend(ids(&page));
            match page["next_cursor"].as_str() {
                Some(next) => cursor = next.to_owned(),
                None => break,
            }
            assert!(pages < 10, "the cursor does not advance: {page}");
        }
        let mut expected: Vec<String> = items.iter().map(Uuid::to_string).collect();
        expected.sort();
        assert_eq!(listed, expected);
        assert_eq!(pages, 3);

        let get = |query: &str| {
            let app = app.clone();
            let alice = alice.clone();
            let query = query.to_owned();
            async move {
                let (status, page) = app
                    .get(&format!("/api/v1/projects/shoes/items?{query}"), &alice)
                    .await;
                assert_eq!(status, 200, "{query}: {page}");
                page
            }
        };
        let page = get("source=machine").await;
        assert_eq!(ids(&page), [items[0].to_string(), items[1].to_string()]);
        assert_eq!(page["items"][1]["label"], "boot");
        assert_eq!(page["items"][1]["label_source"], "machine");
        assert_eq!(page["items"][1]["model_version"], 1);
        let page = get("class=sandal").await;
        assert_eq!(ids(&page), [items[2].to_string()]);
        assert_eq!(page["items"][0]["labeled_by"], "alice");
        assert_eq!(
            get("state=in_review").await["items"]
                .as_array()
                .unwrap()
                .len(),
            4
        );
        assert_eq!(
            get("state=auto_labeled,human_labeled&source=human").await["items"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        // The seeded predictions are 0.6 sure.
        assert_eq!(
            get("max_confidence=0.6").await["items"]
                .as_array()
                .unwrap()
                .len(),
            7
        );
        assert!(
            get("max_confidence=0.5").await["items"]
                .as_array()
                .unwrap()
                .is_empty()
        );

        for (query, names) in [
            ("colour=red", "max_confidence"),
            ("state=lost", "in_review"),
            ("class=clog", "sneaker"),
            ("limit=0", "1 to 500"),
            ("cursor=yesterday", "next_cursor"),
        ] {
            let (status, body) = app
                .get(&format!("/api/v1/projects/shoes/items?{query}"), &alice)
                .await;
            assert_eq!(status, 422, "{query}: {body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(names), "{query}: {message}");
        }
    })
    .await;
}

#[tokio::test]
async fn an_item_shows_its_whole_history_to_its_project_only() {
    with_app(60, |app| async move {
        let seeded = app.seed("shoes", &CLASSES, 2).await;
        app.seed("other", &CLASSES, 1).await;
        let task = &seeded.tasks[0];
        let alice = app.token("alice", Role::Reviewer).await;
        review(&app, "shoes", &alice, task.task_id, "boot").await;

        let (status, item) = app
            .get(&format!("/api/v1/items/{}", task.item_id), &alice)
            .await;
        assert_eq!(status, 200, "{item}");
        assert_eq!(item["project"], "shoes");
        assert_eq!(item["state"], "human_labeled");
        assert_eq!(item["class_names"], json!(CLASSES));
        let predictions = item["predictions"].as_array().unwrap();
        assert_eq!(predictions.len(), 1, "{item}");
        assert_eq!(predictions[0]["model_version"], 1);
        assert_eq!(predictions[0]["predicted"], "sneaker");
        assert_eq!(predictions[0]["member_votes"], json!([0, 0, 1]));
        assert_eq!(predictions[0]["probabilities"].as_array().unwrap().len(), 3);
        let labels = item["labels"].as_array().unwrap();
        assert_eq!(labels.len(), 1, "{item}");
        assert_eq!(labels[0]["class"], "boot");
        assert_eq!(labels[0]["source"], "human");
        assert_eq!(labels[0]["labeled_by"], "alice");
        assert!(labels[0]["labeled_by_token"].is_string(), "{item}");
        assert_eq!(item["label"]["label_id"], labels[0]["label_id"]);
        let tasks = item["review_tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 1, "{item}");
        assert_eq!(tasks[0]["reason"], "low_confidence");
        assert_eq!(tasks[0]["outcome"], "labeled");
        assert_eq!(tasks[0]["label_id"], labels[0]["label_id"]);

        // An open task has no outcome yet.
        let (_, open) = app
            .get(
                &format!("/api/v1/items/{}", seeded.tasks[1].item_id),
                &alice,
            )
            .await;
        assert_eq!(open["review_tasks"][0]["outcome"], Value::Null, "{open}");
        assert_eq!(open["label"], Value::Null);

        // A token scoped to another project sees neither the item nor the list.
        let other = projects::get(app.db(), "other").await.unwrap();
        let scoped = auth::create_scoped_token(app.db(), "eve", Role::Admin, Some(&other))
            .await
            .unwrap();
        let (status, _) = app
            .get(&format!("/api/v1/items/{}", task.item_id), &scoped)
            .await;
        assert_eq!(status, 404);
        let (status, _) = app.get("/api/v1/projects/shoes/items", &scoped).await;
        assert_eq!(status, 404);
        let (status, page) = app.get("/api/v1/projects/other/items", &scoped).await;
        assert_eq!(status, 200, "{page}");
        let (status, _) = app.get("/api/v1/items/not-an-id", &alice).await;
        assert_eq!(status, 404);
        let (status, _) = app
            .get(&format!("/api/v1/items/{}", Uuid::now_v7()), &alice)
            .await;
        assert_eq!(status, 404);
        let response = app
            .http
            .get(app.url(&format!("/api/v1/items/{}", task.item_id)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 401);
    })
    .await;
}

/// A confident result for `item` from `version`: routing would label it by
/// machine if it could.
fn confident(project: &projects::Project, version: Uuid, item: Uuid) -> PrelabelResult {
    PrelabelResult {
        schema: SCHEMA_VERSION,
        job_id: JobId::new(),
        project_id: project.id,
        item_id: ItemId::from_uuid(item),
        model_version_id: ModelVersionId::from_uuid(version),
        worker_id: "test".into(),
        outcome: PrelabelOutcome::Scored(PredictionOutput {
            probabilities: vec![0.99, 0.005, 0.005],
            member_votes: vec![0, 0, 0],
            scores: Scores {
                top_class: 0,
                confidence: 0.99,
                margin: 0.98,
                entropy: 0.05,
                disagreement: 0.0,
                mutual_information: 0.0,
            },
            embedding: None,
            detections: None,
        }),
    }
}

#[tokio::test]
async fn a_reported_label_goes_back_to_review_first_and_is_decided_apart_from_audits() {
    with_app(60, |app| async move {
        let seeded = app.seed("shoes", &CLASSES, 4).await;
        let items: Vec<Uuid> = seeded.tasks.iter().map(|t| t.item_id).collect();
        // Item 1 labeled "boot" by machine; the others wait in review, and
        // the seeded queue has priorities up to 4 (above the default 2).
        machine_label(&app, items[1]).await;
        let alice = app.token("alice", Role::Reviewer).await;
        let bob = app.token("bob", Role::Reviewer).await;
        let ml = app.token("trainer", Role::Ml).await;
        let reopen = |item: Uuid, token: &str, body: Value| {
            let app = app.clone();
            let token = token.to_owned();
            async move {
                app.post(&format!("/api/v1/items/{item}/reopen"), &token, body)
                    .await
            }
        };

        let (status, body) = reopen(items[1], &alice, json!({ "reason": "  " })).await;
        assert_eq!(status, 422, "{body}");
        let (status, body) = reopen(items[0], &alice, json!({ "reason": "wrong" })).await;
        assert_eq!(status, 409, "an item in review has nothing to reopen: {body}");
        let (status, reopened) = reopen(
            items[1],
            &alice,
            json!({ "reason": "a sneaker, not a boot" }),
        )
        .await;
        assert_eq!(status, 200, "{reopened}");
        assert_eq!(reopened["reported_class"], "boot");
        assert_eq!(reopened["reported_source"], "machine");
        let task: Uuid = reopened["task_id"].as_str().unwrap().parse().unwrap();
        let (status, body) = reopen(items[1], &alice, json!({ "reason": "again" })).await;
        assert_eq!(status, 409, "already open: {body}");

        // A confident result from a newly active model leaves it to people.
        let project = projects::get(app.db(), "shoes").await.unwrap();
        let version = Uuid::now_v7();
        sql(
            &app,
            "INSERT INTO model_versions (id, project_id, version, status) VALUES ($1, $2, 2, 'active')",
            vec![version.into(), project.id.as_uuid().into()],
        )
        .await;
        sql(
            &app,
            "UPDATE projects SET active_model_version_id = $1",
            vec![version.into()],
        )
        .await;
        let project = projects::get(app.db(), "shoes").await.unwrap();
        let applied = results::apply(app.db(), &[confident(&project, version, items[1])])
            .await
            .unwrap();
        assert_eq!(applied, [Applied::Kept]);
        assert_eq!(app.task(task).await.reason, TaskReason::Reported);

        // First in the queue, though the seeded tasks have higher doubt.
        let submitted = review(&app, "shoes", &bob, task, "sneaker").await;
        assert_eq!(submitted["class"], "sneaker");
        let (_, item) = app.get(&format!("/api/v1/items/{}", items[1]), &bob).await;
        assert_eq!(item["state"], "human_labeled");
        assert_eq!(item["label"]["class"], "sneaker");
        assert_eq!(item["label"]["source"], "human");
        let reported = &item["review_tasks"].as_array().unwrap()[1];
        assert_eq!(reported["reason"], "reported", "{item}");
        assert_eq!(reported["outcome"], "corrected");
        assert_eq!(reported["reported_by"], "alice");
        assert_eq!(reported["report_reason"], "a sneaker, not a boot");

        // Counted per class of the machine label, not as an audit.
        let ctx = app.ctx.clone();
        let shown = status::project_status(&ctx, &project).await.unwrap();
        assert_eq!(
            shown.reported_labels,
            [status::ReportedLabels {
                source: "machine".into(),
                class: "boot".into(),
                class_index: 1,
                open: 0,
                confirmed: 0,
                corrected: 1,
            }]
        );
        assert!(shown.machine_label_accuracy.is_empty(), "{:?}", shown.machine_label_accuracy);
        let (_, body) = app.get("/api/v1/projects/shoes", &ml).await;
        assert_eq!(body["reported_labels"][0]["corrected"], 1, "{body}");

        // Now a human label: a reviewer may not reopen it, nor force it;
        // ml may.
        let (status, body) = reopen(items[1], &alice, json!({ "reason": "hmm" })).await;
        assert_eq!(status, 409, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("force"), "{body}");
        let (status, _) = reopen(items[1], &alice, json!({ "reason": "hmm", "force": true })).await;
        assert_eq!(status, 403);
        let (status, body) = reopen(items[1], &ml, json!({ "reason": "check", "force": true })).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["reported_source"], "human");
    })
    .await;
}

#[tokio::test]
async fn a_reported_import_is_labeled_without_force_and_undo_clears_the_outcome() {
    with_app(60, |app| async move {
        let seeded = app.seed("shoes", &CLASSES, 1).await;
        let key = "incoming/shoes/imported.png";
        app.ctx
            .store
            .put(key, bytes::Bytes::from(png(99)))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("list.csv");
        std::fs::write(&manifest, format!("key,label\n{key},boot\n")).unwrap();
        let project = projects::get(app.db(), "shoes").await.unwrap();
        let summary = ingest::ingest_manifest(&app.ctx, &project, &manifest, None, false)
            .await
            .unwrap();
        assert_eq!(summary.imported_labels, 1, "{summary:?}");
        // Any role reads; ops may not report (reviewer and up).
        let ops = app.token("reader", Role::Ops).await;
        let (_, page) = app
            .get("/api/v1/projects/shoes/items?source=import", &ops)
            .await;
        let import: Uuid = page["items"][0]["item_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let (status, _) = app
            .post(
                &format!("/api/v1/items/{import}/reopen"),
                &ops,
                json!({ "reason": "wrong" }),
            )
            .await;
        assert_eq!(status, 403);

        let alice = app.token("alice", Role::Reviewer).await;
        let (status, reopened) = app
            .post(
                &format!("/api/v1/items/{import}/reopen"),
                &alice,
                json!({ "reason": "looks like a sandal" }),
            )
            .await;
        assert_eq!(status, 200, "{reopened}");
        assert_eq!(reopened["reported_source"], "import");
        let task: Uuid = reopened["task_id"].as_str().unwrap().parse().unwrap();
        // Ahead of the seeded task, and labeled over the import without force.
        let (status, claimed) = app
            .post("/api/v1/projects/shoes/review/next", &alice, json!({}))
            .await;
        assert_eq!(status, 200, "{claimed}");
        assert_eq!(claimed["task_id"], task.to_string());
        assert_eq!(claimed["reason"], "reported");
        let token = claimed["fencing_token"].clone();
        let (status, body) = app
            .post(
                &format!("/api/v1/review/{task}/submit"),
                &alice,
                json!({ "fencing_token": token, "class": "boot" }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let shown = status::project_status(&app.ctx, &project).await.unwrap();
        assert_eq!(shown.reported_labels.len(), 1);
        assert_eq!(shown.reported_labels[0].source, "import");
        assert_eq!(shown.reported_labels[0].confirmed, 1);

        // Undo takes the label back and the report is undecided again.
        let (status, body) = app
            .post(
                &format!("/api/v1/review/{task}/undo"),
                &alice,
                json!({ "fencing_token": token }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let shown = status::project_status(&app.ctx, &project).await.unwrap();
        assert_eq!(shown.reported_labels[0].confirmed, 0);
        assert_eq!(shown.reported_labels[0].open, 1);
        let _ = seeded;
    })
    .await;
}
