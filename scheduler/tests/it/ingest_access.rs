//! Who may bring what in over HTTP (issue 25 item 5): labels in a manifest
//! are ground truth, so importing them takes a role that may label (`ml`,
//! `admin`) besides one that may ingest (`ops`, `admin`). An `ops` token's
//! ingest still brings the images in, without their labels, and says why
//! for each row. And HTTP ingests are capped, per project and in all.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::Role;
use sieve_testkit::{App, eventually, png, with_app, with_app_configured};

async fn ingest(app: &App, token: &str, manifest: &str) -> Value {
    let (status, started) = app
        .post(
            "/api/v1/projects/photos/ingest",
            token,
            json!({ "manifest": format!("store:{manifest}") }),
        )
        .await;
    assert_eq!(status, 202, "{started}");
    let id = started["id"].as_str().unwrap().to_owned();
    eventually("the ingest to end", Duration::from_secs(30), || async {
        let (_, run) = app.get(&format!("/api/v1/ingests/{id}"), token).await;
        (run["state"] != "running").then_some(run)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn importing_labels_takes_an_ml_or_admin_token() {
    with_app(60, |app| async move {
        app.seed("photos", &["cat", "dog"], 0).await;
        for (n, key) in ["uploads/a.png", "uploads/b.png"].iter().enumerate() {
            app.ctx.store.put(key, png(n).into()).await.unwrap();
        }
        let rows = |key: &str| format!("{{\"key\": \"{key}\", \"label\": \"dog\"}}\n");
        for (name, key) in [
            ("ops.jsonl", "uploads/a.png"),
            ("ml.jsonl", "uploads/b.png"),
        ] {
            app.ctx
                .store
                .put(&format!("uploads/{name}"), rows(key).into_bytes().into())
                .await
                .unwrap();
        }

        let ops = app.token("olga", Role::Ops).await;
        let done = ingest(&app, &ops, "uploads/ops.jsonl").await;
        assert_eq!(done["state"], "done", "{done}");
        assert_eq!(
            (
                &done["new_items"],
                &done["imported_labels"],
                &done["failed"]
            ),
            (&json!(1), &json!(0), &json!(0)),
            "{done}"
        );
        // The image is in; the refused label is reported on its row.
        let reason = done["failures"][0]["reason"].as_str().unwrap();
        assert!(reason.contains("ml or admin"), "{reason}");

        // Ingest itself is an operation (ops, admin): admin has both.
        let admin = app.token("ada", Role::Admin).await;
        let done = ingest(&app, &admin, "uploads/ml.jsonl").await;
        assert_eq!(
            (
                &done["new_items"],
                &done["imported_labels"],
                &done["failed"]
            ),
            (&json!(1), &json!(1), &json!(0)),
            "{done}"
        );
    })
    .await;
}

/// A row as a running ingest of `project` leaves it, heartbeat fresh.
async fn running_ingest(app: &App, project: &str) -> uuid::Uuid {
    let id = uuid::Uuid::now_v7();
    app.db()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO ingests (id, project_id, source, requested_by)
             SELECT $1, id, 'folder elsewhere', 'test' FROM projects WHERE name = $2",
            [id.into(), project.into()],
        ))
        .await
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ingests_are_capped_per_project_and_in_all() {
    let caps = |s: &mut sieve_shared::Settings| {
        s.ingest.max_running_per_project = 1;
        s.ingest.max_running = 2;
    };
    with_app_configured(60, caps, |app| async move {
        for name in ["a", "b", "c"] {
            app.seed(name, &["cat", "dog"], 0).await;
        }
        let ops = app.token("olga", Role::Ops).await;
        let start = |project: &'static str| {
            let (app, ops) = (&app, ops.clone());
            async move {
                app.post(
                    &format!("/api/v1/projects/{project}/ingest"),
                    &ops,
                    json!({ "prefix": "store:nothing-here/" }),
                )
                .await
            }
        };
        let in_a = running_ingest(&app, "a").await;
        running_ingest(&app, "b").await;

        let (status, body) = start("a").await;
        assert_eq!(status, 429, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_running_per_project"),
            "{body}"
        );
        let (status, body) = start("c").await;
        assert_eq!(status, 429, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("ingest.max_running"),
            "{body}"
        );

        // One ends: there is room again.
        app.db()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE ingests SET state = 'done' WHERE id = $1",
                [in_a.into()],
            ))
            .await
            .unwrap();
        let (status, body) = start("c").await;
        assert_eq!(status, 202, "{body}");
    })
    .await;
}

