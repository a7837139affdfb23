//! A project's model architecture on the real services: every training run
//! of a `mobilenet_v2` project (its first model, a retrain over HTTP, an
//! automatic one) asks for heads mode, and its snapshots carry each labeled
//! item's cached backbone embedding, taken only from versions of the same
//! backbone at the same input size.

#![allow(clippy::unwrap_used)]

use lapin::options::BasicGetOptions;
use sea_orm::{ActiveValue::Set, ConnectionTrait, DbBackend, EntityTrait, Statement};
use serde_json::json;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::training_run::{self, RunState};
use sieve_scheduler::error::AppError;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, Project};
use sieve_scheduler::routing;
use sieve_scheduler::training;
use sieve_scheduler::training::auto_retrain::{self, Outcome};
use sieve_shared::embedding_table::Embeddings;
use sieve_shared::messages::{
    ModelArch, Snapshot, SnapshotExample, TrainJob, TrainMode, TrainParams, decode,
};
use sieve_testkit::{App, with_app};
use uuid::Uuid;

/// Every training job waiting on the test's train queue.
async fn drain_train_jobs(app: &App) -> Vec<TrainJob> {
    let channel = app.ctx.connection.create_channel().await.unwrap();
    let queue = app.ctx.topology().train_queue();
    let mut jobs = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.clone().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        jobs.push(decode::<TrainJob>(&message.delivery.data).unwrap());
    }
    channel.close(200, "drained".into()).await.ok();
    jobs
}

/// The params recorded with a run.
async fn run_params(app: &App, run_id: Uuid) -> TrainParams {
    let run = training_run::Entity::find_by_id(run_id)
        .one(app.db())
        .await
        .unwrap()
        .unwrap();
    serde_json::from_value(run.params).unwrap()
}

async fn mark_succeeded(app: &App, run_id: Uuid) {
    training_run::Entity::update(training_run::ActiveModel {
        id: Set(run_id),
        state: Set(RunState::Succeeded),
        ..Default::default()
    })
    .exec(app.db())
    .await
    .unwrap();
}

