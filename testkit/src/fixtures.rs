//! Rows and messages built by hand, as the real services would have made
//! them: items, stub model versions, scored prelabel results, PNGs.

use std::io::Cursor;
use std::path::Path;

use chrono::Utc;
use sea_orm::{ActiveValue::Set, DatabaseConnection, EntityTrait};
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::model_version::{self, VersionStatus};
use sieve_scheduler::entities::project as project_entity;
use sieve_scheduler::projects::{self, Project};
use sieve_shared::ids::{ItemId, JobId, ModelVersionId, ProjectId};
use sieve_shared::messages::{PredictionOutput, PrelabelOutcome, PrelabelResult, SCHEMA_VERSION};
use sieve_shared::scores::Scores;
use uuid::Uuid;

/// Insert item number `n` of `project` in `state` (its image is not stored:
/// for tests of the database side only).
pub async fn insert_item(
    db: &DatabaseConnection,
    project: &Project,
    n: usize,
    state: ItemState,
) -> Uuid {
    let id = Uuid::now_v7();
    let now = Utc::now().fixed_offset();
    item::Entity::insert(item::ActiveModel {
        id: Set(id),
        project_id: Set(project.id.as_uuid()),
        object_key: Set(format!("k/{n}")),
        source: Set(format!("img-{n}.png")),
        content_hash: Set(format!("{n:064x}")),
        size_bytes: Set(1),
        width: Set(Some(1)),
        height: Set(Some(1)),
        state: Set(state),
        attempts: Set(0),
        last_error: Set(None),
        dispatched_at: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    })
    .exec_without_returning(db)
    .await
    .unwrap();
    id
}

/// A model version row with no model behind it: nothing loads it, so only
/// tests where no worker runs (or the row is never dispatched) use one.
#[derive(Clone, Debug)]
pub struct StubVersion {
    pub number: i32,
    pub parent: Option<Uuid>,
    pub status: VersionStatus,
    pub artifact_key: String,
    pub checksum: String,
    /// `HoldoutMetrics` as JSON; a version with none counts as untrained.
    pub metrics: Option<serde_json::Value>,
}

impl StubVersion {
    /// Version 1, active, artifact `m`, checksum `c`, no metrics.
    pub fn active() -> Self {
        Self {
            number: 1,
            parent: None,
            status: VersionStatus::Active,
            artifact_key: "m".into(),
            checksum: "c".into(),
            metrics: None,
        }
    }

    /// Insert it for `project`; its id. An active one gets `activated_at`
    /// (the project's pointer is [`activate_stub`]'s business).
    pub async fn insert(self, db: &DatabaseConnection, project: Uuid) -> Uuid {
        let id = Uuid::now_v7();
        let now = Utc::now().fixed_offset();
        model_version::Entity::insert(model_version::ActiveModel {
            id: Set(id),
            project_id: Set(project),
            version: Set(self.number),
            parent_id: Set(self.parent),
            training_run_id: Set(None),
            artifact_key: Set(Some(self.artifact_key)),
            checksum: Set(Some(self.checksum)),
            architecture: Set(None),
            metrics: Set(self.metrics),
            calibration: Set(None),
            status: Set(self.status),
            status_reason: Set(None),
            created_at: Set(now),
            activated_at: Set((self.status == VersionStatus::Active).then_some(now)),
        })
        .exec_without_returning(db)
        .await
        .unwrap();
        id
    }
}

/// Give `project` an active stub version 1 (with `metrics`, if any) and
/// point the project at it: the project as read back, and the version's id.
pub async fn activate_stub(
    db: &DatabaseConnection,
    project: &Project,
    metrics: Option<serde_json::Value>,
) -> (Project, Uuid) {
    let version = StubVersion {
        metrics,
        ..StubVersion::active()
    }
    .insert(db, project.id.as_uuid())
    .await;
    project_entity::Entity::update(project_entity::ActiveModel {
        id: Set(project.id.as_uuid()),
        active_model_version_id: Set(Some(version)),
        ..Default::default()
    })
    .exec(db)
    .await
    .unwrap();
    (projects::get(db, &project.name).await.unwrap(), version)
}

/// A scored prelabel result as a worker sends it. Defaults: every member of
/// a committee of three votes the top class, margin and entropy 0.5, no
/// disagreement, no embedding.
#[derive(Clone, Debug)]
pub struct Scored {
    pub probabilities: Vec<f32>,
    pub member_votes: Vec<u32>,
    pub scores: Scores,
}

impl Scored {
    /// `class` at `confidence`, the rest shared evenly by the other
    /// `classes - 1` classes.
    pub fn class(class: u32, confidence: f32, classes: usize) -> Self {
        let mut probabilities = vec![(1.0 - confidence) / (classes - 1) as f32; classes];
        probabilities[class as usize] = confidence;
        Self::probabilities(probabilities, class)
    }

    /// These `probabilities`, with `class` on top.
    pub fn probabilities(probabilities: Vec<f32>, class: u32) -> Self {
        let confidence = probabilities[class as usize];
        Self {
            probabilities,
            member_votes: vec![class, class, class],
            scores: Scores {
                top_class: class,
                confidence,
                margin: 0.5,
                entropy: 0.5,
                disagreement: 0.0,
                mutual_information: 0.0,
            },
        }
    }

    pub fn margin(mut self, margin: f32) -> Self {
        self.scores.margin = margin;
        self
    }

    pub fn entropy(mut self, entropy: f32) -> Self {
        self.scores.entropy = entropy;
        self
    }

    pub fn disagreement(mut self, disagreement: f32) -> Self {
        self.scores.disagreement = disagreement;
        self
    }

    /// The result for `item` by `version`, under a new job id.
    pub fn result(self, project: ProjectId, version: Uuid, item: Uuid) -> PrelabelResult {
        PrelabelResult {
            schema: SCHEMA_VERSION,
            job_id: JobId::new(),
            project_id: project,
            item_id: ItemId::from_uuid(item),
            model_version_id: ModelVersionId::from_uuid(version),
            worker_id: "test".into(),
            outcome: PrelabelOutcome::Scored(PredictionOutput {
                probabilities: self.probabilities,
                member_votes: self.member_votes,
                scores: self.scores,
                embedding: None,
                detections: None,
            }),
        }
    }
}

/// A small grey 28×28 PNG, different for each `n`.
pub fn png(n: usize) -> Vec<u8> {
    let image = image::GrayImage::from_fn(28, 28, |x, y| {
        image::Luma([((x * 9 + y * 5) as usize + n * 37) as u8])
    });
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    bytes.into_inner()
}

/// `count` distinct 4×4 PNGs in `dir` (`N.png`), starting at `first`.
pub fn pngs(dir: &Path, first: u32, count: u32) {
    for n in first..first + count {
        let bytes = n.to_le_bytes();
        let img = image::GrayImage::from_fn(4, 4, |x, y| {
            image::Luma([if y == 0 { bytes[x as usize] } else { 7 }])
        });
        img.save(dir.join(format!("{n}.png"))).unwrap();
    }
}