/// A manifest's `key` rows are read within bounds (issue 25 item 6): an
/// object's size is checked before it is read, and a link in the store that
/// leads out of it is refused, not followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_objects_are_size_checked_and_links_out_of_the_store_refused() {
    let limit = |s: &mut sieve_shared::Settings| s.ingest.max_file_bytes = 100_000;
    with_app_configured(60, limit, |app| async move {
        app.seed("photos", &["cat", "dog"], 0).await;
        let store = &app.ctx.store;
        store.put("uploads/ok.png", png(7).into()).await.unwrap();
        store
            .put("uploads/huge.png", vec![0u8; 300_000].into())
            .await
            .unwrap();
        let root = store.local_files().unwrap().root().to_owned();
        std::os::unix::fs::symlink("/etc/hostname", root.join("uploads/escape.png")).unwrap();
        let manifest = ["uploads/ok.png", "uploads/huge.png", "uploads/escape.png"]
            .iter()
            .map(|k| format!("{{\"key\": \"{k}\"}}\n"))
            .collect::<String>();
        store
            .put("uploads/list.jsonl", manifest.into_bytes().into())
            .await
            .unwrap();
        let admin = app.token("ada", Role::Admin).await;
        let done = ingest(&app, &admin, "uploads/list.jsonl").await;
        assert_eq!(
            (&done["new_items"], &done["failed"]),
            (&json!(1), &json!(2)),
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
        assert!(
            reason(2).contains("over the limit of 100000"),
            "{}",
            reason(2)
        );
        assert!(reason(3).contains("outside the store"), "{}", reason(3));
    })
    .await;
}

/// A token scoped to one project reads only where that project allows
/// (issue 25 item 5): the server's credentials reach every project's
/// uploads and every bucket, so a scoped token names a prefix or manifest
/// within the project's sources, and each `key` row of its manifest too.
/// A token for every project is not held to the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_token_ingests_only_from_its_projects_sources() {
    use sieve_scheduler::auth;
    use sieve_scheduler::ingest::sources::{self, Allowed};

    with_app(60, |app| async move {
        let photos = app.seed("photos", &["cat", "dog"], 0).await.project;
        for (n, key) in ["uploads/photos/a.png", "uploads/other/b.png"]
            .iter()
            .enumerate()
        {
            app.ctx.store.put(key, png(n).into()).await.unwrap();
        }
        let rows = "{\"key\": \"uploads/photos/a.png\"}\n{\"key\": \"uploads/other/b.png\"}\n";
        app.ctx
            .store
            .put("uploads/photos/list.jsonl", rows.as_bytes().to_vec().into())
            .await
            .unwrap();
        let scoped = auth::create_scoped_token(app.db(), "photos-ops", Role::Ops, Some(&photos))
            .await
            .unwrap();
        let start = |body: Value| {
            let (app, scoped) = (&app, scoped.clone());
            async move {
                app.post("/api/v1/projects/photos/ingest", &scoped, body)
                    .await
            }
        };

        // Nothing allowed yet: refused, saying how to allow.
        let (status, refused) = start(json!({"prefix": "store:uploads/photos"})).await;
        assert_eq!(status, 403, "{refused}");
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(message.contains("none yet"), "{message}");
        assert!(
            message.contains("sieve project sources photos --allow"),
            "{message}"
        );

        sources::set(
            app.db(),
            &photos,
            &Allowed::parse("photos", &["store:uploads/photos".into()]).unwrap(),
        )
        .await
        .unwrap();
        for outside in [
            json!({"prefix": "store:uploads/other"}),
            json!({"prefix": "store:uploads"}),
            json!({"prefix": "store:uploads/photos-old"}),
            json!({"prefix": "s3://another-bucket/photos"}),
            json!({"manifest": "store:uploads/other/list.jsonl"}),
        ] {
            let (status, refused) = start(outside.clone()).await;
            assert_eq!(status, 403, "{outside}: {refused}");
            let message = refused["error"]["message"].as_str().unwrap();
            assert!(message.contains("store:uploads/photos/"), "{message}");
        }

        // A manifest within: its row outside is reported, the other is in.
        let done = ingest(&app, &scoped, "uploads/photos/list.jsonl").await;
        assert_eq!(done["state"], "done", "{done}");
        assert_eq!(
            (&done["new_items"], &done["failed"]),
            (&json!(1), &json!(1)),
            "{done}"
        );
        let reason = done["failures"][0]["reason"].as_str().unwrap();
        assert!(
            reason.contains("key uploads/other/b.png is outside"),
            "{reason}"
        );

        // A token for every project is not held to the list.
        let global = app.token("olga", Role::Ops).await;
        let (status, started) = app
            .post(
                "/api/v1/projects/photos/ingest",
                &global,
                json!({"prefix": "store:uploads/other"}),
            )
            .await;
        assert_eq!(status, 202, "{started}");
    })
    .await;
}
