//! Detection projects on the real services: images go to people (no
//! model), box labels are submitted and checked against the image, box
//! annotations import from Pascal VOC, CSV and COCO (a bad file imports
//! nothing), and the boxes leave as COCO, JSON Lines and a YOLO folder.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use sea_orm::{DbBackend, FromQueryResult, Statement};
use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::export::output::Options as ExportOptions;
use sieve_scheduler::export::{Export, Filters, Format, Request, folder};
use sieve_scheduler::ingest::{self, Options, Source};
use sieve_scheduler::projects::{self, Project};
use sieve_shared::messages::ModelArch;
use sieve_testkit::{App, with_app};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A `width`×`height` PNG whose pixels depend on `seed` (distinct bytes).
fn png(path: &Path, width: u32, height: u32, seed: u8) {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([seed, (x % 256) as u8, (y % 256) as u8])
    });
    image.save(path).unwrap();
}

async fn detection_project(app: &App, name: &str) -> Project {
    let ml = app.token("ml", Role::Ml).await;
    let (status, body) = app
        .post(
            "/api/v1/projects",
            &ml,
            json!({ "name": name, "classes": ["tree", "car"], "task_kind": "detection" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["task_kind"], "detection", "{body}");
    projects::get(app.db(), name).await.unwrap()
}

#[derive(Debug, FromQueryResult)]
struct Count {
    n: i64,
}

async fn count(app: &App, sql: &str, project: &Project) -> i64 {
    Count::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        [project.id.as_uuid().into()],
    ))
    .one(app.db())
    .await
    .unwrap()
    .unwrap()
    .n
}

