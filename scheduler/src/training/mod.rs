//! Retraining: snapshots out, training events in.
//!
//! A retrain writes the labeled set as an immutable snapshot to the object
//! store, records the run and the version it will produce (both allocated
//! up front, so a duplicated event cannot register twice), and publishes a
//! `TrainJob`. A partial unique index allows one queued or running run per
//! project. Workers report on `sieve.train.events`; a completed run becomes a
//! `candidate` version, promoted when it is not worse than the champion.

pub mod auto_retrain;
pub mod evaluation;
pub mod gate;
pub mod registry;
pub mod retention;
pub mod watchdog;

use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use chrono::Utc;
use lapin::Connection;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DbErr, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    SqlErr, Statement, TransactionTrait,
};
use serde::{Deserialize, Serialize};
use sieve_shared::broker;
use sieve_shared::embedding_table::TableWriter;
use sieve_shared::ids::{ItemId, ModelVersionId, TrainingRunId};
use sieve_shared::messages::{
    ControlCommand, ControlMessage, EmbeddingTable, ModelArch, SCHEMA_VERSION, Snapshot,
    SnapshotExample, Split, TrainEvent, TrainEventKind, TrainJob, TrainMode, TrainParams, decode,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::box_settings::check_tile_size;
use crate::context::Context;
use crate::dispatch;
use crate::entities::model_version::{self, VersionStatus};
use crate::entities::project;
use crate::entities::training_run::{self, RunState};
use crate::error::{AppError, AppResult};
use crate::kind::{TaskKind, detection};
use crate::policy::Policy;
use crate::projects::{self, ClassNames, Project, ProjectName};
use crate::routing::calibration;

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct RunSummary {
    pub run_id: Uuid,
    pub version: i32,
    /// Human (and imported) labels in the snapshot.
    pub labels: usize,
    pub holdout: usize,
    /// Machine labels it trains on as well (a run that asked for them).
    pub machine_labels: usize,
}

#[derive(FromQueryResult)]
struct LabeledItem {
    item_id: Uuid,
    /// A classification label's class; NULL for a detection label.
    class_index: Option<i32>,
    /// A detection label's boxes (`labels.boxes`); NULL for a class.
    boxes: Option<serde_json::Value>,
    object_key: String,
    content_hash: String,
    /// A person labeled the item for a task picked at random: the seed set
    /// or the audit sample.
    random: bool,
    /// One of those tasks was the audit sample's.
    audit_sample: bool,
}

impl LabeledItem {
    fn into_example(self) -> SnapshotExample {
        let random = self.random;
        // The audit sample is never trained on: it is what calibration and
        // the measured accuracy of machine labels rest on. Everything else
        // splits by content hash.
        let split = if self.audit_sample {
            Split::Holdout
        } else {
            Split::of_hash(&self.content_hash)
        };
        SnapshotExample {
            item_id: ItemId::from_uuid(self.item_id),
            object_key: self.object_key,
            class_index: self.class_index.unwrap_or(0) as u32,
            split,
            random,
            machine: false,
            embedding_row: None,
            embedding: None,
            // Every stored list passed `boxes::check`; one that does not
            // read back is left out of the example rather than guessed at.
            boxes: self.boxes.as_ref().and_then(detection::from_json),
        }
    }
}

/// An embedding as stored with a prediction (a JSON array of numbers), or
/// `None` with a warning for anything else: the worker then computes the
/// embedding from the image, so a bad one costs time, never the run.
fn decode_embedding(item_id: Uuid, json: &str) -> Option<Vec<f32>> {
    match serde_json::from_str::<Vec<f32>>(json) {
        Ok(embedding) => Some(embedding),
        Err(err) => {
            tracing::warn!(item = %item_id, error = %err, "stored embedding is not an array of numbers; leaving it out of the snapshot");
            None
        }
    }
}

/// The newest human (or imported) label of every item in the project.
/// Machine labels never enter training data.
///
/// Which items were labeled for a random pick (seed, audit, calibration
/// sample) comes from one grouped join over the project's tasks, not from a
/// subquery per label: when a project grows faster than PostgreSQL's
/// statistics, the planner turned those subqueries into a scan of every
/// review task per label — six minutes for 13,000 labels in the demo.
const LABELED_ITEMS: &str = r#"
    WITH random_picks AS (
        SELECT l2.item_id, bool_or(t.reason IN ('audit', 'sample')) AS audit_sample
        FROM review_tasks t JOIN labels l2 ON l2.review_task_id = t.id
        WHERE t.project_id = $1 AND t.reason IN ('seed', 'audit', 'sample')
        GROUP BY l2.item_id
    )
    SELECT DISTINCT ON (l.item_id) l.item_id, l.class_index, l.boxes, i.object_key,
           i.content_hash, r.item_id IS NOT NULL AS random,
           COALESCE(r.audit_sample, false) AS audit_sample
    FROM labels l JOIN items i ON i.id = l.item_id
    LEFT JOIN random_picks r ON r.item_id = l.item_id
    WHERE i.project_id = $1 AND l.source IN ('human', 'import')
    ORDER BY l.item_id, l.created_at DESC
"#;

/// For a run on a frozen backbone, each of a chunk of items' embedding
/// from its newest prediction with one, by a version of the same backbone
/// at the same input size (`$2`: `{"arch", "input_size"}`, matched by
/// containment in the version's architecture JSON, and `$3`: the
/// backbone's weights, the architecture's `backbone` field, NULL for the
/// ImageNet import as it came), in the order of the item ids in `$1`
/// (comma-separated text; an item without one gets NULL). Any version that
/// carries the same backbone weights embeds an image as the heads will see
/// it; versions of another architecture or input size, or whose backbone a
/// full-mode run fine-tuned differently, are passed over. The lookup per
/// item runs on the `(item_id, model_version_id)` unique index of
/// `predictions`.
const EMBEDDINGS_OF: &str = r#"
    SELECT e.embedding
    FROM unnest(string_to_array($1, ',')::uuid[]) WITH ORDINALITY AS u(item_id, n)
    LEFT JOIN LATERAL (
        SELECT p.embedding::text AS embedding
        FROM predictions p JOIN model_versions mv ON mv.id = p.model_version_id
        WHERE p.item_id = u.item_id
          AND p.embedding IS NOT NULL
          AND mv.architecture @> $2
          AND (mv.architecture ->> 'backbone') IS NOT DISTINCT FROM $3
        ORDER BY p.created_at DESC
        LIMIT 1
    ) e ON true
    ORDER BY u.n
"#;

/// The backbone a heads-mode run trains on, as [`EMBEDDINGS_OF`] matches
/// it: the base version's when the worker will start from it (same
/// architecture and input size), otherwise the ImageNet import.
struct Backbone {
    /// `{"arch", "input_size"}`.
    shape: serde_json::Value,
    /// The architecture's `backbone` field: which fine-tuning run's weights.
    weights: Option<String>,
}

impl Backbone {
    fn of_base(base: Option<&model_version::Model>, params: &TrainParams) -> Self {
        let shape = serde_json::json!({
            "arch": params.arch.as_str(),
            "input_size": params.input_size(),
        });
        let weights = base
            .and_then(|v| v.architecture.as_ref())
            .filter(|arch| arch.get("arch") == shape.get("arch"))
            .filter(|arch| arch.get("input_size") == shape.get("input_size"))
            .and_then(|arch| arch.get("backbone")?.as_str().map(str::to_owned));
        Self { shape, weights }
    }
}

/// Items whose embeddings one query fetches: about 13 KB of JSON each, so a
/// chunk holds a few MB however many labels there are.
const EMBEDDING_CHUNK: usize = 500;

/// One row of [`EMBEDDINGS_OF`].
#[derive(FromQueryResult)]
struct StoredEmbedding {
    embedding: Option<String>,
}

/// The examples `query` ([`LABELED_ITEMS`] or [`MACHINE_LABELED_ITEMS`])
/// finds in `project`.
async fn examples(
    ctx: &Context,
    project: &Project,
    query: &str,
) -> anyhow::Result<Vec<SnapshotExample>> {
    let rows = LabeledItem::find_by_statement(Statement::from_sql_and_values(
        ctx.db.get_database_backend(),
        query,
        [project.id.as_uuid().into()],
    ))
    .all(&ctx.db)
    .await?;
    Ok(rows.into_iter().map(LabeledItem::into_example).collect())
}

/// The snapshot's examples: every human or imported label's item, the
/// holdout capped as `training.holdout_random_checks` says.
async fn labeled_examples(
    ctx: &Context,
    project: &Project,
) -> anyhow::Result<Vec<SnapshotExample>> {
    let mut examples = examples(ctx, project, LABELED_ITEMS).await?;
    let enough = ctx.settings.training.holdout_random_checks as usize;
    let moved = cap_holdout(&mut examples, enough);
    if moved > 0 {
        tracing::debug!(project = %project.name, moved, enough, "the holdout has its random checks; labels picked for doubt train");
    }
    Ok(examples)
}

/// Once the holdout holds `enough` random checks, the labels picked for the
/// model's doubt that the content hash put there train instead; returns how
/// many moved. Random checks only accumulate, so an item only ever moves
/// from holdout to training, never back: a candidate's holdout holds
/// nothing its champion trained on, and comparing them there stays fair.
/// (Undoing random checks below `enough` would move items back; a champion
/// measured on them then looks a little better than it is, which errs
/// towards keeping it.)
fn cap_holdout(examples: &mut [SnapshotExample], enough: usize) -> usize {
    let random_checks = examples
        .iter()
        .filter(|e| e.split == Split::Holdout && e.random)
        .count();
    if random_checks < enough {
        return 0;
    }
    let mut moved = 0;
    for example in examples
        .iter_mut()
        .filter(|e| e.split == Split::Holdout && !e.random)
    {
        example.split = Split::Train;
        moved += 1;
    }
    moved
}

/// Items labeled by machine now (state `auto_labeled`: no person has
/// labeled them, or they would be `human_labeled`), with the newest machine
/// label of each. Only for a run that asks for machine labels.
const MACHINE_LABELED_ITEMS: &str = r#"
    SELECT DISTINCT ON (l.item_id) l.item_id, l.class_index, l.boxes, i.object_key,
           i.content_hash, false AS random, false AS audit_sample
    FROM labels l JOIN items i ON i.id = l.item_id
    WHERE i.project_id = $1 AND i.state = 'auto_labeled' AND l.source = 'machine'
    ORDER BY l.item_id, l.created_at DESC
"#;

/// The machine-labeled examples a run that asks for them trains on: only
/// items the content hash puts in the training split. An item of the
/// holdout split never enters training in any form, so when a person labels
/// it later, no version has already learnt it, and holdouts stay comparable.
async fn machine_examples(
    ctx: &Context,
    project: &Project,
) -> anyhow::Result<Vec<SnapshotExample>> {
    Ok(examples(ctx, project, MACHINE_LABELED_ITEMS)
        .await?
        .into_iter()
        .filter(|e| e.split == Split::Train)
        .map(|e| SnapshotExample { machine: true, ..e })
        .collect())
}

/// For a run on a frozen backbone (heads mode): write the examples' cached
/// embeddings to the table `key`, a chunk of items at a time, and point each
/// example that has one at its row. `None` when no example has one (the
/// worker then computes them all from the images).
async fn write_embeddings(
    ctx: &Context,
    backbone: &Backbone,
    examples: &mut [SnapshotExample],
    key: &str,
) -> anyhow::Result<Option<EmbeddingTable>> {
    let mut writer: Option<TableWriter> = None;
    for chunk in examples.chunks_mut(EMBEDDING_CHUNK) {
        let ids = chunk
            .iter()
            .map(|e| e.item_id.as_uuid().to_string())
            .collect::<Vec<_>>()
            .join(",");
        let found = StoredEmbedding::find_by_statement(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            EMBEDDINGS_OF,
            [
                ids.into(),
                backbone.shape.clone().into(),
                backbone.weights.clone().into(),
            ],
        ))
        .all(&ctx.db)
        .await?;
        anyhow::ensure!(
            found.len() == chunk.len(),
            "the embedding lookup returned {} rows for {} items",
            found.len(),
            chunk.len()
        );
        for (example, stored) in chunk.iter_mut().zip(found) {
            let Some(embedding) = stored
                .embedding
                .as_deref()
                .and_then(|json| decode_embedding(example.item_id.as_uuid(), json))
            else {
                continue;
            };
            let table = match &mut writer {
                Some(table) => table,
                None => writer.insert(TableWriter::create(&ctx.store, key, embedding.len()).await?),
            };
            example.embedding_row = table.push(&embedding).await?;
            if example.embedding_row.is_none() {
                tracing::warn!(item = %example.item_id, width = embedding.len(), expected = table.dim(), "stored embedding is not the backbone's width of finite numbers; leaving it out of the snapshot");
            }
        }
    }
    match writer {
        Some(table) => Ok(table.finish().await?),
        None => Ok(None),
    }
}