/// Label every seeded task of `project` as `class` over HTTP.
async fn label_all(app: &App, project: &str, tasks: usize, class: &str) {
    let token = app.token("rev", Role::Reviewer).await;
    for _ in 0..tasks {
        app.label_next(project, &token, class).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_run_of_a_mobilenet_project_trains_heads() {
    with_app(300, |app| async move {
        let ml = app.token("mia", Role::Ml).await;

        // Created over HTTP: the first model's job asks for heads mode.
        let (status, body) = app
            .post(
                "/api/v1/projects",
                &ml,
                json!({ "name": "mobile", "classes": ["cat", "dog"], "arch": "mobilenet_v2" }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["arch"], "mobilenet_v2");
        let jobs = drain_train_jobs(&app).await;
        assert_eq!(jobs.len(), 1, "one first model");
        let first = &jobs[0];
        assert_eq!(first.params.arch, ModelArch::MobilenetV2);
        assert_eq!(first.params.mode, TrainMode::Heads);
        assert_eq!(first.params.input_size(), 96);
        assert_eq!(run_params(&app, first.run_id.as_uuid()).await, first.params);

        // The API's project view names the architecture.
        let (status, shown) = app.get("/api/v1/projects/mobile", &ml).await;
        assert_eq!(status, 200, "{shown}");
        assert_eq!(shown["project"]["arch"], "mobilenet_v2");

        // An unknown architecture is refused, naming the valid ones.
        let (status, body) = app
            .post(
                "/api/v1/projects",
                &ml,
                json!({ "name": "resnet", "classes": ["a", "b"], "arch": "resnet50" }),
            )
            .await;
        assert_eq!(status, 422, "{body}");
        let message = body.to_string();
        assert!(
            message.contains("small_cnn") && message.contains("mobilenet_v2"),
            "{message}"
        );

        // No arch: a small CNN, trained whole, as before.
        let (status, body) = app
            .post(
                "/api/v1/projects",
                &ml,
                json!({ "name": "small", "classes": ["a", "b"] }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["arch"], "small_cnn");
        let jobs = drain_train_jobs(&app).await;
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].params.arch, ModelArch::SmallCnn);
        assert_eq!(jobs[0].params.mode, TrainMode::Full);

        // A retrain of a mobilenet project, over HTTP (what `sieve retrain`
        // and the demo do), and an automatic one: heads again.
        let seeded = app
            .seed_on(ModelArch::MobilenetV2, "labeled", &["cat", "dog"], 5)
            .await;
        label_all(&app, "labeled", 2, "cat").await;
        label_all(&app, "labeled", 2, "dog").await;
        let (status, run) = app
            .post("/api/v1/projects/labeled/retrain", &ml, json!({}))
            .await;
        assert_eq!(status, 202, "{run}");
        let run_id: Uuid = run["run_id"].as_str().unwrap().parse().unwrap();
        let params = run_params(&app, run_id).await;
        assert_eq!(
            (params.arch, params.mode),
            (ModelArch::MobilenetV2, TrainMode::Heads)
        );
        let jobs = drain_train_jobs(&app).await;
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].params, params);
        mark_succeeded(&app, run_id).await;

        let project = routing::calibration::set_policy(
            app.db(),
            &seeded.project,
            Policy {
                retrain_every_labels: Some(1),
                ..seeded.project.policy.clone()
            },
        )
        .await
        .unwrap();
        label_all(&app, "labeled", 1, "cat").await;
        let auto = match auto_retrain::check(&app.ctx, &project).await.unwrap() {
            Outcome::Requested(run) => run,
            other => panic!("an automatic run was due, got {other:?}"),
        };
        assert_eq!(run_params(&app, auto.run_id).await, project.train_params());
        mark_succeeded(&app, auto.run_id).await;

        // Full mode on request: MobileNetV2 fine-tuned, its last blocks
        // only if asked; what the architecture cannot do is refused first.
        for (asked, why) in [
            (
                json!({ "mode": "full", "unfrozen_blocks": 18 }),
                "17 blocks",
            ),
            (json!({ "unfrozen_blocks": 2 }), "full mode"),
            (json!({ "mode": "full", "epochs": 0 }), "1 to 1000"),
            (json!({ "mode": "everything" }), "bad request body"),
        ] {
            let (status, body) = app
                .post("/api/v1/projects/labeled/retrain", &ml, asked.clone())
                .await;
            assert_eq!(status, 422, "{asked}: {body}");
            assert!(body.to_string().contains(why), "{asked}: {body}");
        }
        let (status, run) = app
            .post(
                "/api/v1/projects/labeled/retrain",
                &ml,
                json!({ "mode": "full", "unfrozen_blocks": 3, "epochs": 2 }),
            )
            .await;
        assert_eq!(status, 202, "{run}");
        let run_id: Uuid = run["run_id"].as_str().unwrap().parse().unwrap();
        let params = run_params(&app, run_id).await;
        assert_eq!(
            (
                params.arch,
                params.mode,
                params.unfrozen_blocks,
                params.epochs
            ),
            (ModelArch::MobilenetV2, TrainMode::Full, Some(3), 2)
        );
        let jobs = drain_train_jobs(&app).await;
        assert_eq!(jobs.last().map(|job| &job.params), Some(&params));
        mark_succeeded(&app, run_id).await;
        let (status, body) = app
            .post(
                "/api/v1/projects/small/retrain",
                &ml,
                json!({ "mode": "heads" }),
            )
            .await;
        assert_eq!(status, 422, "{body}");
        assert!(
            body.to_string().contains("no pretrained backbone"),
            "{body}"
        );

        // A run that asks for another architecture than the project's is
        // refused: its version could never replace the project's.
        let refused = training::request(&app.ctx, &project, "test", TrainParams::default(), true)
            .await
            .unwrap_err();
        assert!(matches!(refused, AppError::Invalid(_)), "{refused:?}");
    })
    .await;
}

/// A model version of `project` with this `architecture` JSON.
async fn version(
    app: &App,
    project: &Project,
    number: i32,
    architecture: serde_json::Value,
) -> Uuid {
    let id = Uuid::now_v7();
    app.db()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO model_versions (id, project_id, version, status, architecture)
             VALUES ($1, $2, $3, 'candidate', $4)",
            [
                id.into(),
                project.id.as_uuid().into(),
                number.into(),
                architecture.into(),
            ],
        ))
        .await
        .unwrap();
    id
}

/// A prediction of `item` by `version`, made `age_seconds` ago, with this
/// embedding.
async fn prediction(
    app: &App,
    item: Uuid,
    version: Uuid,
    age_seconds: i32,
    embedding: Option<serde_json::Value>,
) {
    app.db()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            r#"INSERT INTO predictions (id, item_id, model_version_id, job_id, worker_id,
                   probabilities, member_votes, top_class, confidence, margin, entropy,
                   disagreement, mutual_information, embedding, routed_to, created_at)
               VALUES ($1, $2, $3, $4, 'test', '[0.6, 0.4]', '[0, 0, 1]', 0, 0.6, 0.2, 0.9,
                       0.33, 0.1, $5, 'kept', now() - make_interval(secs => $6))"#,
            [
                Uuid::now_v7().into(),
                item.into(),
                version.into(),
                Uuid::now_v7().into(),
                embedding.into(),
                f64::from(age_seconds).into(),
            ],
        ))
        .await
        .unwrap();
}

fn mobilenet(input_size: u32) -> serde_json::Value {
    json!({ "arch": "mobilenet_v2", "num_classes": 2, "members": 3, "input_size": input_size,
            "channels": 3, "embedding_dim": 1280 })
}

/// A 1280-wide embedding whose values all equal `v`.
fn embedding(v: f32) -> Vec<f32> {
    vec![v; 1280]
}

