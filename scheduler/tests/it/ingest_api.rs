//! Ingest and dispatch control over HTTP, on a real scheduler (port 0) with
//! the real PostgreSQL and RabbitMQ: an ingest of a store prefix or of a
//! manifest in the store runs in the background and is polled by id; bad
//! requests are refused before anything is recorded; an ingest whose
//! process died reads as interrupted; pause / resume / rate limit /
//! priority as the CLI has them.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::Role;
use sieve_testkit::fixtures::png;
use sieve_testkit::{App, eventually, with_app};
use uuid::Uuid;

/// Poll an ingest until it is no longer running; its last answer.
async fn finished(app: &App, token: &str, id: &str) -> Value {
    eventually("the ingest to end", Duration::from_secs(60), || async {
        let (status, body) = app.get(&format!("/api/v1/ingests/{id}"), token).await;
        assert_eq!(status, 200, "{body}");
        (body["state"] != "running").then_some(body)
    })
    .await
}

async fn ingests(app: &App) -> i64 {
    let row = app
        .db()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM ingests",
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get("", "n").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_prefix_ingest_runs_in_the_background_and_is_polled() {
    with_app(60, |app| async move {
        app.seed("photos", &["cat", "dog"], 0).await;
        let ops = app.token("ops", Role::Ops).await;
        for i in 0..5 {
            app.ctx
                .store
                .put(&format!("incoming/b1/{i}.png"), png(100 + i).into())
                .await
                .unwrap();
        }
        app.ctx
            .store
            .put("incoming/b1/readme.txt", b"hello".to_vec().into())
            .await
            .unwrap();

        let response = app
            .http
            .post(app.url("/api/v1/projects/photos/ingest"))
            .bearer_auth(&ops)
            .json(&json!({"prefix": "store:incoming/b1/"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        let started: Value = response.json().await.unwrap();
        let id = started["id"].as_str().unwrap().to_owned();
        assert_eq!(location, format!("/api/v1/ingests/{id}"));
        assert_eq!(started["source"], "store:incoming/b1/");
        assert_eq!(started["requested_by"], "ops");
        assert_eq!(started["project"], "photos");

        let done = finished(&app, &ops, &id).await;
        assert_eq!(done["state"], "done", "{done}");
        assert_eq!(
            (
                &done["files_seen"],
                &done["new_items"],
                &done["duplicates"],
                &done["failed"]
            ),
            (&json!(6), &json!(5), &json!(0), &json!(1)),
            "{done}"
        );
        let failures = done["failures"].as_array().unwrap();
        assert_eq!(failures.len(), 1, "{done}");
        assert_eq!(failures[0]["path"], "store:incoming/b1/readme.txt");
        assert!(
            failures[0]["reason"]
                .as_str()
                .unwrap()
                .contains("not an image")
        );
        assert!(done["finished_at"].is_string());

        // Again: nothing new.
        let (status, again) = app
            .post(
                "/api/v1/projects/photos/ingest",
                &ops,
                json!({"prefix": "store:incoming/b1"}),
            )
            .await;
        assert_eq!(status, 202, "{again}");
        let again = finished(&app, &ops, again["id"].as_str().unwrap()).await;
        assert_eq!(
            (&again["state"], &again["new_items"], &again["duplicates"]),
            (&json!("done"), &json!(0), &json!(6)),
            "{again}"
        );

        // Both are listed, newest first, with their counts; `limit` cuts.
        let (status, listed) = app.get("/api/v1/projects/photos/ingests", &ops).await;
        assert_eq!(status, 200, "{listed}");
        let runs = listed["ingests"].as_array().unwrap();
        assert_eq!(runs.len(), 2, "{listed}");
        assert_eq!(runs[0]["id"], again["id"], "newest first: {listed}");
        assert_eq!(runs[1]["id"].as_str().unwrap(), id);
        assert_eq!(runs[1]["new_items"], 5);
        let (_, one) = app
            .get("/api/v1/projects/photos/ingests?limit=1", &ops)
            .await;
        assert_eq!(one["ingests"].as_array().unwrap().len(), 1, "{one}");
        let (status, bad) = app
            .get("/api/v1/projects/photos/ingests?limit=many", &ops)
            .await;
        assert_eq!(status, 422, "{bad}");
        assert!(
            bad["error"]["message"].as_str().unwrap().contains("limit"),
            "{bad}"
        );

        // No such ingest; not an id.
        assert_eq!(
            app.get(&format!("/api/v1/ingests/{}", Uuid::now_v7()), &ops)
                .await
                .0,
            404
        );
        assert_eq!(app.get("/api/v1/ingests/nope", &ops).await.0, 404);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_in_the_store_names_keys_and_never_server_paths() {
    with_app(60, |app| async move {
        app.seed("photos", &["cat", "dog"], 0).await;
        let admin = app.token("admin", Role::Admin).await;
        app.ctx
            .store
            .put("uploads/d.png", png(1).into())
            .await
            .unwrap();
        let manifest = "{\"key\": \"uploads/d.png\", \"label\": \"dog\"}\n\
                        {\"path\": \"/etc/hostname\"}\n\
                        {\"key\": \"projects/other/images/ab/abcd\"}\n\
                        {\"key\": \"uploads/missing.png\"}\n";
        app.ctx
            .store
            .put("uploads/list.jsonl", manifest.as_bytes().to_vec().into())
            .await
            .unwrap();

        let (status, started) = app
            .post(
                "/api/v1/projects/photos/ingest",
                &admin,
                json!({"manifest": "store:uploads/list.jsonl"}),
            )
            .await;
        assert_eq!(status, 202, "{started}");
        assert_eq!(started["source"], "manifest store:uploads/list.jsonl");
        let done = finished(&app, &admin, started["id"].as_str().unwrap()).await;
        assert_eq!(done["state"], "done", "{done}");
        assert_eq!(
            (
                &done["new_items"],
                &done["imported_labels"],
                &done["failed"]
            ),
            (&json!(1), &json!(1), &json!(3)),
            "{done}"
        );
        let reason = |line: u64| {
            done["failures"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["line"] == json!(line))
                .unwrap_or_else(|| panic!("no failure on line {line}: {done}"))["reason"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert!(reason(2).contains("no server file paths"), "{}", reason(2));
        assert!(reason(3).contains("own area"), "{}", reason(3));
        assert!(reason(4).contains("does not exist"), "{}", reason(4));

        // A manifest that is not in the store: the ingest fails, saying so.
        let (_, started) = app
            .post(
                "/api/v1/projects/photos/ingest",
                &admin,
                json!({"manifest": "store:uploads/none.csv"}),
            )
            .await;
        let failed = finished(&app, &admin, started["id"].as_str().unwrap()).await;
        assert_eq!(failed["state"], "failed", "{failed}");
        assert!(
            failed["error"]
                .as_str()
                .unwrap()
                .contains("uploads/none.csv"),
            "{failed}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ingest_requests_are_refused_before_anything_is_recorded() {
    with_app(60, |app| async move {
        app.seed("photos", &["cat", "dog"], 0).await;
        let ops = app.token("ops", Role::Ops).await;
        for (body, expected) in [
            (json!({"path": "/etc"}), "unknown field"),
            (json!({"folder": "/etc"}), "unknown field"),
            (json!({"prefix": "/etc/passwd"}), "store:PREFIX or s3://"),
            (json!({"prefix": "store:../etc"}), "'..'"),
            (json!({"prefix": "store:projects/x/images"}), "own area"),
            (json!({"prefix": "s3://No_Bucket/x"}), "not a bucket name"),
            (json!({"manifest": "/tmp/list.csv"}), "store:KEY"),
            (
                json!({"prefix": "store:a", "manifest": "store:b.csv"}),
                "exactly one",
            ),
            (json!({}), "exactly one"),
        ] {
            let (status, answer) = app
                .post("/api/v1/projects/photos/ingest", &ops, body.clone())
                .await;
            assert_eq!(status, 422, "{body}: {answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains(expected), "{body}: {message}");
        }
        assert_eq!(
            app.post(
                "/api/v1/projects/nowhere/ingest",
                &ops,
                json!({"prefix": "store:a"})
            )
            .await
            .0,
            404
        );
        assert_eq!(ingests(&app).await, 0, "nothing recorded");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_whose_process_died_reads_as_interrupted() {
    with_app(60, |app| async move {
        let seeded = app.seed("photos", &["cat", "dog"], 0).await;
        let ops = app.token("ops", Role::Ops).await;
        // As a scheduler killed mid-ingest leaves it: running, with counts,
        // and a heartbeat that stopped a minute ago.
        let id = Uuid::now_v7();
        app.db()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                r#"INSERT INTO ingests (id, project_id, source, requested_by, files_seen,
                       new_items, heartbeat_at)
                   VALUES ($1, $2, 'store:big/', 'ops', 1500, 1400,
                           now() - interval '1 minute')"#,
                [id.into(), seeded.project.id.as_uuid().into()],
            ))
            .await
            .unwrap();
        let (status, body) = app.get(&format!("/api/v1/ingests/{id}"), &ops).await;
        assert_eq!(status, 200);
        assert_eq!(body["state"], "interrupted", "{body}");
        assert_eq!(body["new_items"], 1400);
        assert!(
            body["error"].as_str().unwrap().contains("start it again"),
            "{body}"
        );
        // A fresh heartbeat: running again.
        app.db()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE ingests SET heartbeat_at = now() WHERE id = $1",
                [id.into()],
            ))
            .await
            .unwrap();
        let (_, body) = app.get(&format!("/api/v1/ingests/{id}"), &ops).await;
        assert_eq!(body["state"], "running", "{body}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_is_paused_limited_and_resumed_over_http() {
    with_app(60, |app| async move {
        app.seed("photos", &["cat", "dog"], 0).await;
        let ops = app.token("ops", Role::Ops).await;
        let reviewer = app.token("reviewer", Role::Reviewer).await;
        let (status, control) = app.get("/api/v1/projects/photos/dispatch", &reviewer).await;
        assert_eq!(status, 200);
        assert_eq!(
            control,
            json!({"paused": false, "rate_limit": null, "priority": 0})
        );

        let (status, paused) = app
            .post("/api/v1/projects/photos/pause", &ops, Value::Null)
            .await;
        assert_eq!((status, &paused["paused"]), (200, &json!(true)), "{paused}");

        let put = |body: Value| {
            let app = app.clone();
            let ops = ops.clone();
            async move {
                let response = app
                    .http
                    .put(app.url("/api/v1/projects/photos/dispatch"))
                    .bearer_auth(&ops)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                (
                    response.status().as_u16(),
                    response.json::<Value>().await.unwrap(),
                )
            }
        };
        let (status, control) = put(json!({"rate_limit": 50.0, "priority": 3})).await;
        assert_eq!(status, 200, "{control}");
        assert_eq!(
            control,
            json!({"paused": true, "rate_limit": 50.0, "priority": 3})
        );
        // `null` lifts the limit; what is not named stays.
        let (_, control) = put(json!({"rate_limit": null})).await;
        assert_eq!(
            control,
            json!({"paused": true, "rate_limit": null, "priority": 3})
        );
        let (_, control) = put(json!({"priority": 4})).await;
        assert_eq!(control["priority"], 4);
        assert_eq!(control["rate_limit"], Value::Null);
        for bad in [
            json!({"priority": 12}),
            json!({"rate_limit": -1.0}),
            json!({"paused": false}),
        ] {
            let (status, answer) = put(bad.clone()).await;
            assert_eq!(status, 422, "{bad}: {answer}");
        }
        // A reviewer may look but not change.
        assert_eq!(
            app.post("/api/v1/projects/photos/pause", &reviewer, Value::Null)
                .await
                .0,
            403
        );

        let (status, resumed) = app
            .post("/api/v1/projects/photos/resume", &ops, Value::Null)
            .await;
        assert_eq!(status, 200, "{resumed}");
        assert_eq!(resumed["control"]["paused"], false);
        assert_eq!(resumed["control"]["priority"], 4);
        assert_eq!(resumed["published"], 0, "no model, nothing to publish");
    })
    .await;
}