/// What a person's retrain may change from the project's defaults (the
/// HTTP body of a retrain, the flags of `sieve retrain`); automatic
/// retrains change nothing.
#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrainRequest {
    /// Also train on machine labels (see `TrainParams::machine_labels`).
    #[serde(default)]
    pub machine_labels: bool,
    /// `full` fine-tunes a MobileNetV2 project's backbone with its heads
    /// (default: the mode the architecture trains in, heads for MobileNetV2).
    #[serde(default)]
    pub mode: Option<TrainMode>,
    /// Full mode of MobileNetV2: train only the last this many of its 17
    /// blocks (see `TrainParams::unfrozen_blocks`).
    #[serde(default)]
    pub unfrozen_blocks: Option<u32>,
    /// Upper bound on epochs (early stopping may end sooner).
    #[serde(default)]
    pub epochs: Option<u32>,
    /// A detector's (or a deidentify project's plate heads') tile side in
    /// pixels for this run: a multiple of 32 from 64 to 1024 (default: the
    /// project's box settings, 384 unless set). Larger tiles see larger
    /// objects whole; smaller ones train on more tiles.
    #[serde(default)]
    pub tile_size: Option<u32>,
}

/// The most epochs a run may ask for.
const MAX_EPOCHS: u32 = 1000;

