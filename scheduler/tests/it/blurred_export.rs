//! `sieve export --format blurred` on the real services, with real photos of faces: the
//! delivered images have every boxed face blurred and nothing else changed, an image still in
//! review is left out and counted, the original bytes never go out, and an image that no longer
//! decodes stops the delivery instead of slipping through unblurred.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use image::RgbaImage;
use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::export::blur::{Blur, BlurStyle};
use sieve_scheduler::export::output::Options as ExportOptions;
use sieve_scheduler::export::{Export, Filters, Format, Request, folder};
use sieve_scheduler::ingest::{self, Options, Source};
use sieve_scheduler::projects::{self, Project};
use sieve_testkit::faces::{FIXTURE, face as face_box, photo};
use sieve_testkit::{App, with_app};
use tokio_util::sync::CancellationToken;

/// The faces of the two photos boxed for import (the fixture's), one per row.
fn boxed_faces() -> Vec<(&'static str, [f32; 4])> {
    FIXTURE
        .iter()
        .filter(|(name, _)| ["t1.jpg", "astronaut.png"].contains(name))
        .flat_map(|(name, boxes)| boxes.iter().map(move |b| (*name, *b)))
        .collect()
}

async fn face_project(app: &App, name: &str) -> Project {
    let ml = app.token(&format!("ml-{name}"), Role::Ml).await;
    let (status, body) = app
        .post(
            "/api/v1/projects",
            &ml,
            json!({ "name": name, "classes": ["face", "plate"], "task_kind": "detection" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    projects::get(app.db(), name).await.unwrap()
}

/// The two photos imported with their face boxes (human-checked boxes arrive as an
/// import), and a third photo ingested bare, so it waits in review.
async fn faces_with_one_in_review(app: &App, project: &Project, dir: &Path) {
    let boxed = dir.join("boxed");
    std::fs::create_dir(&boxed).unwrap();
    for name in ["t1.jpg", "astronaut.png"] {
        std::fs::copy(photo(name), boxed.join(name)).unwrap();
    }
    let mut csv = String::from("image_path,xmin,ymin,xmax,ymax,label\n");
    for (name, [x0, y0, x1, y1]) in boxed_faces() {
        csv.push_str(&format!("{name},{x0},{y0},{x1},{y1},face\n"));
    }
    std::fs::write(boxed.join("faces.csv"), csv).unwrap();
    let source = Source::Annotations {
        path: boxed.join("faces.csv"),
        root: None,
    };
    ingest::ingest(&app.ctx, project, &source, &Options::default())
        .await
        .unwrap();
    let bare = dir.join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(photo("Tom_Hanks_54745.png"), bare.join("tom.png")).unwrap();
    ingest::ingest_folder(&app.ctx, project, &bare, false)
        .await
        .unwrap();
}

async fn export_blurred(
    app: &App,
    project: &Project,
    out: &Path,
    filters: Filters,
) -> anyhow::Result<(sieve_scheduler::export::Summary, folder::Placed)> {
    let request = Request {
        format: Format::Blurred,
        filters,
    };
    let export = Export::begin(app.db(), project, request).await?;
    let options = ExportOptions {
        terminal: false,
        cancel: CancellationToken::new(),
    };
    let blur = Blur::new(BlurStyle::Gaussian, None, None).unwrap();
    folder::write_blurred(export, &app.ctx.store, out, options, blur).await
}

/// Mean absolute difference between horizontal neighbours over a region: the detail a
/// face's features are made of.
fn detail(image: &RgbaImage, [x0, y0, x1, y1]: [u32; 4]) -> f64 {
    let (mut sum, mut n) = (0.0, 0.0);
    for y in y0..y1 {
        for x in x0..x1 - 1 {
            for c in 0..3 {
                let a = f64::from(image.get_pixel(x, y).0[c]);
                let b = f64::from(image.get_pixel(x + 1, y).0[c]);
                sum += (a - b).abs();
                n += 1.0;
            }
        }
    }
    sum / n
}

/// Mean absolute difference of two images of one size, over the pixels no padded box covers.
fn change_outside(a: &RgbaImage, b: &RgbaImage, regions: &[[u32; 4]]) -> f64 {
    let (mut sum, mut n) = (0.0, 0.0);
    for (x, y, p) in a.enumerate_pixels() {
        if regions
            .iter()
            .any(|[x0, y0, x1, y1]| x >= *x0 && x < *x1 && y >= *y0 && y < *y1)
        {
            continue;
        }
        let q = b.get_pixel(x, y);
        for c in 0..3 {
            sum += (f64::from(p.0[c]) - f64::from(q.0[c])).abs();
            n += 1.0;
        }
    }
    sum / n
}

#[tokio::test]
async fn a_blurred_export_delivers_labeled_photos_with_every_face_blurred() {
    with_app(120, |app| async move {
        let project = face_project(&app, "street").await;
        let dir = tempfile::tempdir().unwrap();
        faces_with_one_in_review(&app, &project, dir.path()).await;

        let out = dir.path().join("delivery");
        let (summary, placed) = export_blurred(&app, &project, &out, Filters::default())
            .await
            .unwrap();
        assert_eq!((summary.rows, placed.copied, placed.linked), (2, 2, 0));
        assert_eq!(summary.left_out_header(), "in_review=1", "{summary:?}");

        let coco: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("annotations.json")).unwrap())
                .unwrap();
        assert_eq!(
            coco["annotations"].as_array().unwrap().len(),
            boxed_faces().len()
        );
        assert_eq!(coco["categories"][0]["name"], "face");
        let mut delivered: Vec<PathBuf> = std::fs::read_dir(out.join("images"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        delivered.sort();
        assert_eq!(delivered.len(), 2, "{delivered:?}");

        let blur = Blur::default();
        for image_entry in coco["images"].as_array().unwrap() {
            // COCO names the delivered file; the item says which photo it was.
            let file_name = image_entry["file_name"].as_str().unwrap();
            let path = out.join(file_name);
            assert!(
                delivered.contains(&path),
                "{file_name} not among {delivered:?}"
            );
            let item_id: uuid::Uuid =
                serde_json::from_value(image_entry["sieve_item_id"].clone()).unwrap();
            let item = {
                use sea_orm::EntityTrait;
                sieve_scheduler::entities::item::Entity::find_by_id(item_id)
                    .one(app.db())
                    .await
                    .unwrap()
                    .unwrap()
            };
            let name = Path::new(&item.source)
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let original_bytes = std::fs::read(photo(&name)).unwrap();
            let delivered_bytes = std::fs::read(&path).unwrap();
            assert_ne!(
                original_bytes, delivered_bytes,
                "{name}: the original went out"
            );
            assert_eq!(
                path.extension().unwrap(),
                Path::new(&name).extension().unwrap(),
                "{name} keeps its format"
            );
            let original = image::load_from_memory(&original_bytes)
                .unwrap()
                .into_rgba8();
            let blurred = image::load_from_memory(&delivered_bytes)
                .unwrap()
                .into_rgba8();
            assert_eq!(original.dimensions(), blurred.dimensions());
            let (w, h) = original.dimensions();
            let regions: Vec<[u32; 4]> = boxed_faces()
                .iter()
                .filter(|(photo, _)| *photo == name)
                .map(|(_, b)| blur.region(&face_box(*b), w, h).unwrap())
                .collect();
            assert!(!regions.is_empty(), "{name}");
            for region in &regions {
                let (before, after) = (detail(&original, *region), detail(&blurred, *region));
                assert!(
                    after < before * 0.35,
                    "{name}: the face at {region:?} keeps detail {after:.1} of {before:.1}"
                );
            }
            // Nothing else changed: exactly for the PNG, within JPEG's re-encoding for the JPEG.
            let outside = change_outside(&original, &blurred, &regions);
            let limit = if name.ends_with(".png") { 0.0 } else { 2.5 };
            assert!(
                outside <= limit,
                "{name}: {outside:.2} changed outside the faces"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_blurred_export_refuses_what_it_cannot_deliver_safely() {
    with_app(120, |app| async move {
        let project = face_project(&app, "plaza").await;
        let dir = tempfile::tempdir().unwrap();
        faces_with_one_in_review(&app, &project, dir.path()).await;

        // Items still in review are not deliverable, even when asked for.
        let mut filters = Filters::default();
        filters.add_state("in_review").unwrap();
        let err = export_blurred(&app, &project, &dir.path().join("a"), filters)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("labeled items only") && err.contains("in_review"),
            "{err}"
        );
        // A classification project has no boxes to blur.
        let seeded = app.seed("shoes", &["boot", "sandal"], 0).await;
        let request = Request {
            format: Format::Blurred,
            filters: Filters::default(),
        };
        let err = Export::begin(app.db(), &seeded.project, request)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("classification project"), "{err}");

        // An image whose stored bytes no longer decode stops the delivery, naming the item,
        // and leaves nothing at --out: it is never delivered unblurred.
        let files = app
            .ctx
            .store
            .local_files()
            .expect("the tests' store is local");
        let (item, key): (uuid::Uuid, String) = {
            use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
            use sieve_scheduler::entities::item;
            let found = item::Entity::find()
                .filter(item::Column::ProjectId.eq(project.id.as_uuid()))
                .filter(item::Column::Source.contains("astronaut"))
                .one(app.db())
                .await
                .unwrap()
                .unwrap();
            (found.id, found.object_key)
        };
        let stored = files.file(&key).unwrap();
        let mut bytes = std::fs::read(&stored).unwrap();
        bytes.truncate(bytes.len() / 3);
        std::fs::remove_file(&stored).unwrap();
        std::fs::write(&stored, bytes).unwrap();
        let out = dir.path().join("b");
        let err = export_blurred(&app, &project, &out, Filters::default())
            .await
            .unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains(&item.to_string()) && message.contains("nothing was delivered"),
            "{message}"
        );
        assert!(
            !out.exists(),
            "a partial delivery was left at {}",
            out.display()
        );
    })
    .await;
}

/// Recall first from the start: a deidentify project created without a policy states a target
/// of 0.99 (images are accepted by machine only once random checks show that share of them miss
/// nothing), where a project of another kind keeps a plain confidence threshold; a policy given
/// at creation is kept as given.
#[tokio::test]
async fn a_deidentify_project_starts_with_a_stated_target() {
    with_app(60, |app| async move {
        let ml = app.token("ml-targets", Role::Ml).await;
        let create = |body: Value| {
            let app = &app;
            let ml = &ml;
            async move {
                let (status, body) = app.post("/api/v1/projects", ml, body).await;
                assert_eq!(status, 201, "{body}");
                body
            }
        };
        let street = create(json!({ "name": "street", "task_kind": "deidentify" })).await;
        assert_eq!(street["policy"]["target_accuracy"], 0.99, "{street}");
        assert_eq!(street["policy"]["target_recall"], 0.99, "{street}");
        let trees =
            create(json!({ "name": "trees", "classes": ["tree"], "task_kind": "detection" })).await;
        assert_eq!(trees["policy"]["target_accuracy"], Value::Null, "{trees}");
        assert_eq!(trees["policy"]["target_recall"], Value::Null, "{trees}");
        let fixed = create(json!({
            "name": "fixed",
            "task_kind": "deidentify",
            "policy": { "confidence_threshold": 0.95 }
        }))
        .await;
        assert_eq!(fixed["policy"]["target_accuracy"], Value::Null, "{fixed}");
        assert_eq!(
            projects::get(app.db(), "street")
                .await
                .unwrap()
                .policy
                .target_accuracy,
            Some(0.99)
        );
    })
    .await;
}
