//! A box project's settings on the real services: a detection project's
//! tile size and proposal threshold shown with their defaults, changed over
//! HTTP by the ML team and no one else, checked whole before anything is
//! stored, and carried into every training run that does not override them
//! (the worker builds the version with them). A classification project has
//! none, and the database refuses to store any for one.

#![allow(clippy::unwrap_used)]

use reqwest::StatusCode;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::projects::{self, Project};
use sieve_scheduler::training::RetrainRequest;
use sieve_shared::messages::TrainMode;
use sieve_testkit::{App, with_app};

async fn create(app: &App, token: &str, name: &str, kind: &str, classes: &[&str]) -> Project {
    let (status, body) = app
        .post(
            "/api/v1/projects",
            token,
            json!({ "name": name, "classes": classes, "task_kind": kind }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    projects::get(app.db(), name).await.unwrap()
}

async fn put(app: &App, token: &str, project: &str, body: Value) -> (StatusCode, Value) {
    let response = app
        .http
        .put(app.url(&format!("/api/v1/projects/{project}/boxes")))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or_default())
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detection_projects_box_settings_reach_its_training_runs() {
    with_app(120, |app| async move {
        let ml = app.token("mia", Role::Ml).await;
        let reviewer = app.token("rob", Role::Reviewer).await;
        let trees = create(&app, &ml, "trees", "detection", &["tree"]).await;
        assert_eq!(trees.train_params().input_size(), 384);
        assert_eq!(trees.train_params().proposal_threshold, None);

        // The defaults, shown as in force.
        let (status, shown) = app.get("/api/v1/projects/trees/boxes", &reviewer).await;
        assert_eq!(status, 200, "{shown}");
        assert_eq!(
            shown,
            json!({ "tile_size": 384, "proposal_threshold": 0.5, "stored": {} })
        );

        // A reviewer may read them, not change them.
        let (status, _) = put(&app, &reviewer, "trees", json!({ "tile_size": 256 })).await;
        assert_eq!(status, StatusCode::FORBIDDEN);

        let (status, changed) = put(
            &app,
            &ml,
            "trees",
            json!({ "tile_size": 256, "proposal_threshold": 0.4 }),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{changed}");
        assert_eq!(changed["tile_size"], 256);
        assert!((changed["proposal_threshold"].as_f64().unwrap() - 0.4).abs() < 1e-6);

        // Bad values are refused with what was wrong, and a change with one
        // bad field stores none of it.
        for (body, says) in [
            (
                json!({ "tile_size": 100 }),
                "multiple of 32 from 64 to 1024",
            ),
            (json!({ "tile_size": 2048 }), "tile_size = 2048"),
            (json!({ "proposal_threshold": 0.01 }), "0.1 to 0.95"),
            (
                json!({ "tile_size": 512, "proposal_threshold": 5.0 }),
                "proposal_threshold = 5",
            ),
            (json!({ "tile": 512 }), "unknown field"),
        ] {
            let (status, refused) = put(&app, &ml, "trees", body.clone()).await;
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{body}: {refused}"
            );
            assert!(message(&refused).contains(says), "{body}: {refused}");
        }
        let trees = projects::get(app.db(), "trees").await.unwrap();
        assert_eq!(
            trees.boxes.tile_size,
            Some(256),
            "nothing of a refused change stored"
        );
        assert_eq!(trees.boxes.proposal_threshold, Some(0.4));

        // Every run takes them: automatic retrains and retrains that ask for
        // nothing (the project's params), a retrain in a named mode; one
        // that names a tile size overrides only that.
        let automatic = trees.train_params();
        assert_eq!(
            (automatic.input_size(), automatic.proposal_threshold),
            (256, Some(0.4))
        );
        let asked = RetrainRequest::default().params(&trees).unwrap();
        assert_eq!(
            (asked.input_size(), asked.proposal_threshold),
            (256, Some(0.4))
        );
        let heads = RetrainRequest {
            mode: Some(TrainMode::Heads),
            ..Default::default()
        }
        .params(&trees)
        .unwrap();
        assert_eq!(
            (heads.input_size(), heads.proposal_threshold),
            (256, Some(0.4))
        );
        let tiled = RetrainRequest {
            tile_size: Some(192),
            ..Default::default()
        }
        .params(&trees)
        .unwrap();
        assert_eq!(
            (tiled.input_size(), tiled.proposal_threshold),
            (192, Some(0.4))
        );

        // `null` puts a default back.
        let (status, reset) = put(&app, &ml, "trees", json!({ "proposal_threshold": null })).await;
        assert_eq!(status, StatusCode::OK, "{reset}");
        assert_eq!(
            reset,
            json!({ "tile_size": 256, "proposal_threshold": 0.5, "stored": { "tile_size": 256 } })
        );

        // A deidentify project's threshold is its plates', 0.35 by default.
        create(&app, &ml, "faces", "deidentify", &[]).await;
        let (status, faces) = app.get("/api/v1/projects/faces/boxes", &ml).await;
        assert_eq!(status, 200, "{faces}");
        assert!((faces["proposal_threshold"].as_f64().unwrap() - 0.35).abs() < 1e-6);

        // A classification project has none to show or set, and the
        // database holds it to that whatever writes.
        let shirts = create(&app, &ml, "shirts", "classification", &["a", "b"]).await;
        let (status, refused) = app.get("/api/v1/projects/shirts/boxes", &ml).await;
        assert_eq!(status, 422);
        assert!(
            message(&refused).contains("classification project"),
            "{refused}"
        );
        let (status, refused) = put(&app, &ml, "shirts", json!({ "tile_size": 256 })).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            message(&refused).contains("classification project"),
            "{refused}"
        );
        let written = app
            .db()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                r#"UPDATE projects SET box_settings = '{"tile_size": 256}' WHERE id = $1"#,
                [shirts.id.as_uuid().into()],
            ))
            .await;
        let err = written.expect_err("box settings stored for a classification project");
        assert!(
            err.to_string()
                .contains("projects_box_settings_only_for_boxes"),
            "{err}"
        );
    })
    .await;
}