impl RetrainRequest {
    /// The run's parameters: the defaults of the project's architecture in
    /// the mode asked for, with what was asked on top.
    pub fn params(&self, project: &Project) -> AppResult<TrainParams> {
        let defaults = match self.mode {
            Some(mode) => project
                .boxes
                .apply(TrainParams::for_mode(project.arch, mode)),
            None => project.train_params(),
        };
        // Epochs asked for by hand are the bound as given, not scaled up
        // to the project's minimum of steps.
        let (epochs, min_steps) = match self.epochs {
            Some(n) if !(1..=MAX_EPOCHS).contains(&n) => {
                return Err(AppError::Invalid(format!(
                    "epochs = {n}: ask for 1 to {MAX_EPOCHS}"
                )));
            }
            Some(n) => (n, 0),
            None => (defaults.epochs, defaults.min_steps),
        };
        let input_size = match self.tile_size {
            Some(tile) => Some(check_tile_size(project.arch, tile)?),
            None => defaults.input_size,
        };
        let params = TrainParams {
            machine_labels: self.machine_labels,
            unfrozen_blocks: self.unfrozen_blocks,
            epochs,
            min_steps,
            input_size,
            ..defaults
        };
        match params.problem() {
            Some(problem) => Err(AppError::Invalid(format!(
                "project {}: {problem}",
                project.name
            ))),
            None => Ok(params),
        }
    }
}