async fn snapshot(app: &App, project: &Project, run_id: Uuid) -> (Snapshot, serde_json::Value) {
    let key = format!("projects/{}/snapshots/{run_id}.json", project.id);
    let bytes = app.ctx.store.get(&key).await.unwrap();
    (
        serde_json::from_slice(&bytes).unwrap(),
        serde_json::from_slice(&bytes).unwrap(),
    )
}

fn example_of(snapshot: &Snapshot, item: Uuid) -> &SnapshotExample {
    snapshot
        .examples
        .iter()
        .find(|e| e.item_id.as_uuid() == item)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_carry_embeddings_of_the_same_backbone_only() {
    with_app(300, |app| async move {
        let seeded = app
            .seed_on(ModelArch::MobilenetV2, "emb", &["cat", "dog"], 5)
            .await;
        label_all(&app, "emb", seeded.tasks.len(), "cat").await;
        let project = projects::get(app.db(), "emb").await.unwrap();
        let item = |i: usize| seeded.tasks[i].item_id;

        let older = version(&app, &project, 2, mobilenet(96)).await;
        let newer = version(&app, &project, 3, mobilenet(96)).await;
        let small = version(
            &app,
            &project,
            4,
            json!({ "arch": "small_cnn", "input_size": 28,
            "channels": 1, "embedding_dim": 64 }),
        )
        .await;
        let larger = version(&app, &project, 5, mobilenet(128)).await;
        let silent = version(&app, &project, 6, mobilenet(96)).await;

        // Item 0: the newest matching embedding wins; the ones made since by
        // another architecture, another input size, or without an
        // embedding are passed over.
        prediction(&app, item(0), older, 50, Some(json!(embedding(0.5)))).await;
        prediction(&app, item(0), newer, 40, Some(json!(embedding(1.5)))).await;
        prediction(&app, item(0), small, 30, Some(json!(vec![9.0f32; 64]))).await;
        prediction(&app, item(0), larger, 20, Some(json!(embedding(7.0)))).await;
        prediction(&app, item(0), silent, 10, None).await;
        // Item 1: only embeddings that do not fit.
        prediction(&app, item(1), small, 30, Some(json!(vec![9.0f32; 64]))).await;
        prediction(&app, item(1), larger, 20, Some(json!(embedding(7.0)))).await;
        // Item 2: a stored embedding that is not an array of numbers is left
        // out, never a failure.
        prediction(&app, item(2), newer, 10, Some(json!(["x", 1]))).await;
        // Item 3: an object, not an array.
        prediction(&app, item(3), newer, 10, Some(json!({ "a": 1 }))).await;
        // Item 4: none at all (only the seeded prediction, no architecture).

        let run = training::request(&app.ctx, &project, "test", project.train_params(), true)
            .await
            .unwrap();
        let (snap, raw) = snapshot(&app, &project, run.run_id).await;
        assert_eq!(snap.examples.len(), 5);
        // One row in the table, for item 0; nothing inline.
        let table = snap.embeddings.as_ref().expect("an embedding table");
        assert_eq!((table.rows, table.dim), (1, 1280));
        assert_eq!(
            table.key,
            format!(
                "projects/{}/snapshots/{}.embeddings.f32",
                project.id, run.run_id
            )
        );
        let cached = Embeddings::load(&app.ctx.store, table).await.unwrap();
        let row = example_of(&snap, item(0))
            .embedding_row
            .expect("item 0's row");
        assert!(cached.row(row).unwrap().iter().all(|&x| x == 1.5));
        for i in 1..5 {
            assert_eq!(example_of(&snap, item(i)).embedding_row, None, "item {i}");
        }
        let carried = raw["examples"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e.get("embedding_row").is_some())
            .count();
        assert_eq!(carried, 1, "no embedding key where there is none");
        assert!(!raw.to_string().contains("\"embedding\""), "nothing inline");

        // A small-CNN project's snapshot carries none, even where a
        // MobileNet version left one.
        let plain = app.seed("plain", &["cat", "dog"], 2).await;
        label_all(&app, "plain", 2, "dog").await;
        let v = version(&app, &plain.project, 2, mobilenet(96)).await;
        prediction(
            &app,
            plain.tasks[0].item_id,
            v,
            1,
            Some(json!(embedding(2.0))),
        )
        .await;
        let run = training::request(
            &app.ctx,
            &plain.project,
            "test",
            plain.project.train_params(),
            true,
        )
        .await
        .unwrap();
        let (snap, raw) = snapshot(&app, &plain.project, run.run_id).await;
        assert_eq!(snap.examples.len(), 2);
        assert!(snap.embeddings.is_none());
        assert!(snap.examples.iter().all(|e| e.embedding_row.is_none()));
        assert!(!raw.to_string().contains("embedding"));
        assert!(
            app.ctx
                .store
                .get(&format!(
                    "projects/{}/snapshots/{}.embeddings.f32",
                    plain.project.id, run.run_id
                ))
                .await
                .is_err(),
            "no table for a run that reads none"
        );
    })
    .await;
}