#[tokio::test]
async fn a_detection_project_sends_its_images_to_people_until_they_have_boxed_some() {
    with_app(60, |app| async move {
        let project = detection_project(&app, "trees").await;
        let dir = tempfile::tempdir().unwrap();
        for n in 0..3 {
            png(&dir.path().join(format!("{n}.png")), 64, 48, n);
        }
        let summary = ingest::ingest_folder(&app.ctx, &project, dir.path(), false)
            .await
            .unwrap();
        assert_eq!((summary.new_items, summary.dispatched), (3, 0));

        // A flat box in a VOC file is refused before anything is read.
        std::fs::write(
            dir.path().join("flat.xml"),
            "<annotation>\n<filename>0.png</filename>\n<object><name>tree</name>\n<bndbox><xmin>5</xmin><ymin>1</ymin><xmax>5</xmax><ymax>9</ymax></bndbox></object>\n</annotation>\n",
        )
        .unwrap();
        let err = import(&app, &project, &dir.path().join("flat.xml"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3") && err.contains("width"), "{err}");
        let in_review = "SELECT count(*) AS n FROM items WHERE project_id = $1 AND state = 'in_review'";
        assert_eq!(count(&app, in_review, &project).await, 3);
        let seeds = "SELECT count(*) AS n FROM review_tasks
                     WHERE project_id = $1 AND state = 'open' AND reason = 'seed'";
        assert_eq!(count(&app, seeds, &project).await, 3);
        let runs = "SELECT count(*) AS n FROM training_runs WHERE project_id = $1";
        assert_eq!(count(&app, runs, &project).await, 0, "no model is queued");

        let ml = app.token("ml2", Role::Ml).await;
        let (status, body) = app
            .post("/api/v1/projects/trees/retrain", &ml, json!({}))
            .await;
        assert_eq!(status, 422, "{body}");
        assert!(
            body.to_string().contains("no detection labels to train on yet"),
            "{body}"
        );
        assert_eq!(project.arch, ModelArch::Detector, "{project:?}");
        // A detection project runs nothing but the detector.
        let (status, body) = app
            .post(
                "/api/v1/projects",
                &ml,
                json!({ "name": "cnn-boxes", "classes": ["tree"], "task_kind": "detection", "arch": "mobilenet_v2" }),
            )
            .await;
        assert_eq!(status, 422, "{body}");
        assert!(body.to_string().contains("detection projects run the detector"), "{body}");
    })
    .await;
}

#[tokio::test]
async fn boxes_are_checked_against_the_image_and_the_kind() {
    with_app(60, |app| async move {
        let project = detection_project(&app, "streets").await;
        let dir = tempfile::tempdir().unwrap();
        png(&dir.path().join("a.png"), 64, 48, 1);
        ingest::ingest_folder(&app.ctx, &project, dir.path(), false)
            .await
            .unwrap();
        let alice = app.token("alice", Role::Reviewer).await;
        let (status, task) = app
            .post("/api/v1/projects/streets/review/next", &alice, json!({}))
            .await;
        assert_eq!(status, 200, "{task}");
        assert_eq!(task["task_kind"], "detection");
        assert_eq!(task["boxes"], json!([]), "nothing to start from yet");
        let submit = format!("/api/v1/review/{}/submit", task["task_id"].as_str().unwrap());
        let token = task["fencing_token"].clone();
        let tree = |x_min: f32, x_max: f32| {
            json!({ "class": "tree", "x_min": x_min, "y_min": 4.0, "x_max": x_max, "y_max": 40.0 })
        };

        let refused = [
            (json!({ "fencing_token": token, "class": "tree" }), "detection project"),
            (json!({ "fencing_token": token, "boxes": [tree(1.0, 10.0), tree(30.0, 64.5)] }), "box 2 of 2"),
            (json!({ "fencing_token": token, "boxes": [tree(10.0, 10.0)] }), "zero or negative width"),
            (
                json!({ "fencing_token": token, "boxes": [{ "class": "boat", "x_min": 1.0, "y_min": 1.0, "x_max": 2.0, "y_max": 2.0 }] }),
                "\"boat\"",
            ),
        ];
        for (body, says) in refused {
            let (status, answer) = app.post(&submit, &alice, body).await;
            assert_eq!(status, 422, "{answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains(says), "{says}: {message}");
        }

        let car = json!({ "class": "car", "x_min": 0.0, "y_min": 0.0, "x_max": 64.0, "y_max": 48.0 });
        let (status, label) = app
            .post(&submit, &alice, json!({ "fencing_token": token, "boxes": [tree(1.5, 10.0), car] }))
            .await;
        assert_eq!(status, 200, "{label}");
        assert_eq!(label["boxes"][1]["class"], "car");
        assert_eq!(label["class"], Value::Null);

        #[derive(FromQueryResult)]
        struct Stored {
            class_index: Option<i32>,
            boxes: Option<Value>,
        }
        let stored = Stored::find_by_statement(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT class_index, boxes FROM labels WHERE item_id = $1",
            [Uuid::parse_str(label["item_id"].as_str().unwrap()).unwrap().into()],
        ))
        .all(app.db())
        .await
        .unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].class_index, None);
        assert_eq!(
            stored[0].boxes,
            Some(json!([
                { "class": 0, "x_min": 1.5, "y_min": 4.0, "x_max": 10.0, "y_max": 40.0 },
                { "class": 1, "x_min": 0.0, "y_min": 0.0, "x_max": 64.0, "y_max": 48.0 },
            ]))
        );

        // Boxes sent to a classification project.
        let seeded = app.seed("shoes", &["boot", "sandal"], 1).await;
        let (_, claimed) = app
            .post("/api/v1/projects/shoes/review/next", &alice, json!({}))
            .await;
        let (status, answer) = app
            .post(
                &format!("/api/v1/review/{}/submit", seeded.tasks[0].task_id),
                &alice,
                json!({ "fencing_token": claimed["fencing_token"], "boxes": [] }),
            )
            .await;
        assert_eq!(status, 422, "{answer}");
        assert!(
            answer.to_string().contains("classification project"),
            "{answer}"
        );
    })
    .await;
}

/// Three images (64×48), each annotated in one of the three formats: a
/// tree and a car on `a` (VOC), two trees on `b` (CSV), nothing on `c`
/// (COCO, an image without annotations) and a car on `d` (COCO).
fn annotated_folder(dir: &Path) {
    for (n, name) in ["a", "b", "c", "d"].iter().enumerate() {
        png(&dir.join(format!("{name}.png")), 64, 48, 10 + n as u8);
    }
    std::fs::write(
        dir.join("a.xml"),
        r#"<annotation>
  <filename>a.png</filename>
  <size><width>64</width><height>48</height><depth>3</depth></size>
  <object><name>tree</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>
  <object><name>car</name><bndbox><xmin>32.5</xmin><ymin>0</ymin><xmax>64</xmax><ymax>48</ymax></bndbox></object>
</annotation>
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("b.csv"),
        "image_path,xmin,ymin,xmax,ymax,label\nb.png,0,0,10,10,tree\nb.png,20,20,40,30,tree\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("cd.json"),
        json!({
            "images": [
                { "id": 1, "file_name": "c.png", "width": 64, "height": 48 },
                { "id": 2, "file_name": "d.png", "width": 64, "height": 48 },
            ],
            "categories": [{ "id": 7, "name": "car" }],
            "annotations": [{ "id": 1, "image_id": 2, "category_id": 7, "bbox": [4, 5, 20, 10] }],
        })
        .to_string(),
    )
    .unwrap();
}