/// Create a classification project and queue its first (untrained) model,
/// so that items ingested into it can be pre-labeled at once and the loop
/// can start.
pub async fn create_project(
    ctx: &Context,
    name: &ProjectName,
    classes: &ClassNames,
    policy: &Policy,
    arch: ModelArch,
    requested_by: &str,
) -> AppResult<Project> {
    create_project_of_kind(
        ctx,
        name,
        classes,
        policy,
        arch,
        TaskKind::Classification,
        requested_by,
    )
    .await
}

/// Create a project of `kind`. A classification project's first model is
/// queued at once, and a deidentify project's (the pretrained face
/// detector, packaged by a worker). A detection project starts without one
/// ([`TaskKind::starts_with_a_model`]): each image it ingests goes
/// to people (a `seed` review task, in random order) until a detector has
/// trained on their boxes (or imported ones) and been activated. Its
/// architecture is always the detector: `arch` must be that or the default.
pub async fn create_project_of_kind(
    ctx: &Context,
    name: &ProjectName,
    classes: &ClassNames,
    policy: &Policy,
    arch: ModelArch,
    kind: TaskKind,
    requested_by: &str,
) -> AppResult<Project> {
    let project = projects::create(&ctx.db, name, classes, policy, arch, kind).await?;
    if kind.starts_with_a_model() {
        request(ctx, &project, requested_by, project.train_params(), true).await?;
    }
    Ok(project)
}

