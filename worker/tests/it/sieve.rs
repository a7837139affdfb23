//! Workers beside the kit's scheduler: a whole sieve in one process (a
//! `sieve_testkit::TestApp` and workers of chosen capabilities, on the same
//! sandbox), Fashion-MNIST projects and labels, and the exact accounting
//! the fault tests end with. The worker's part of the test harness: the kit
//! cannot hold it, as it must not depend on burn.

#![allow(dead_code)] // the restarts binary uses a part of it

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use sieve_scheduler::context::Context;
use sieve_scheduler::training;
use sieve_shared::Settings;
use sieve_shared::messages::ModelArch;
use sieve_testkit::{TestApp, eventually};
use sieve_worker::context::Capability;
use sieve_worker::service;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The worker settings every test here starts from (on top of the kit's
/// sandbox): small, quick batches and beats, a short drain.
pub fn worker_settings(s: &mut Settings) {
    s.worker.batch_size = 16;
    s.worker.batch_timeout_ms = 20;
    s.worker.heartbeat_seconds = 1;
    s.worker.drain_seconds = 20;
    // Tests label a handful of items; they opt into the per-class minimum.
    s.training.min_labels_per_class = 0;
    // Tests run in worker/; ops/fetch-weights.sh (run by ops/test.sh) puts them here.
    s.worker.mobilenet_weights =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/weights/mobilenet_v2-b0353104.pth");
    s.worker.face_weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/weights/mtcnn");
}

pub struct TestSieve {
    /// What workers started by [`TestSieve::spawn_worker`] run with; a test
    /// may change it between spawns.
    pub settings: Settings,
    pub ctx: Context,
    pub api: String,
    pub http: reqwest::Client,
    /// Where each worker started here serves `/healthz` and `/metrics`.
    pub worker_addrs: Vec<SocketAddr>,
    workers: Vec<JoinHandle<anyhow::Result<()>>>,
    // Last: stops the scheduler and removes the sandbox when dropped.
    app: TestApp,
}

impl TestSieve {
    /// The next review task of `project` for the reviewer `token`, as the API answers it;
    /// `None` when the queue has nothing for them.
    pub async fn claim_next(&self, token: &str, project: &str) -> Option<serde_json::Value> {
        let body = self
            .http
            .post(format!(
                "{}/api/v1/projects/{project}/review/next",
                self.api
            ))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .text()
            .await
            .unwrap();
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .filter(|task| task.get("task_id").is_some())
    }

    /// Submit `label` (`{"boxes": ...}` or `{"class": ...}`) for a claimed `task`, under its
    /// fencing token; panics unless the API accepts it.
    pub async fn submit(
        &self,
        token: &str,
        task: &serde_json::Value,
        mut label: serde_json::Value,
    ) {
        label["fencing_token"] = task["fencing_token"].clone();
        self.http
            .post(format!(
                "{}/api/v1/review/{}/submit",
                self.api,
                task["task_id"].as_str().unwrap()
            ))
            .bearer_auth(token)
            .json(&label)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
    }

    /// The scheduler's `/metrics` (Prometheus text), scraped with an `ops` token.
    pub async fn scheduler_metrics(&self) -> String {
        let scraper = sieve_scheduler::auth::create_token(
            &self.ctx.db,
            &format!("scraper-{}", uuid::Uuid::now_v7()),
            sieve_scheduler::entities::api_token::Role::Ops,
        )
        .await
        .unwrap();
        self.http
            .get(format!("{}/metrics", self.api))
            .bearer_auth(scraper)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A scheduler on a fresh sandbox and one worker.
    pub async fn start() -> Self {
        Self::start_with(vec![Capability::Prelabel, Capability::Train]).await
    }

    /// Like [`TestSieve::start`], with a worker of the given capabilities.
    pub async fn start_with(capabilities: Vec<Capability>) -> Self {
        Self::start_configured(capabilities, |_| {}).await
    }

    /// Like [`TestSieve::start_with`], the settings changed by `configure`
    /// (after [`worker_settings`]) for the scheduler and the workers.
    pub async fn start_configured(
        capabilities: Vec<Capability>,
        configure: impl FnOnce(&mut Settings),
    ) -> Self {
        let app = TestApp::start(|s| {
            worker_settings(s);
            configure(s);
        })
        .await;
        let mut sieve = Self {
            settings: app.settings.clone(),
            ctx: app.ctx.clone(),
            api: app.base.clone(),
            http: app.http.clone(),
            worker_addrs: Vec::new(),
            workers: Vec::new(),
            app,
        };
        sieve.spawn_worker(capabilities).await;
        sieve
    }

    pub async fn spawn_worker(&mut self, capabilities: Vec<Capability>) {
        let listener = TcpListener::bind(self.settings.http.worker_bind)
            .await
            .unwrap();
        self.worker_addrs.push(listener.local_addr().unwrap());
        let stop = self.app.stop_token();
        self.workers.push(tokio::spawn(service::run(
            self.settings.clone(),
            capabilities,
            listener,
            async move { stop.cancelled().await },
        )));
    }

    /// Stop the workers and the scheduler (draining), assert each ended
    /// without an error, then remove the sandbox.
    pub async fn teardown(self) {
        self.app.stop_token().cancel();
        for worker in self.workers {
            worker.await.unwrap().unwrap();
        }
        self.app.shutdown().await;
    }
}

/// A Fashion-MNIST project with `policy`, once its first (untrained) model
/// is active.
pub async fn fashion_project(
    sieve: &TestSieve,
    name: &str,
    policy: sieve_scheduler::policy::Policy,
) -> sieve_scheduler::projects::Project {
    fashion_project_on(sieve, name, policy, ModelArch::SmallCnn).await
}

/// [`fashion_project`] on a given architecture.
pub async fn fashion_project_on(
    sieve: &TestSieve,
    name: &str,
    policy: sieve_scheduler::policy::Policy,
    arch: ModelArch,
) -> sieve_scheduler::projects::Project {
    use sieve_scheduler::projects::{self, ClassNames, ProjectName};
    use sieve_tools::fashion_mnist;
    let classes: Vec<String> = fashion_mnist::CLASSES
        .iter()
        .map(|c| c.to_string())
        .collect();
    training::create_project(
        &sieve.ctx,
        &ProjectName::parse(name).unwrap(),
        &ClassNames::parse(&classes).unwrap(),
        &policy,
        arch,
        "test",
    )
    .await
    .unwrap();
    eventually("the first model", Duration::from_secs(120), || async {
        projects::get(&sieve.ctx.db, name)
            .await
            .ok()
            .filter(|p| p.active_model_version_id.is_some())
    })
    .await
}

/// The first `n` images of a Fashion-MNIST split as PNG files in a fresh
/// directory, with the data set (for the ground truth).
pub fn fashion_images(
    split: sieve_tools::fashion_mnist::Split,
    n: usize,
) -> (tempfile::TempDir, sieve_tools::fashion_mnist::Dataset) {
    use sieve_tools::fashion_mnist;
    let dir = tempfile::tempdir().unwrap();
    let data = fashion_mnist::load(Path::new(fashion_mnist::DEFAULT_DIR), split, Some(n)).expect(
        "Fashion-MNIST is installed by ops/install-deps.sh (apt-get install dataset-fashion-mnist)",
    );
    fashion_mnist::export_png(&data, split, n, dir.path()).unwrap();
    (dir, data)
}

/// Ingest the first `n` Fashion-MNIST training images into `project` with
/// their true labels as imports (a CSV manifest): training data without
/// reviewers. Returns how many new items it made.
#[allow(dead_code)] // not every test binary trains
pub async fn ingest_labeled(
    sieve: &TestSieve,
    project: &sieve_scheduler::projects::Project,
    n: usize,
) -> u64 {
    use sieve_tools::fashion_mnist::{self, Split};
    let (dir, data) = fashion_images(Split::Train, n);
    let mut csv = String::from("path,label\n");
    for i in 0..n {
        csv.push_str(&format!(
            "{},{}\n",
            fashion_mnist::file_name(Split::Train, i),
            fashion_mnist::CLASSES[data.labels[i] as usize]
        ));
    }
    let manifest = dir.path().join("labels.csv");
    std::fs::write(&manifest, csv).unwrap();
    sieve_scheduler::ingest::ingest_manifest(&sieve.ctx, project, &manifest, None, false)
        .await
        .unwrap()
        .new_items
}

/// Label every item of `project` with its true class as a person would
/// (a `human` label per item, written directly); `dir` holds the images
/// [`fashion_images`] exported for `data`. Returns the items.
#[allow(dead_code)] // not every test binary trains
pub async fn label_with_truth(
    sieve: &TestSieve,
    project: &sieve_scheduler::projects::Project,
    dir: &Path,
    data: &sieve_tools::fashion_mnist::Dataset,
) -> Vec<sieve_scheduler::entities::item::Model> {
    use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};
    use sieve_scheduler::entities::item;
    use sieve_scheduler::entities::label::{self, LabelSource};
    use sieve_tools::fashion_mnist::{self, Split};
    let truth: std::collections::HashMap<String, i32> = (0..data.labels.len())
        .map(|i| {
            let bytes = std::fs::read(dir.join(fashion_mnist::file_name(Split::Train, i)));
            (
                sieve_shared::store::sha256_hex(&bytes.unwrap()),
                i32::from(data.labels[i]),
            )
        })
        .collect();
    let db = &sieve.ctx.db;
    let items = item::Entity::find()
        .filter(item::Column::ProjectId.eq(project.id.as_uuid()))
        .all(db)
        .await
        .unwrap();
    let now = chrono::Utc::now().fixed_offset();
    for item in &items {
        label::Entity::insert(label::ActiveModel {
            id: Set(uuid::Uuid::now_v7()),
            item_id: Set(item.id),
            class_index: Set(Some(truth[&item.content_hash])),
            boxes: Set(None),
            source: Set(LabelSource::Human),
            reviewer: Set(Some("test".into())),
            prediction_id: Set(None),
            model_version_id: Set(None),
            review_task_id: Set(None),
            created_at: Set(now),
        })
        .exec_without_returning(db)
        .await
        .unwrap();
    }
    items
}

/// Model version `id` as stored.
#[allow(dead_code)] // not every test binary trains
pub async fn version(
    sieve: &TestSieve,
    id: uuid::Uuid,
) -> sieve_scheduler::entities::model_version::Model {
    use sea_orm::EntityTrait;
    sieve_scheduler::entities::model_version::Entity::find_by_id(id)
        .one(&sieve.ctx.db)
        .await
        .unwrap()
        .unwrap()
}

/// Model version `id` once the scheduler has decided on its promotion:
/// active, or a candidate with the reason it was not promoted.
#[allow(dead_code)] // not every test binary trains
pub async fn decided(
    sieve: &TestSieve,
    id: uuid::Uuid,
    timeout: Duration,
) -> sieve_scheduler::entities::model_version::Model {
    use sieve_scheduler::entities::model_version::VersionStatus;
    eventually("the promotion decision", timeout, || async {
        let v = version(sieve, id).await;
        (v.status == VersionStatus::Active
            || (v.status == VersionStatus::Candidate && v.status_reason.is_some()))
        .then_some(v)
    })
    .await
}

/// Wait for training run `run` to end and assert it succeeded.
#[allow(dead_code)] // not every test binary trains
pub async fn succeeded(
    sieve: &TestSieve,
    run: uuid::Uuid,
    timeout: Duration,
) -> sieve_scheduler::entities::training_run::Model {
    use sea_orm::EntityTrait;
    use sieve_scheduler::entities::training_run::{self, RunState};
    let finished = eventually("the training run to finish", timeout, || async {
        let r = training_run::Entity::find_by_id(run)
            .one(&sieve.ctx.db)
            .await
            .ok()??;
        matches!(
            r.state,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        )
        .then_some(r)
    })
    .await;
    assert_eq!(
        finished.state,
        RunState::Succeeded,
        "run ended {:?}: {:?}",
        finished.state,
        finished.error
    );
    finished
}

/// Exact accounting of one project after a fault, as the reliability tests
/// print it.
#[derive(Debug, PartialEq, Eq)]
pub struct Accounting {
    pub items: u64,
    pub queued: u64,
    pub in_review: u64,
    pub auto_labeled: u64,
    pub human_labeled: u64,
    pub failed: u64,
    pub predictions: u64,
    /// Predictions per (item, model version) beyond the first: always 0.
    pub duplicate_predictions: u64,
    /// Items with more than one open or claimed review task: always 0.
    pub duplicate_open_tasks: u64,
    pub labels: u64,
}

/// Count a project's items by state, predictions per (item, version), open
/// tasks per item and labels; assert the invariants every fault test needs
/// (every image is exactly one item, every item in exactly one state, no
/// duplicated prediction or open task, every failed item carries its
/// reason) and print the counts.
pub async fn account(
    db: &sea_orm::DatabaseConnection,
    project: sieve_shared::ids::ProjectId,
    images: u64,
) -> Accounting {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    use sieve_scheduler::entities::item::{self, ItemState};
    use sieve_scheduler::entities::review_task::{self, TaskState};
    use sieve_scheduler::entities::{label, prediction};
    use std::collections::{HashMap, HashSet};

    let items = item::Entity::find()
        .filter(item::Column::ProjectId.eq(project.as_uuid()))
        .all(db)
        .await
        .unwrap();
    let ids: HashSet<uuid::Uuid> = items.iter().map(|i| i.id).collect();
    assert_eq!(ids.len(), items.len());
    let hashes: HashSet<&str> = items.iter().map(|i| i.content_hash.as_str()).collect();
    assert_eq!(hashes.len(), items.len(), "one item per image content");
    let by = |s: ItemState| items.iter().filter(|i| i.state == s).count() as u64;
    for failed in items.iter().filter(|i| i.state == ItemState::Failed) {
        assert!(
            failed.last_error.as_deref().is_some_and(|e| !e.is_empty()),
            "failed item {} has no reason",
            failed.source
        );
    }
    let predictions: Vec<_> = prediction::Entity::find()
        .filter(prediction::Column::ItemId.is_in(ids.iter().copied()))
        .all(db)
        .await
        .unwrap();
    let mut per_key: HashMap<(uuid::Uuid, uuid::Uuid), u64> = HashMap::new();
    for p in &predictions {
        *per_key.entry((p.item_id, p.model_version_id)).or_default() += 1;
    }
    let duplicate_predictions = per_key.values().map(|n| n - 1).sum();
    let tasks = review_task::Entity::find()
        .filter(review_task::Column::ProjectId.eq(project.as_uuid()))
        .filter(review_task::Column::State.is_in([TaskState::Open, TaskState::Claimed]))
        .all(db)
        .await
        .unwrap();
    let mut open: HashMap<uuid::Uuid, u64> = HashMap::new();
    for t in &tasks {
        *open.entry(t.item_id).or_default() += 1;
    }
    let duplicate_open_tasks = open.values().filter(|n| **n > 1).count() as u64;
    for i in items.iter().filter(|i| i.state == ItemState::InReview) {
        assert_eq!(open.get(&i.id), Some(&1), "an item in review has its task");
    }
    let labels = label::Entity::find()
        .filter(label::Column::ItemId.is_in(ids.iter().copied()))
        .all(db)
        .await
        .unwrap();
    let accounting = Accounting {
        items: items.len() as u64,
        queued: by(ItemState::Queued),
        in_review: by(ItemState::InReview),
        auto_labeled: by(ItemState::AutoLabeled),
        human_labeled: by(ItemState::HumanLabeled),
        failed: by(ItemState::Failed),
        predictions: predictions.len() as u64,
        duplicate_predictions,
        duplicate_open_tasks,
        labels: labels.len() as u64,
    };
    println!("accounting: {accounting:?}");
    assert_eq!(accounting.items, images, "every image is exactly one item");
    assert_eq!(
        accounting.queued
            + accounting.in_review
            + accounting.auto_labeled
            + accounting.human_labeled
            + accounting.failed,
        accounting.items,
        "every item in exactly one state"
    );
    assert_eq!(accounting.duplicate_predictions, 0);
    assert_eq!(accounting.duplicate_open_tasks, 0);
    accounting
}

/// Wait until none of the project's items is `queued` any more.
pub async fn settled(
    db: &sea_orm::DatabaseConnection,
    project: sieve_shared::ids::ProjectId,
    timeout: Duration,
) {
    use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
    use sieve_scheduler::entities::item::{self, ItemState};
    eventually("every item out of `queued`", timeout, || async {
        let n = item::Entity::find()
            .filter(item::Column::ProjectId.eq(project.as_uuid()))
            .filter(item::Column::State.eq(ItemState::Queued))
            .count(db)
            .await
            .ok()?;
        (n == 0).then_some(())
    })
    .await;
}

/// A well-formed PNG whose header claims `side` x `side` grey pixels, with
/// one tiny data chunk: decoding it allocates `side`² bytes first.
pub fn bomb_png(side: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc_input = kind.to_vec();
        crc_input.extend_from_slice(data);
        out.extend_from_slice(&crc_input);
        out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit grayscale
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFF_u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