async fn import(
    app: &App,
    project: &Project,
    file: &Path,
) -> anyhow::Result<ingest::IngestSummary> {
    let source = Source::Annotations {
        path: file.to_owned(),
        root: None,
    };
    ingest::ingest(&app.ctx, project, &source, &Options::default()).await
}

#[tokio::test]
async fn annotations_import_from_voc_csv_and_coco_and_a_bad_file_imports_nothing() {
    with_app(60, |app| async move {
        let project = detection_project(&app, "orchard").await;
        let dir = tempfile::tempdir().unwrap();
        annotated_folder(dir.path());

        // Line 3's box leaves the 64-wide image, line 4 names a class the
        // project lacks; line 2 is fine, yet nothing of the file is
        // imported. Both problems are listed at once.
        let bad = dir.path().join("bad.csv");
        std::fs::write(
            &bad,
            "image_path,xmin,ymin,xmax,ymax,label\nb.png,0,0,10,10,tree\nb.png,50,0,70,10,tree\nc.png,5,5,9,9,boat\n",
        )
        .unwrap();
        let err = import(&app, &project, &bad).await.unwrap_err().to_string();
        assert!(
            err.contains("line 3")
                && err.contains("right edge")
                && err.contains("line 4")
                && err.contains("\"boat\"")
                && err.contains("nothing was imported"),
            "{err}"
        );
        let items = "SELECT count(*) AS n FROM items WHERE project_id = $1";
        assert_eq!(count(&app, items, &project).await, 0);

        let mut imported = 0;
        for file in ["a.xml", "b.csv", "cd.json"] {
            let summary = import(&app, &project, &dir.path().join(file)).await.unwrap();
            assert!(!summary.has_failures(), "{file}: {summary:?}");
            imported += summary.imported_labels;
        }
        assert_eq!(imported, 4);
        let labeled = "SELECT count(*) AS n FROM items WHERE project_id = $1 AND state = 'human_labeled'";
        assert_eq!(count(&app, labeled, &project).await, 4);
        let boxes = "SELECT coalesce(sum(jsonb_array_length(l.boxes)), 0)::bigint AS n
                     FROM labels l JOIN items i ON i.id = l.item_id
                     WHERE i.project_id = $1 AND l.source = 'import'";
        assert_eq!(count(&app, boxes, &project).await, 5);
        let open = "SELECT count(*) AS n FROM review_tasks WHERE project_id = $1";
        assert_eq!(count(&app, open, &project).await, 0, "labeled images need no review");

        // A classification project takes no boxes.
        let seeded = app.seed("shoes", &["boot", "sandal"], 0).await;
        let err = import(&app, &seeded.project, &dir.path().join("a.xml"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("classification project"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn boxes_leave_as_coco_json_lines_and_a_yolo_folder() {
    with_app(60, |app| async move {
        let project = detection_project(&app, "grove").await;
        let dir = tempfile::tempdir().unwrap();
        annotated_folder(dir.path());
        for file in ["a.xml", "b.csv", "cd.json"] {
            import(&app, &project, &dir.path().join(file))
                .await
                .unwrap();
        }
        let ml = app.token("ml3", Role::Ml).await;

        let (status, coco) = app
            .get("/api/v1/projects/grove/export?format=coco", &ml)
            .await;
        assert_eq!(status, 200, "{coco}");
        assert_eq!(coco["images"].as_array().unwrap().len(), 4);
        let annotations = coco["annotations"].as_array().unwrap();
        assert_eq!(annotations.len(), 5);
        let ids: std::collections::BTreeSet<u64> = annotations
            .iter()
            .map(|a| a["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids.len(), 5, "annotation ids are distinct");
        let car_on_d = annotations
            .iter()
            .find(|a| a["bbox"] == json!([4.0, 5.0, 20.0, 10.0]))
            .unwrap_or_else(|| panic!("d's car: {annotations:?}"));
        assert_eq!(car_on_d["category_id"], 2);
        assert_eq!(car_on_d["area"], 200.0);
        assert_eq!(car_on_d["attributes"]["label_source"], "import");
        let image = coco["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == car_on_d["image_id"])
            .unwrap();
        assert_eq!(
            (image["width"].clone(), image["height"].clone()),
            (json!(64), json!(48))
        );

        let (status, answer) = app
            .get("/api/v1/projects/grove/export?format=csv", &ml)
            .await;
        assert_eq!(status, 422, "{answer}");
        assert!(
            answer.to_string().contains("coco, yolo, jsonl or blurred"),
            "{answer}"
        );

        let request = Request {
            format: Format::Yolo,
            filters: Filters::default(),
        };
        let export = Export::begin(app.db(), &project, request).await.unwrap();
        let out = dir.path().join("yolo");
        let options = ExportOptions {
            terminal: false,
            cancel: CancellationToken::new(),
        };
        let (summary, placed) = folder::write(export, &app.ctx.store, &out, options)
            .await
            .unwrap();
        assert_eq!((summary.rows, placed.linked + placed.copied), (4, 4));
        assert_eq!(
            std::fs::read_to_string(out.join("classes.txt")).unwrap(),
            "tree\ncar\n"
        );
        assert!(
            std::fs::read_to_string(out.join("data.yaml"))
                .unwrap()
                .contains("1: \"car\"")
        );
        let rows: Vec<Value> = std::fs::read_to_string(out.join("labels.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 4);
        let mut lines_per_image = Vec::new();
        for row in &rows {
            let item = row["item_id"].as_str().unwrap();
            let text =
                std::fs::read_to_string(out.join("labels").join(format!("{item}.txt"))).unwrap();
            assert_eq!(
                text.lines().count(),
                row["boxes"].as_array().unwrap().len(),
                "{row}"
            );
            assert!(out.join("images").join(format!("{item}.png")).exists());
            lines_per_image.push(text.lines().count());
            if row["source"].as_str().unwrap().ends_with("d.png") {
                // The car at 4,5 + 20×10 in a 64×48 image.
                assert_eq!(text, "1 0.218750 0.208333 0.312500 0.208333\n");
            }
        }
        lines_per_image.sort();
        assert_eq!(lines_per_image, [0, 1, 2, 2]);
    })
    .await;
}

/// The tree crowns deepforest's wheel ships (`ops/fetch-tree-crowns.sh`,
/// run by `ops/install-deps.sh`): real aerial images with their VOC
/// annotations, two of them large (2299×2472 and 1249×1035).
fn tree_crowns() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/tree-crowns");
    assert!(
        dir.join("SOAP_061.xml").exists(),
        "the tree crowns are installed by ops/install-deps.sh (ops/fetch-tree-crowns.sh); {} lacks them",
        dir.display()
    );
    dir
}

#[tokio::test]
async fn the_real_tree_crowns_import_whole_and_leave_as_coco() {
    with_app(60, |app| async move {
        let ml = app.token("ml", Role::Ml).await;
        let (status, body) = app
            .post(
                "/api/v1/projects",
                &ml,
                json!({ "name": "crowns", "classes": ["Tree", "Dead", "Alive"], "task_kind": "detection" }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let project = projects::get(app.db(), "crowns").await.unwrap();

        // The folder of VOC files: one per annotated image.
        let summary = import(&app, &project, &tree_crowns()).await.unwrap();
        assert!(!summary.has_failures(), "{summary:?}");
        assert_eq!((summary.new_items, summary.imported_labels), (4, 4));

        let (status, coco) = app.get("/api/v1/projects/crowns/export?format=coco", &ml).await;
        assert_eq!(status, 200);
        let mut per_image: Vec<(u64, u64, usize)> = coco["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|image| {
                let boxes = coco["annotations"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|a| a["image_id"] == image["id"])
                    .count();
                (image["width"].as_u64().unwrap(), image["height"].as_u64().unwrap(), boxes)
            })
            .collect();
        per_image.sort();
        assert_eq!(
            per_image,
            [(400, 400, 37), (400, 400, 61), (1249, 1035, 279), (2299, 2472, 574)]
        );
        let dead = coco["annotations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["category_id"] == 2)
            .count();
        assert_eq!(dead, 28, "SOAP_061's dead trees");
    })
    .await;
}