/// Queue a training run for `project`. `bootstrap` allows a run with no
/// labels: a project's first, untrained model.
///
/// A project without an active version always gets a run: its first model
/// may have failed (a worker that could not read the store) or been
/// cancelled, and until some version is active nothing it ingests is
/// pre-labeled and nothing reaches review, so no label could ever come. Such
/// a run is a bootstrap too: the untrained first model when there are no
/// human labels yet, else a model trained from scratch on those there are,
/// whatever their count per class.
pub async fn request(
    ctx: &Context,
    project: &Project,
    requested_by: &str,
    params: TrainParams,
    bootstrap: bool,
) -> AppResult<RunSummary> {
    // As stored now: the caller's copy may predate an activation.
    let without_model = project::Entity::find_by_id(project.id.as_uuid())
        .one(&ctx.db)
        .await?
        .is_some_and(|p| p.active_model_version_id.is_none());
    let bootstrap = bootstrap || without_model;
    if params.arch != project.arch {
        return Err(AppError::Invalid(format!(
            "project {} runs {}; a run of {} would register a version it cannot use",
            project.name, project.arch, params.arch
        )));
    }
    if let Some(problem) = params.problem() {
        return Err(AppError::Invalid(problem));
    }
    let mut examples = labeled_examples(ctx, project).await?;
    if !project.task_kind.starts_with_a_model() && !examples.iter().any(|e| e.split == Split::Train)
    {
        return Err(AppError::Invalid(format!(
            "project {} has no {} labels to train on yet: review some images (or import annotations) first",
            project.name, project.task_kind
        )));
    }
    if examples.is_empty() && !bootstrap {
        return Err(AppError::Invalid(format!(
            "project {} has no human labels yet: review some items before retraining",
            project.name
        )));
    }
    if !bootstrap {
        let minimum = ctx.settings.training.min_labels_per_class;
        let mut per_class = vec![0u32; project.class_names.len()];
        // A class label counts once; a detection label, once per box.
        let classes_of = |e: &SnapshotExample| -> Vec<u32> {
            match &e.boxes {
                Some(boxes) => boxes.iter().map(|b| b.class).collect(),
                None => vec![e.class_index],
            }
        };
        for class in examples.iter().flat_map(classes_of) {
            if let Some(n) = per_class.get_mut(class as usize) {
                *n += 1;
            }
        }
        let short: Vec<String> = project
            .class_names
            .iter()
            .zip(&per_class)
            .filter(|(_, n)| **n < minimum)
            .map(|(class, n)| format!("{class} needs {} more", minimum - n))
            .collect();
        if !short.is_empty() {
            return Err(AppError::Invalid(format!(
                "not enough human labels to retrain project {} (training.min_labels_per_class = {minimum}): {}",
                project.name,
                short.join(", ")
            )));
        }
    }
    // Human labels are counted above and below; machine labels only join
    // the training split of a run that asked for them.
    let human_count = examples.len();
    if params.machine_labels {
        examples.extend(machine_examples(ctx, project).await?);
    }
    let run_id = TrainingRunId::new();
    let version_id = ModelVersionId::new();
    let snapshot_key = format!("projects/{}/snapshots/{run_id}.json", project.id);
    // Only a frozen-backbone run reads embeddings; for the others they are
    // not even looked up.
    let active = match project.active_model_version_id {
        Some(id) => model_version::Entity::find_by_id(id).one(&ctx.db).await?,
        None => None,
    };
    // The detector caches nothing of a prediction: it reads the images.
    let embeddings = if params.mode == TrainMode::Heads && params.arch != ModelArch::Detector {
        let key = format!("projects/{}/snapshots/{run_id}.embeddings.f32", project.id);
        let backbone = Backbone::of_base(active.as_ref(), &params);
        write_embeddings(ctx, &backbone, &mut examples, &key).await?
    } else {
        None
    };
    let holdout = examples
        .iter()
        .filter(|e| e.split == Split::Holdout)
        .count();
    let label_count = human_count;
    let machine_count = examples.len() - human_count;
    let snapshot = Snapshot {
        schema: SCHEMA_VERSION,
        project_id: project.id,
        class_names: project.class_names.clone(),
        examples,
        embeddings,
    };
    ctx.store
        .put(
            &snapshot_key,
            Bytes::from(serde_json::to_vec(&snapshot).map_err(anyhow::Error::from)?),
        )
        .await
        .map_err(anyhow::Error::from)?;

    let base = active.as_ref().map(dispatch::model_ref).transpose()?;

    let txn = ctx.db.begin().await?;
    let last = model_version::Entity::find()
        .filter(model_version::Column::ProjectId.eq(project.id.as_uuid()))
        .order_by_desc(model_version::Column::Version)
        .one(&txn)
        .await?;
    let version = last.map_or(1, |v| v.version + 1);
    let now = Utc::now().fixed_offset();
    let run = training_run::ActiveModel {
        id: Set(run_id.as_uuid()),
        project_id: Set(project.id.as_uuid()),
        requested_by: Set(requested_by.to_owned()),
        base_version_id: Set(base.as_ref().map(|b| b.version_id.as_uuid())),
        model_version_id: Set(version_id.as_uuid()),
        params: Set(serde_json::to_value(&params).map_err(anyhow::Error::from)?),
        snapshot_key: Set(snapshot_key.clone()),
        label_count: Set(label_count as i32),
        state: Set(RunState::Queued),
        progress: Set(None),
        error: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
        finished_at: Set(None),
    };
    if let Err(err) = training_run::Entity::insert(run)
        .exec_without_returning(&txn)
        .await
    {
        return Err(match err.sql_err() {
            Some(SqlErr::UniqueConstraintViolation(_)) => AppError::Conflict(format!(
                "a training run is already queued or running for project {}; wait for it (`sieve retrain status`)",
                project.name
            )),
            _ => err.into(),
        });
    }
    model_version::Entity::insert(model_version::ActiveModel {
        id: Set(version_id.as_uuid()),
        project_id: Set(project.id.as_uuid()),
        version: Set(version),
        parent_id: Set(base.as_ref().map(|b| b.version_id.as_uuid())),
        training_run_id: Set(Some(run_id.as_uuid())),
        artifact_key: Set(None),
        checksum: Set(None),
        architecture: Set(None),
        metrics: Set(None),
        calibration: Set(None),
        status: Set(VersionStatus::Training),
        status_reason: Set(None),
        created_at: Set(now),
        activated_at: Set(None),
    })
    .exec_without_returning(&txn)
    .await?;
    txn.commit().await?;

    let job = TrainJob {
        schema: SCHEMA_VERSION,
        run_id,
        project_id: project.id,
        version_id,
        version,
        base,
        snapshot_key,
        class_names: project.class_names.clone(),
        params,
    };
    if let Err(err) = ctx.publisher.publish(&job).await {
        let reason = format!("could not queue the training job: {err}");
        finish(
            ctx,
            run_id.as_uuid(),
            RunState::Failed,
            Some(reason.clone()),
        )
        .await?;
        return Err(AppError::Internal(anyhow::anyhow!(reason)));
    }
    metrics::counter!("sieve_training_runs_total").increment(1);
    tracing::info!(project = %project.name, run = %run_id, version, labels = label_count, machine_labels = machine_count, "training run queued");
    Ok(RunSummary {
        run_id: run_id.as_uuid(),
        version,
        labels: label_count,
        holdout,
        machine_labels: machine_count,
    })
}

