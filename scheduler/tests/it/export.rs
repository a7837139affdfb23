//! `sieve export` and `GET /projects/{p}/export` on the real services: the
//! provenance of every kind of label, the filters, the incremental cursor,
//! bad input, an empty project, an interrupted export, and the round trip
//! through ingest.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;

use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, Statement};
use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::{self, Role};
use sieve_scheduler::entities::{item, label};
use sieve_scheduler::export::output::{self, Destination};
use sieve_scheduler::export::{self, Export, Format, Request};
use sieve_scheduler::ingest;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_scheduler::routing::calibration;
use sieve_shared::messages::ModelArch;
use sieve_testkit::{App, png, with_app};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const CLASSES: [&str; 3] = ["sneaker", "boot", "sandal"];

/// A project with one item of every kind, by the seeded task's index:
/// 0, 1 labeled by alice over HTTP (as proposed, and not); 2, 3, 4 labeled
/// by machine (classes 2, 0, 1); 5 an audit of a would-be machine label,
/// confirmed by bob; 6 still in review; 7 failed; and `import`, ingested
/// from a manifest with the label `boot`.
struct Fixture {
    project: Project,
    items: Vec<Uuid>,
    tasks: Vec<Uuid>,
    import: Uuid,
    alice: Uuid,
    bob: Uuid,
    ml: String,
}

async fn sql(app: &App, text: &str, values: Vec<sea_orm::Value>) {
    app.db()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            text,
            values,
        ))
        .await
        .unwrap();
}

async fn token_id(app: &App, name: &str) -> Uuid {
    api_token::Entity::find()
        .all(app.db())
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.name == name)
        .unwrap()
        .id
}

/// Claim the next task as `token`, check it is `task`, label it `class`.
async fn review(app: &App, project: &str, token: &str, task: Uuid, class: &str) {
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
}

async fn fixture(app: &App, name: &str) -> Fixture {
    let seeded = app.seed(name, &CLASSES, 8).await;
    let tasks = &seeded.tasks;
    // Machine labels, as routing writes them: from the item's prediction.
    for t in &tasks[2..=4] {
        sql(
            app,
            "INSERT INTO labels (id, item_id, class_index, source, prediction_id, model_version_id)
             SELECT $1, p.item_id, p.top_class, 'machine', p.id, p.model_version_id
             FROM predictions p WHERE p.item_id = $2",
            vec![Uuid::now_v7().into(), t.item_id.into()],
        )
        .await;
        sql(
            app,
            "UPDATE items SET state = 'auto_labeled' WHERE id = $1",
            vec![t.item_id.into()],
        )
        .await;
    }
    for t in tasks[2..=4].iter().chain([&tasks[7]]) {
        sql(
            app,
            "UPDATE review_tasks SET state = 'cancelled', closed_at = now() WHERE id = $1",
            vec![t.task_id.into()],
        )
        .await;
    }
    sql(
        app,
        "UPDATE items SET state = 'failed', last_error = 'truncated' WHERE id = $1",
        vec![tasks[7].item_id.into()],
    )
    .await;
    sql(
        app,
        "UPDATE review_tasks SET reason = 'audit' WHERE id = $1",
        vec![tasks[5].task_id.into()],
    )
    .await;

    let alice = app.token("alice", Role::Reviewer).await;
    let bob = app.token("bob", Role::Reviewer).await;
    review(app, name, &alice, tasks[0].task_id, "sneaker").await;
    review(app, name, &alice, tasks[1].task_id, "sandal").await;
    review(app, name, &bob, tasks[5].task_id, "sandal").await;

    // An import: a stored image named by a manifest with its label.
    let key = format!("incoming/{name}/imported.png");
    app.ctx
        .store
        .put(&key, bytes::Bytes::from(png(99)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("list.csv");
    std::fs::write(&manifest, format!("key,label\n{key},boot\n")).unwrap();
    let project = projects::get(app.db(), name).await.unwrap();
    let summary = ingest::ingest_manifest(&app.ctx, &project, &manifest, None, false)
        .await
        .unwrap();
    assert_eq!(summary.imported_labels, 1, "{summary:?}");
    let import = item::Entity::find()
        .all(app.db())
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.object_key == key)
        .unwrap()
        .id;

    Fixture {
        project,
        items: tasks.iter().map(|t| t.item_id).collect(),
        tasks: tasks.iter().map(|t| t.task_id).collect(),
        import,
        alice: token_id(app, "alice").await,
        bob: token_id(app, "bob").await,
        ml: app.token("trainer", Role::Ml).await,
    }
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn get(app: &App, path: &str, token: Option<&str>) -> Answer {
    let mut request = app.http.get(app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.unwrap(),
    }
}

/// CSV rows as maps from the header's names (no field here is quoted).
fn csv_rows(text: &str) -> Vec<HashMap<String, String>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header").split(',').collect();
    lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), header.len(), "{line}");
            header
                .iter()
                .zip(fields)
                .map(|(h, f)| ((*h).to_owned(), f.to_owned()))
                .collect()
        })
        .collect()
}

