//! `sieve export --format imagefolder` on the real services: a folder per
//! class with each labeled item's image (hard links to a local store's
//! files, copies from any other store) and labels.csv beside them; written
//! complete or not at all; refused over HTTP and to standard output.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::json;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::export::folder::{self, LABELS_FILE, Placed};
use sieve_scheduler::export::output::Options;
use sieve_scheduler::export::{Export, Filters, Format, Request};
use sieve_scheduler::projects::Project;
use sieve_shared::store::Store;
use sieve_testkit::{App, with_app};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

// A class whose name is no folder name.
const CLASSES: [&str; 3] = ["sneaker", "boot", "t-shirt/top"];

/// Items 0 (by alice, "t-shirt/top") and 1 (by machine, "boot") labeled;
/// 2 still in review.
async fn fixture(app: &App) -> (Project, Vec<Uuid>) {
    let seeded = app.seed("shoes", &CLASSES, 3).await;
    let alice = app.token("alice", Role::Reviewer).await;
    let (_, claimed) = app
        .post("/api/v1/projects/shoes/review/next", &alice, json!({}))
        .await;
    let (status, body) = app
        .post(
            &format!("/api/v1/review/{}/submit", seeded.tasks[0].task_id),
            &alice,
            json!({ "fencing_token": claimed["fencing_token"], "class": "t-shirt/top" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let item = seeded.tasks[1].item_id;
    for text in [
        "INSERT INTO labels (id, item_id, class_index, source, prediction_id, model_version_id)
         SELECT gen_random_uuid(), p.item_id, p.top_class, 'machine', p.id, p.model_version_id
         FROM predictions p WHERE p.item_id = $1",
        "UPDATE items SET state = 'auto_labeled' WHERE id = $1",
        "UPDATE review_tasks SET state = 'cancelled', closed_at = now() WHERE item_id = $1",
    ] {
        app.db()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                text,
                [item.into()],
            ))
            .await
            .unwrap();
    }
    (
        seeded.project,
        seeded.tasks.iter().map(|t| t.item_id).collect(),
    )
}

async fn write(
    app: &App,
    project: &Project,
    store: &Store,
    out: &Path,
    cancel: CancellationToken,
) -> anyhow::Result<Placed> {
    let request = Request {
        format: Format::ImageFolder,
        filters: Filters::default(),
    };
    let export = Export::begin(app.db(), project, request).await?;
    let options = Options {
        terminal: false,
        cancel,
    };
    let (summary, placed) = folder::write(export, store, out, options).await?;
    assert_eq!(summary.rows, 2);
    Ok(placed)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_folder_per_class_with_hard_links_and_the_csv_beside_them() {
    with_app(60, |app| async move {
        let (project, items) = fixture(&app).await;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("shoes");
        let placed = write(
            &app,
            &project,
            &app.ctx.store,
            &out,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(
            placed,
            Placed {
                linked: 2,
                copied: 0
            }
        );
        assert_eq!(
            entries(dir.path()),
            ["shoes"],
            "no temporary left beside it"
        );
        assert_eq!(
            entries(&out),
            ["boot", LABELS_FILE, "sneaker", "t-shirt_top"]
        );
        assert!(entries(&out.join("sneaker")).is_empty());
        let shirt = out.join("t-shirt_top").join(format!("{}.png", items[0]));
        let boot = out.join("boot").join(format!("{}.png", items[1]));
        for (file, item) in [(&shirt, 0), (&boot, 1)] {
            let meta = std::fs::metadata(file).unwrap();
            assert!(meta.nlink() >= 2, "{} is not a hard link", file.display());
            let key = sieve_shared::store::image_key(
                "shoes",
                &sieve_shared::store::sha256_hex(&sieve_testkit::png(item)),
            );
            let stored = app.ctx.store.get(&key).await.unwrap();
            assert_eq!(std::fs::read(file).unwrap(), stored.to_vec());
        }
        let csv = std::fs::read_to_string(out.join(LABELS_FILE)).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert!(lines[0].starts_with("item_id,key,"), "{csv}");
        assert_eq!(lines.len(), 3, "{csv}");
        assert!(lines[1].starts_with(&items[0].to_string()) && lines[1].contains("t-shirt/top"));
        assert!(lines[2].starts_with(&items[1].to_string()) && lines[2].contains(",machine,"));

        // It will not write into a directory with something in it.
        let err = write(
            &app,
            &project,
            &app.ctx.store,
            &out,
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(format!("{err:#}").contains("not empty"), "{err:#}");

        // Interrupted: nothing at --out, no temporary left.
        let again = dir.path().join("again");
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = write(&app, &project, &app.ctx.store, &again, cancel)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("interrupted"), "{err:#}");
        assert_eq!(entries(dir.path()), ["shoes"]);
    })
    .await;
}

#[tokio::test]
async fn images_are_copied_from_a_store_that_is_not_local() {
    with_app(60, |app| async move {
        let (project, items) = fixture(&app).await;
        // The same objects in a store with no directory behind it.
        let remote = Store::from_backend(Arc::new(object_store::memory::InMemory::new()));
        for (n, item) in items.iter().enumerate() {
            let key = sieve_shared::store::image_key(
                "shoes",
                &sieve_shared::store::sha256_hex(&sieve_testkit::png(n)),
            );
            let bytes = app.ctx.store.get(&key).await.unwrap();
            remote.put(&key, bytes).await.unwrap();
            let _ = item;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("shoes");
        let placed = write(&app, &project, &remote, &out, CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(
            placed,
            Placed {
                linked: 0,
                copied: 2
            }
        );
        let boot = out.join("boot").join(format!("{}.png", items[1]));
        assert_eq!(std::fs::metadata(&boot).unwrap().nlink(), 1);
        assert_eq!(
            std::fs::read(&boot).unwrap(),
            sieve_testkit::png(1),
            "the image's bytes"
        );
    })
    .await;
}

#[tokio::test]
async fn refused_over_http_and_to_standard_output() {
    with_app(60, |app| async move {
        app.seed("shoes", &CLASSES, 1).await;
        let ml = app.token("trainer", Role::Ml).await;
        let response = app
            .http
            .get(app.url("/api/v1/projects/shoes/export?format=imagefolder"))
            .bearer_auth(&ml)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 422);
        let body = response.text().await.unwrap();
        assert!(body.contains("--out DIR"), "{body}");

        let output = std::process::Command::new(env!("CARGO_BIN_EXE_sieve"))
            .args([
                "export",
                "-p",
                "shoes",
                "--format",
                "imagefolder",
                "--out",
                "-",
            ])
            .env("SIEVE_DATABASE__URL", &app.settings.database.url)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--out DIR"), "{stderr}");
    })
    .await;
}