/// Cancel the project's queued or running run: it ends `cancelled` (its
/// version `failed` with the reason, never registered), and the fleet is
/// told, so a worker training it stops at the next epoch and drops the job.
/// Events the run still sends change nothing: it has ended.
pub async fn cancel(ctx: &Context, project: &Project, by: &str) -> AppResult<Uuid> {
    let run = training_run::Entity::find()
        .filter(training_run::Column::ProjectId.eq(project.id.as_uuid()))
        .filter(training_run::Column::State.is_in([RunState::Queued, RunState::Running]))
        .one(&ctx.db)
        .await?
        .ok_or_else(|| {
            AppError::NotFound(format!(
                "project {} has no queued or running training run",
                project.name
            ))
        })?;
    finish(
        ctx,
        run.id,
        RunState::Cancelled,
        Some(format!("cancelled by {by}")),
    )
    .await?;
    ctx.publisher
        .publish(&ControlMessage {
            schema: SCHEMA_VERSION,
            command: ControlCommand::CancelTraining {
                run_id: TrainingRunId::from_uuid(run.id),
            },
        })
        .await
        .map_err(anyhow::Error::from)?;
    tracing::info!(project = %project.name, run = %run.id, by, "training run cancelled");
    Ok(run.id)
}

/// End a run (and its version) unless it already ended. Returns false when
/// it had: a duplicated event then changes nothing.
pub(crate) async fn finish(
    ctx: &Context,
    run_id: Uuid,
    state: RunState,
    error: Option<String>,
) -> Result<bool, DbErr> {
    let now = Utc::now().fixed_offset();
    let ended = training_run::Entity::update_many()
        .col_expr(
            training_run::Column::State,
            sea_orm::sea_query::Expr::value(state),
        )
        .col_expr(
            training_run::Column::Error,
            sea_orm::sea_query::Expr::value(error.clone()),
        )
        .col_expr(
            training_run::Column::FinishedAt,
            sea_orm::sea_query::Expr::value(now),
        )
        .col_expr(
            training_run::Column::UpdatedAt,
            sea_orm::sea_query::Expr::value(now),
        )
        .filter(training_run::Column::Id.eq(run_id))
        .filter(training_run::Column::State.is_in([RunState::Queued, RunState::Running]))
        .exec(&ctx.db)
        .await?;
    if ended.rows_affected > 0 {
        let outcome = match state {
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            _ => "other",
        };
        metrics::counter!("sieve_training_runs_finished_total", "outcome" => outcome).increment(1);
    }
    if ended.rows_affected > 0 && matches!(state, RunState::Failed | RunState::Cancelled) {
        model_version::Entity::update_many()
            .col_expr(
                model_version::Column::Status,
                sea_orm::sea_query::Expr::value(VersionStatus::Failed),
            )
            .col_expr(
                model_version::Column::StatusReason,
                sea_orm::sea_query::Expr::value(error),
            )
            .filter(model_version::Column::TrainingRunId.eq(run_id))
            .filter(model_version::Column::Status.eq(VersionStatus::Training))
            .exec(&ctx.db)
            .await?;
    }
    Ok(ended.rows_affected > 0)
}