fn jsonl_rows(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn by_item(rows: Vec<HashMap<String, String>>) -> HashMap<Uuid, HashMap<String, String>> {
    rows.into_iter()
        .map(|r| (r["item_id"].parse().unwrap(), r))
        .collect()
}

#[tokio::test]
async fn rows_carry_each_labels_provenance_as_csv_and_json_lines() {
    with_app(300, |app| async move {
        let f = fixture(&app, "shoes").await;
        let answer = get(
            &app,
            "/api/v1/projects/shoes/export?format=csv",
            Some(&f.ml),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.headers["content-type"], "text/csv; charset=utf-8");
        assert_eq!(
            answer.headers["x-sieve-export-left-out"],
            "failed=1,in_review=1"
        );
        let rows = by_item(csv_rows(&answer.body));
        // Everything labeled, nothing in review or failed.
        let mut expected: Vec<Uuid> = [0, 1, 2, 3, 4, 5].map(|i| f.items[i]).to_vec();
        expected.push(f.import);
        let mut got: Vec<Uuid> = rows.keys().copied().collect();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
        // Rows come in item id order (a stable order for diffing exports).
        let order: Vec<Uuid> = csv_rows(&answer.body)
            .iter()
            .map(|r| r["item_id"].parse().unwrap())
            .collect();
        assert_eq!(order, expected);

        let alice = &rows[&f.items[1]];
        assert_eq!(alice["label"], "sandal");
        assert_eq!(alice["label_source"], "human");
        assert_eq!(alice["labeled_by"], "alice");
        assert_eq!(alice["labeled_by_token"], f.alice.to_string());
        assert_eq!(alice["model_version"], "1");
        assert_eq!(alice["confidence"], "0.6");
        let agreement: f32 = alice["agreement"].parse().unwrap();
        assert!((agreement - 0.67).abs() < 1e-6, "{alice:?}");
        assert_eq!(alice["audited"], "false");
        assert_eq!(alice["machine_audits"], "");
        assert_eq!(alice["state"], "human_labeled");
        assert_eq!(alice["source"], "photos/item-1.png");
        assert!(alice["key"].starts_with("projects/"), "{alice:?}");

        let audit = &rows[&f.items[5]];
        assert_eq!(audit["labeled_by_token"], f.bob.to_string());
        assert_eq!(audit["audited"], "true");

        // A machine label of the audited class carries the accuracy audits
        // measured: one audit, confirmed.
        let machine = &rows[&f.items[2]];
        assert_eq!(machine["label"], "sandal");
        assert_eq!(machine["label_source"], "machine");
        assert_eq!(machine["labeled_by"], "");
        assert_eq!(machine["labeled_by_token"], "");
        assert_eq!(machine["model_version"], "1");
        assert_eq!(machine["state"], "auto_labeled");
        let z = calibration::z_for(f.project.policy.confidence_level);
        let (lower, upper) = calibration::wilson(1, 1, z);
        assert_eq!(machine["machine_audits"], "1");
        assert_eq!(machine["machine_accuracy"], "1");
        assert_eq!(machine["machine_accuracy_lower"], lower.to_string());
        assert_eq!(machine["machine_accuracy_upper"], upper.to_string());
        // A class never audited: no figure, and zero audits.
        let unaudited = &rows[&f.items[3]];
        assert_eq!(unaudited["label"], "sneaker");
        assert_eq!(unaudited["machine_audits"], "0");
        assert_eq!(unaudited["machine_accuracy"], "");

        let import = &rows[&f.import];
        assert_eq!(import["label"], "boot");
        assert_eq!(import["label_source"], "import");
        assert_eq!(import["confidence"], "");
        assert_eq!(import["model_version"], "");

        // JSON Lines: the same rows, typed.
        let answer = get(
            &app,
            "/api/v1/projects/shoes/export?format=jsonl",
            Some(&f.ml),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.headers["content-type"], "application/x-ndjson");
        let rows = jsonl_rows(&answer.body);
        assert_eq!(rows.len(), 7);
        let machine = rows
            .iter()
            .find(|r| r["item_id"] == f.items[2].to_string())
            .unwrap();
        assert_eq!(machine["machine_audits"], 1);
        let measured = machine["machine_accuracy_lower"].as_f64().unwrap();
        assert!((measured - lower).abs() < 1e-12, "{machine}");
        assert_eq!(machine["audited"], false);
        assert_eq!(machine["labeled_by"], Value::Null);
        let alice = rows
            .iter()
            .find(|r| r["item_id"] == f.items[0].to_string())
            .unwrap();
        assert_eq!(alice["labeled_by_token"], f.alice.to_string());
        assert_eq!(alice["confidence"].as_f64().map(|c| c as f32), Some(0.6));
    })
    .await;
}

#[tokio::test]
async fn coco_has_images_categories_and_one_annotation_per_labeled_image() {
    with_app(300, |app| async move {
        let f = fixture(&app, "shoes").await;
        let coco = |query: &'static str| {
            let app = app.clone();
            let ml = f.ml.clone();
            async move {
                let answer = get(
                    &app,
                    &format!("/api/v1/projects/shoes/export?format=coco{query}"),
                    Some(&ml),
                )
                .await;
                assert_eq!(answer.status, 200, "{}", answer.body);
                assert_eq!(answer.headers["content-type"], "application/json");
                serde_json::from_str::<Value>(&answer.body).unwrap()
            }
        };
        let all = coco("").await;
        let categories = all["categories"].as_array().unwrap();
        let names: Vec<&str> = categories
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, CLASSES);
        assert_eq!(categories[0]["id"], 1);
        let images = all["images"].as_array().unwrap();
        let annotations = all["annotations"].as_array().unwrap();
        assert_eq!(images.len(), 7);
        assert_eq!(annotations.len(), 7);
        for image in images {
            assert_eq!(image["width"], 28, "{image}");
            assert!(
                image["file_name"].as_str().unwrap().ends_with(".png")
                    || image["file_name"]
                        .as_str()
                        .unwrap()
                        .starts_with("projects/"),
                "{image}"
            );
        }
        // alice's label of item 1: sandal, category 3, on that item's image.
        let image = images
            .iter()
            .find(|i| i["sieve_item_id"] == f.items[1].to_string())
            .unwrap();
        let annotation = annotations
            .iter()
            .find(|a| a["image_id"] == image["id"])
            .unwrap();
        assert_eq!(annotation["category_id"], 3);
        assert_eq!(annotation["attributes"]["label_source"], "human");
        assert_eq!(annotation["attributes"]["labeled_by"], "alice");
        assert_eq!(
            annotation["attributes"]["labeled_by_token"],
            f.alice.to_string()
        );
        assert_eq!(annotation["attributes"]["model_version"], 1);

        // Items without a label are images without annotations.
        let unlabeled = coco("&state=in_review,failed").await;
        assert_eq!(unlabeled["images"].as_array().unwrap().len(), 2);
        assert_eq!(unlabeled["annotations"], json!([]));
    })
    .await;
}

#[tokio::test]
async fn only_ml_and_admin_export_and_bad_input_names_what_is_allowed() {
    with_app(300, |app| async move {
        let f = fixture(&app, "shoes").await;
        let path = "/api/v1/projects/shoes/export";
        assert_eq!(get(&app, path, None).await.status, 401);
        for role in [Role::Reviewer, Role::Ops] {
            let token = app.token("someone", role).await;
            assert_eq!(get(&app, path, Some(&token)).await.status, 403, "{role:?}");
        }
        let admin = app.token("root", Role::Admin).await;
        assert_eq!(get(&app, path, Some(&admin)).await.status, 200);
        assert_eq!(
            get(&app, "/api/v1/projects/nope/export", Some(&f.ml))
                .await
                .status,
            404
        );

        for (query, names) in [
            ("format=xml", &["xml", "csv", "jsonl", "coco"][..]),
            ("source=robot", &["robot", "human", "machine", "import"]),
            ("state=lost", &["lost", "in_review", "auto_labeled"]),
            ("class=hat", &["hat", "sneaker", "boot", "sandal"]),
            (
                "colour=red",
                &["colour", "format", "min_confidence", "since"],
            ),
            ("min_confidence=high", &["0 to 1"]),
            ("since=yesterday", &["cursor"]),
        ] {
            let answer = get(&app, &format!("{path}?{query}"), Some(&f.ml)).await;
            assert_eq!(answer.status, 422, "{query}: {}", answer.body);
            let error: Value = serde_json::from_str(&answer.body).unwrap();
            let message = error["error"]["message"].as_str().unwrap();
            for name in names {
                assert!(message.contains(name), "{query}: {message}");
            }
        }
    })
    .await;
}