/// Apply one training event.
pub async fn handle_event(ctx: &Context, event: &TrainEvent) -> AppResult<()> {
    let run_id = event.run_id.as_uuid();
    let Some(run) = training_run::Entity::find_by_id(run_id)
        .one(&ctx.db)
        .await?
    else {
        tracing::warn!(run = %run_id, "event for an unknown training run; dropping it");
        return Ok(());
    };
    let now = Utc::now().fixed_offset();
    match &event.kind {
        TrainEventKind::Started { worker_id }
            if matches!(
                run.state,
                RunState::Succeeded | RunState::Failed | RunState::Cancelled
            ) =>
        {
            // A worker started a run that has ended: its job was delivered
            // again (a broker restart while another worker trained it). Tell
            // the fleet, so that worker stops at its next epoch and drops
            // the job instead of training for nothing.
            tracing::info!(run = %run_id, worker = %worker_id, state = ?run.state, "a worker started a run that has ended; cancelling it there");
            ctx.publisher
                .publish(&ControlMessage {
                    schema: SCHEMA_VERSION,
                    command: ControlCommand::CancelTraining {
                        run_id: event.run_id,
                    },
                })
                .await
                .map_err(anyhow::Error::from)?;
        }
        TrainEventKind::Started { worker_id } => {
            tracing::info!(run = %run_id, worker = %worker_id, "training started");
            training_run::Entity::update_many()
                .col_expr(
                    training_run::Column::State,
                    sea_orm::sea_query::Expr::value(RunState::Running),
                )
                .col_expr(
                    training_run::Column::UpdatedAt,
                    sea_orm::sea_query::Expr::value(now),
                )
                .filter(training_run::Column::Id.eq(run_id))
                .filter(training_run::Column::State.eq(RunState::Queued))
                .exec(&ctx.db)
                .await?;
        }
        TrainEventKind::Progress {
            epoch,
            loss,
            val_accuracy,
        } => {
            // Only while the run is on: a late or duplicated training (a
            // job redelivered after a broker restart) must not rewrite the
            // progress of a run that has ended.
            training_run::Entity::update_many()
                .col_expr(
                    training_run::Column::Progress,
                    sea_orm::sea_query::Expr::value(serde_json::json!({
                        "epoch": epoch, "loss": loss, "val_accuracy": val_accuracy
                    })),
                )
                .col_expr(
                    training_run::Column::UpdatedAt,
                    sea_orm::sea_query::Expr::value(now),
                )
                .filter(training_run::Column::Id.eq(run_id))
                .filter(training_run::Column::State.is_in([RunState::Queued, RunState::Running]))
                .exec(&ctx.db)
                .await?;
        }
        TrainEventKind::Failed { reason } => {
            tracing::warn!(run = %run_id, %reason, "training failed");
            finish(ctx, run_id, RunState::Failed, Some(reason.clone())).await?;
        }
        TrainEventKind::Completed {
            artifact_key,
            checksum,
            architecture,
            metrics,
        } => {
            let txn = ctx.db.begin().await?;
            let updated = model_version::Entity::update_many()
                .col_expr(
                    model_version::Column::Status,
                    sea_orm::sea_query::Expr::value(VersionStatus::Candidate),
                )
                .col_expr(
                    model_version::Column::ArtifactKey,
                    sea_orm::sea_query::Expr::value(artifact_key.clone()),
                )
                .col_expr(
                    model_version::Column::Checksum,
                    sea_orm::sea_query::Expr::value(checksum.clone()),
                )
                .col_expr(
                    model_version::Column::Architecture,
                    sea_orm::sea_query::Expr::value(architecture.clone()),
                )
                .col_expr(
                    model_version::Column::Metrics,
                    sea_orm::sea_query::Expr::value(
                        serde_json::to_value(metrics).map_err(anyhow::Error::from)?,
                    ),
                )
                .filter(model_version::Column::Id.eq(run.model_version_id))
                .filter(model_version::Column::Status.eq(VersionStatus::Training))
                .exec(&txn)
                .await?;
            if updated.rows_affected > 0 {
                training_run::Entity::update(training_run::ActiveModel {
                    id: Set(run_id),
                    state: Set(RunState::Succeeded),
                    finished_at: Set(Some(now)),
                    updated_at: Set(now),
                    ..Default::default()
                })
                .exec(&txn)
                .await?;
                txn.commit().await?;
                metrics::counter!("sieve_training_runs_finished_total", "outcome" => "succeeded")
                    .increment(1);
                tracing::info!(run = %run_id, accuracy = ?metrics.accuracy, holdout = metrics.holdout_size, "training completed");
            } else {
                txn.rollback().await?;
                // Registered before (a redelivery, or a retry after the
                // promotion step failed). Finish the promotion decision if it
                // was never made; a decided or failed version stays as it is.
                let version = model_version::Entity::find_by_id(run.model_version_id)
                    .one(&ctx.db)
                    .await?;
                let undecided = version.is_some_and(|v| {
                    v.status == VersionStatus::Candidate
                        && v.status_reason.is_none()
                        && v.activated_at.is_none()
                });
                if !undecided {
                    return Ok(());
                }
            }
            let project = projects::get(&ctx.db, &run.project_id.to_string()).await?;
            calibration::refresh(
                &ctx.db,
                &project.policy,
                run.model_version_id,
                project.class_names.len(),
            )
            .await?;
            registry::consider_promotion(ctx, &project, run.model_version_id).await?;
        }
    }
    Ok(())
}