#[tokio::test]
async fn filters_and_the_incremental_cursor_pick_the_rows() {
    with_app(300, |app| async move {
        let f = fixture(&app, "shoes").await;
        let items = |query: &str| {
            let app = app.clone();
            let ml = f.ml.clone();
            let query = query.to_owned();
            async move {
                let answer = get(
                    &app,
                    &format!("/api/v1/projects/shoes/export?{query}"),
                    Some(&ml),
                )
                .await;
                assert_eq!(answer.status, 200, "{query}: {}", answer.body);
                let mut ids: Vec<Uuid> = csv_rows(&answer.body)
                    .iter()
                    .map(|r| r["item_id"].parse().unwrap())
                    .collect();
                ids.sort();
                (ids, answer.headers)
            }
        };
        let sorted = |mut ids: Vec<Uuid>| {
            ids.sort();
            ids
        };
        let it = |i: usize| f.items[i];

        assert_eq!(
            items("source=machine").await.0,
            sorted(vec![it(2), it(3), it(4)])
        );
        assert_eq!(
            items("source=human&source=import").await.0,
            sorted(vec![it(0), it(1), it(5), f.import])
        );
        assert_eq!(
            items("source=human,machine&class=sandal").await.0,
            sorted(vec![it(1), it(2), it(5)])
        );
        // Every prediction here is 0.6 sure; an import has none.
        assert_eq!(items("min_confidence=0.6").await.0.len(), 6);
        assert!(items("min_confidence=0.61").await.0.is_empty());
        // Asked for, the items in review and failed come too (unlabeled);
        // what is left out is then the labeled ones.
        let (ids, headers) = items("state=in_review&state=failed").await;
        assert_eq!(ids, sorted(vec![it(6), it(7)]));
        assert_eq!(
            headers["x-sieve-export-left-out"],
            "auto_labeled=3,human_labeled=4"
        );

        // Incremental: the labels above are an hour old; the export's
        // cursor then takes only what is labeled after it.
        sql(
            &app,
            "UPDATE labels SET created_at = now() - interval '1 hour'",
            vec![],
        )
        .await;
        let (all, headers) = items("").await;
        assert_eq!(all.len(), 7);
        let cursor = headers["x-sieve-export-cursor"]
            .to_str()
            .unwrap()
            .to_owned();
        let (none, next) = items(&format!("since={cursor}")).await;
        assert!(none.is_empty(), "{none:?}");
        assert!(next["x-sieve-export-cursor"].to_str().unwrap() >= cursor.as_str());

        let carol = app.token("carol", Role::Reviewer).await;
        review(&app, "shoes", &carol, f.tasks[6], "boot").await;
        let (new, _) = items(&format!("since={cursor}")).await;
        assert_eq!(new, vec![it(6)]);
    })
    .await;
}

/// Export `project` to `path` as the CLI does.
async fn export_to(app: &App, project: &Project, format: Format, path: &Path) -> export::Summary {
    let request = Request {
        format,
        filters: export::Filters::default(),
    };
    let export = Export::begin(app.db(), project, request).await.unwrap();
    let options = output::Options {
        terminal: false,
        cancel: CancellationToken::new(),
    };
    output::write(export, &Destination::File(path.to_owned()), options)
        .await
        .unwrap()
}

async fn new_project(app: &App, name: &str) -> Project {
    let classes: Vec<String> = CLASSES.iter().map(|c| (*c).to_owned()).collect();
    projects::create(
        app.db(),
        &ProjectName::parse(name).unwrap(),
        &ClassNames::parse(&classes).unwrap(),
        &Policy::default(),
        ModelArch::SmallCnn,
        sieve_shared::kind::TaskKind::Classification,
    )
    .await
    .unwrap()
}

/// (content hash → (class name, label source)) of `project`'s items.
async fn labeled(app: &App, project: &Project) -> HashMap<String, (String, String)> {
    let items: HashMap<Uuid, item::Model> = item::Entity::find()
        .all(app.db())
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.project_id == project.id.as_uuid())
        .map(|i| (i.id, i))
        .collect();
    let mut out = HashMap::new();
    let mut labels = label::Entity::find().all(app.db()).await.unwrap();
    labels.sort_by_key(|l| l.created_at);
    for l in labels {
        if let Some(item) = items.get(&l.item_id) {
            let class = project.class_names[l.class_index.unwrap() as usize].clone();
            let source = format!("{:?}", l.source).to_lowercase();
            let current = out
                .entry(item.content_hash.clone())
                .or_insert((class.clone(), source.clone()));
            // The newest human or import label wins over a machine one.
            if source != "machine" || current.1 == "machine" {
                *current = (class, source);
            }
        }
    }
    out
}

#[tokio::test]
async fn an_export_ingested_into_a_new_project_recreates_its_labels_once() {
    with_app(300, |app| async move {
        let f = fixture(&app, "shoes").await;
        let original = labeled(&app, &f.project).await;
        let dir = tempfile::tempdir().unwrap();
        for format in [Format::Csv, Format::Jsonl] {
            let path = dir.path().join(format!("shoes.{format}"));
            let summary = export_to(&app, &f.project, format, &path).await;
            assert_eq!(summary.rows, 7);

            let copy = new_project(&app, &format!("shoes-{format}")).await;
            let first = ingest::ingest_manifest(&app.ctx, &copy, &path, None, false)
                .await
                .unwrap();
            assert!(!first.has_failures(), "{format}: {:?}", first.failures);
            assert_eq!(first.new_items, 7, "{format}: {first:?}");
            assert_eq!(first.imported_labels, 7, "{format}: {first:?}");

            // The same images, each with its class, all as import labels.
            let copied = labeled(&app, &copy).await;
            assert_eq!(copied.len(), 7);
            for (hash, (class, source)) in &copied {
                assert_eq!(source, "import", "{format}");
                assert_eq!(&original[hash].0, class, "{format}: {hash}");
            }
            // Images of the first project's area are copied into the copy's
            // own; the imported one, outside sieve's area, is used in place.
            for i in item::Entity::find().all(app.db()).await.unwrap() {
                if i.project_id == copy.id.as_uuid() {
                    if i.object_key.starts_with("incoming/") {
                        assert_eq!(i.object_key, "incoming/shoes/imported.png");
                    } else {
                        assert!(
                            i.object_key.starts_with(&format!("projects/{}/", copy.id)),
                            "{}",
                            i.object_key
                        );
                    }
                    assert!(app.ctx.store.get(&i.object_key).await.is_ok());
                }
            }

            let again = ingest::ingest_manifest(&app.ctx, &copy, &path, None, false)
                .await
                .unwrap();
            assert_eq!(again.new_items, 0, "{format}: {again:?}");
            assert_eq!(again.imported_labels, 0, "{format}: {again:?}");
            assert_eq!(again.duplicates, 7, "{format}: {again:?}");
            assert_eq!(labeled(&app, &copy).await, copied);
        }
    })
    .await;
}

#[tokio::test]
async fn an_empty_project_exports_a_valid_empty_file() {
    with_app(300, |app| async move {
        let project = new_project(&app, "empty").await;
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("empty.csv");
        let summary = export_to(&app, &project, Format::Csv, &csv).await;
        assert_eq!(summary.rows, 0);
        assert_eq!(
            std::fs::read_to_string(&csv).unwrap(),
            format!("{}\n", export::write::COLUMNS.join(","))
        );
        let said = summary.describe("empty.csv").join("\n");
        assert!(said.contains("nothing labeled in empty"), "{said}");
        let jsonl = dir.path().join("empty.jsonl");
        export_to(&app, &project, Format::Jsonl, &jsonl).await;
        assert_eq!(std::fs::read(&jsonl).unwrap(), b"");
        let coco = dir.path().join("empty.json");
        export_to(&app, &project, Format::Coco, &coco).await;
        let coco: Value = serde_json::from_slice(&std::fs::read(&coco).unwrap()).unwrap();
        assert_eq!(coco["images"], json!([]));
        assert_eq!(coco["annotations"], json!([]));
        assert_eq!(coco["categories"].as_array().unwrap().len(), 3);
    })
    .await;
}

#[tokio::test]
async fn an_interrupted_export_leaves_nothing_at_out() {
    with_app(300, |app| async move {
        let f = fixture(&app, "shoes").await;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("shoes.csv");
        std::fs::write(&out, "an older export\n").unwrap();
        let request = Request {
            format: Format::Csv,
            filters: export::Filters::default(),
        };
        let export = Export::begin(app.db(), &f.project, request).await.unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let options = output::Options {
            terminal: false,
            cancel,
        };
        let err = output::write(export, &Destination::File(out.clone()), options)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
        // The file that was there is untouched, and no partial file is left.
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "an older export\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("shoes.csv")]);
    })
    .await;
}