/// Consume `sieve.train.events` until `stop`.
pub async fn run_events(
    ctx: Context,
    connection: std::sync::Arc<Connection>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let queue = ctx.topology().train_events_queue();
    let (_channel, mut consumer) =
        broker::consume(&connection, &queue, 16, "sieve-scheduler-train-events")
            .await
            .with_context(|| format!("consuming {queue}"))?;
    while let Some(delivery) = broker::next_delivery(&mut consumer, &queue, &stop).await? {
        let event = match decode::<TrainEvent>(&delivery.data) {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(error = %err, "undecodable training event; dead-lettering it");
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: false,
                        ..Default::default()
                    })
                    .await;
                continue;
            }
        };
        // Failures here are transient (a deadlock, the database restarting):
        // retry in place with backoff rather than requeue, which would count
        // against the delivery limit. Every step of `handle_event` is safe to
        // repeat.
        let mut backoff = Duration::from_millis(250);
        loop {
            match handle_event(&ctx, &event).await {
                Ok(()) => {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                    break;
                }
                Err(err) => {
                    tracing::error!(error = format!("{err:#}"), run = %event.run_id, retry_in = ?backoff, "applying a training event failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => {
                            let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                            return Ok(());
                        }
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
    Ok(())
}

/// The project's runs, newest first.
pub async fn list_runs(ctx: &Context, project: &Project) -> AppResult<Vec<training_run::Model>> {
    Ok(training_run::Entity::find()
        .filter(training_run::Column::ProjectId.eq(project.id.as_uuid()))
        .order_by_desc(training_run::Column::CreatedAt)
        .all(&ctx.db)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(split: Split, random: bool) -> SnapshotExample {
        SnapshotExample {
            item_id: ItemId::new(),
            object_key: "k".into(),
            class_index: 0,
            split,
            random,
            machine: false,
            embedding_row: None,
            embedding: None,
            boxes: None,
        }
    }

    fn splits(examples: &[SnapshotExample]) -> Vec<(Split, bool)> {
        examples.iter().map(|e| (e.split, e.random)).collect()
    }

    #[test]
    fn labels_picked_for_doubt_leave_the_holdout_once_random_checks_suffice() {
        let mut examples = vec![
            example(Split::Holdout, true),
            example(Split::Holdout, true),
            example(Split::Holdout, false),
            example(Split::Train, false),
            example(Split::Train, true),
        ];
        let before = splits(&examples);
        // Two random checks in the holdout: short of three, nothing moves.
        assert_eq!(cap_holdout(&mut examples, 3), 0);
        assert_eq!(splits(&examples), before);
        // Enough: the doubtful label trains; random checks stay held out,
        // and a random label the hash put in training stays there.
        assert_eq!(cap_holdout(&mut examples, 2), 1);
        assert_eq!(
            splits(&examples),
            vec![
                (Split::Holdout, true),
                (Split::Holdout, true),
                (Split::Train, false),
                (Split::Train, false),
                (Split::Train, true),
            ]
        );
        // 0: random checks only, from the first label.
        let mut fresh = vec![example(Split::Holdout, false)];
        assert_eq!(cap_holdout(&mut fresh, 0), 1);
    }
}
