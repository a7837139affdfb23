//! The messages that cross RabbitMQ (DESIGN §2, §4).
//!
//! Every message carries `schema` (checked on decode, so a worker never acts
//! on a shape it does not understand) and an id that makes its effect
//! idempotent. Each type names the queue it travels on through [`Message`], so
//! a job cannot be published to the wrong place by accident.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::box_scores::ImageScores;
use crate::boxes::LabeledBox;
use crate::ids::{ItemId, JobId, ModelVersionId, ProjectId, TrainingRunId};
use crate::scores::Scores;
use crate::topology::Route;

/// The wire-format version every message is written with.
pub const SCHEMA_VERSION: u16 = 1;

/// A message type and where it is published.
pub trait Message: Serialize + DeserializeOwned {
    const ROUTE: Route;
}

/// Why a delivery could not be decoded. Always permanent: redelivering the
/// same bytes cannot help, so the caller dead-letters or fails the job.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message is not valid JSON for {kind}: {source}")]
    Invalid {
        kind: &'static str,
        source: serde_json::Error,
    },
    #[error("unsupported schema version {found} (this build reads {SCHEMA_VERSION})")]
    UnsupportedSchema { found: u16 },
}

#[derive(Deserialize)]
struct SchemaProbe {
    schema: u16,
}

/// Decode a message, checking its schema version first so that a newer
/// producer's message is refused by name rather than misread.
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, DecodeError> {
    let kind = std::any::type_name::<M>()
        .rsplit("::")
        .next()
        .unwrap_or("message");
    let probe: SchemaProbe =
        serde_json::from_slice(bytes).map_err(|source| DecodeError::Invalid { kind, source })?;
    if probe.schema != SCHEMA_VERSION {
        return Err(DecodeError::UnsupportedSchema {
            found: probe.schema,
        });
    }
    serde_json::from_slice(bytes).map_err(|source| DecodeError::Invalid { kind, source })
}

pub fn encode<M: Message>(message: &M) -> Vec<u8> {
    // Serialising plain data structs to JSON cannot fail.
    serde_json::to_vec(message).unwrap_or_default()
}

/// The model a job must be run with, and how to fetch and verify it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    pub version_id: ModelVersionId,
    /// Human-facing version number within the project (1, 2, ...).
    pub version: i32,
    /// Object-store key of the artifact (weights + config).
    pub artifact_key: String,
    /// Hex SHA-256 of the artifact bytes.
    pub checksum: String,
}

/// Predict one item with the named model (scheduler -> worker).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrelabelJob {
    pub schema: u16,
    pub job_id: JobId,
    pub project_id: ProjectId,
    pub item_id: ItemId,
    /// Object-store key of the image bytes.
    pub object_key: String,
    pub model: ModelRef,
    /// The image's size in bytes, when the scheduler knows it: what the
    /// worker's byte cap on a batch (`worker.batch_max_bytes`) counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

impl Message for PrelabelJob {
    const ROUTE: Route = Route::Prelabel;
}

/// A committee's prediction for one item.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PredictionOutput {
    /// Class probabilities of the committee mean.
    pub probabilities: Vec<f32>,
    /// Top class of each committee member.
    pub member_votes: Vec<u32>,
    pub scores: Scores,
    /// Backbone embedding, when the model has one (for head retraining).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
    /// A detector's answer: the objects the committee proposes, in pixels
    /// of the original image, with the image's box scores. `scores` then
    /// summarises them ([`ImageScores::as_scores`]), `probabilities` is
    /// empty and `member_votes` holds each member's count of boxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detections: Option<Box<ImageScores>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum PrelabelOutcome {
    Scored(PredictionOutput),
    /// A permanent failure for this item (not an image, unknown model...).
    Failed {
        reason: String,
    },
}

/// The outcome of one [`PrelabelJob`] (worker -> scheduler).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrelabelResult {
    pub schema: u16,
    pub job_id: JobId,
    pub project_id: ProjectId,
    pub item_id: ItemId,
    pub model_version_id: ModelVersionId,
    pub worker_id: String,
    pub outcome: PrelabelOutcome,
}

impl Message for PrelabelResult {
    const ROUTE: Route = Route::Results;
}

/// A batch's results as one message (worker -> scheduler): one publish and
/// one confirm per batch, and one delivery for the broker to route and
/// store, instead of one per item. Each result keeps its own ids, so the
/// scheduler applies them one by one, idempotently, as before. Messages
/// holding a single [`PrelabelResult`] (from workers before batching, or
/// replayed dead letters) are still read: see [`decode_results`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrelabelResults {
    pub schema: u16,
    pub results: Vec<PrelabelResult>,
}

impl Message for PrelabelResults {
    const ROUTE: Route = Route::Results;
}

/// The results a message of the results queue carries: a batch
/// ([`PrelabelResults`]) or a single [`PrelabelResult`].
pub fn decode_results(bytes: &[u8]) -> Result<Vec<PrelabelResult>, DecodeError> {
    /// Only whether the message has a `results` field.
    #[derive(Deserialize)]
    struct Shape {
        #[serde(default)]
        results: Option<serde::de::IgnoredAny>,
    }
    let batch = serde_json::from_slice::<Shape>(bytes).is_ok_and(|shape| shape.results.is_some());
    if batch {
        decode::<PrelabelResults>(bytes).map(|batch| batch.results)
    } else {
        decode::<PrelabelResult>(bytes).map(|result| vec![result])
    }
}

/// Which network a project's committee is built on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelArch {
    /// A small CNN trained from scratch on 28x28 grayscale input; fast on a CPU.
    #[default]
    SmallCnn,
    /// The small CNN with two residual blocks and BatchNorm, on the same
    /// input: about 2.5 times the training time, and on Fashion-MNIST the
    /// share labelable at 97% rises from 76% to 80% at 13,000 labels
    /// (`sieve-tools bench accuracy --arch res_cnn`, docs/benchmarks.md).
    ResCnn,
    /// torchvision's MobileNetV2 with its ImageNet weights as a frozen
    /// backbone, K linear heads on its 1280-wide embedding.
    MobilenetV2,
    /// For measurement only: constant probabilities, no decoding and no
    /// tensor work, so that a benchmark sees what the machinery around the
    /// model costs (`sieve-tools bench ceiling`). Refused for a project
    /// unless asked for as measurement-only.
    Null,
    /// The `detection` task kind's committee: K CenterNet-style heads on
    /// the frozen MobileNetV2 backbone's stride-16 feature maps, run on
    /// overlapping tiles of the input size.
    Detector,
    /// The `deidentify` task kind's committee: MTCNN's pretrained face
    /// networks (facenet-pytorch's weights) on the image and on its mirror
    /// image. Nothing is trained: a run packages the weights into a version.
    Faces,
}

impl ModelArch {
    /// The mode a run of this architecture trains in unless it asks for
    /// another (automatic retrains always do this): the small CNN is trained
    /// whole; MobileNetV2 keeps its backbone frozen and trains the heads on
    /// cached embeddings.
    pub fn train_mode(self) -> TrainMode {
        match self {
            Self::SmallCnn | Self::ResCnn | Self::Null | Self::Faces => TrainMode::Full,
            Self::MobilenetV2 | Self::Detector => TrainMode::Heads,
        }
    }

    /// Whether a run of this architecture can train in `mode`: MobileNetV2
    /// in both (full mode fine-tunes the backbone, or its last blocks); the
    /// small CNN has no pretrained backbone to freeze, so only in full mode.
    pub fn trains_in(self, mode: TrainMode) -> bool {
        match self {
            Self::SmallCnn | Self::ResCnn | Self::Null | Self::Faces => mode == TrainMode::Full,
            Self::MobilenetV2 => true,
            // Heads only so far: fine-tuning the backbone's last blocks for
            // boxes is not built yet.
            Self::Detector => mode == TrainMode::Heads,
        }
    }

    /// Inverted-residual blocks of the backbone (MobileNetV2's 17); 0 for
    /// a network without one.
    pub fn backbone_blocks(self) -> u32 {
        match self {
            Self::SmallCnn | Self::ResCnn | Self::Null | Self::Faces => 0,
            Self::MobilenetV2 | Self::Detector => 17,
        }
    }

    /// The square input side the architecture runs at unless told otherwise.
    pub fn default_input_size(self) -> u32 {
        match self {
            Self::SmallCnn | Self::ResCnn => 28,
            Self::MobilenetV2 => 96,
            // The tile side: cells of 16 pixels, 24 a side.
            Self::Detector => 384,
            // Nothing is decoded; the figure only has to be a valid size.
            Self::Null => 1,
            // Faces: whole images at their own size (an image pyramid); the
            // figure is the tile side of the plate heads, the detector's.
            Self::Faces => 384,
        }
    }

    /// The confidence from which a box committee of this architecture
    /// proposes an object, unless the project sets its own; `None` for a
    /// classifier. A detector proposes from 0.5. A deidentify version's
    /// plate heads propose from 0.35, recall first: a plate left out leaks,
    /// an extra box only blurs more (its faces keep MTCNN's 0.9).
    pub fn default_proposal_threshold(self) -> Option<f32> {
        match self {
            Self::Detector => Some(crate::box_scores::DETECTION_PROPOSAL_THRESHOLD),
            Self::Faces => Some(crate::box_scores::PLATE_PROPOSAL_THRESHOLD),
            Self::SmallCnn | Self::ResCnn | Self::MobilenetV2 | Self::Null => None,
        }
    }

    /// Whether a project of this architecture has box settings (a tile
    /// size and a proposal threshold of its own).
    pub fn takes_box_settings(self) -> bool {
        self.default_proposal_threshold().is_some()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SmallCnn => "small_cnn",
            Self::ResCnn => "res_cnn",
            Self::MobilenetV2 => "mobilenet_v2",
            Self::Null => "null",
            Self::Detector => "detector",
            Self::Faces => "faces",
        }
    }
}

impl std::fmt::Display for ModelArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ModelArch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "small_cnn" => Ok(Self::SmallCnn),
            "res_cnn" => Ok(Self::ResCnn),
            "mobilenet_v2" => Ok(Self::MobilenetV2),
            "null" => Ok(Self::Null),
            "detector" => Ok(Self::Detector),
            "faces" => Ok(Self::Faces),
            other => Err(format!(
                "unknown model architecture {other:?} (expected small_cnn, res_cnn or mobilenet_v2, detector for boxes, faces for de-identification; null for measurement only)"
            )),
        }
    }
}

/// What a training run changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainMode {
    /// Every weight, from the base version's (or a fresh initialisation).
    #[default]
    Full,
    /// Only the committee's K heads, on embeddings of the frozen backbone
    /// (cached in the snapshot where the workers returned them).
    Heads,
}

/// How the learning rate moves over a full-mode run's epochs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// `learning_rate` throughout (what a job from before schedules meant).
    #[default]
    Constant,
    /// A half cosine from `learning_rate` down to nearly zero at the last
    /// epoch: +2.7 points of the share labelable at 97% for the small CNN
    /// on 13,000 labels (`sieve-tools bench accuracy`).
    Cosine,
}

/// Hyper-parameters of a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainParams {
    pub members: u32,
    pub epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    #[serde(default)]
    pub schedule: LrSchedule,
    pub seed: u64,
    #[serde(default)]
    pub arch: ModelArch,
    #[serde(default)]
    pub mode: TrainMode,
    /// Square input side in pixels; `None`: the architecture's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_size: Option<u32>,
    /// Also train on the project's current machine labels (self-training),
    /// never on their own: only items of the training split by content
    /// hash, so the holdout stays human truth, and they never count toward
    /// the minimum labels per class. Off unless a run asks for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub machine_labels: bool,
    /// Full mode of a pretrained backbone (MobileNetV2): train only its
    /// last this many inverted-residual blocks, with its final 1x1
    /// convolution and the heads, and keep the rest frozen (weights and
    /// BatchNorm statistics). `None` fine-tunes every layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unfrozen_blocks: Option<u32>,
    /// At least this many optimiser steps, whatever the number of labels:
    /// a small label set gets more epochs (up to [`MAX_SCALED_EPOCHS`];
    /// early stopping still ends a run sooner) instead of a few dozen
    /// steps. 0 (a job from before, or epochs asked for by hand): exactly
    /// `epochs` as the upper bound. See [`TrainParams::epochs_for`].
    #[serde(default)]
    pub min_steps: u32,
    /// A box committee's proposal threshold: the confidence from which an
    /// object is proposed (a deidentify version's plates; its faces keep
    /// MTCNN's). The version carries it; `None`: the kind's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal_threshold: Option<f32>,
}

/// The proposal thresholds a box project may set: from 0.1 (members
/// report candidates from 0.05, and the near misses under it must still be
/// seen) to 0.95.
pub const PROPOSAL_THRESHOLDS: std::ops::RangeInclusive<f32> = 0.1..=0.95;

/// The most epochs [`TrainParams::min_steps`] may scale a run to.
pub const MAX_SCALED_EPOCHS: u32 = 200;

impl Default for TrainParams {
    fn default() -> Self {
        Self {
            members: 3,
            epochs: 8,
            batch_size: 64,
            learning_rate: 2e-3,
            schedule: LrSchedule::Cosine,
            seed: 17,
            arch: ModelArch::SmallCnn,
            mode: TrainMode::Full,
            input_size: None,
            machine_labels: false,
            unfrozen_blocks: None,
            min_steps: 600,
            proposal_threshold: None,
        }
    }
}

impl TrainParams {
    /// The upper bound on epochs for a run on `examples` training examples
    /// (after the worker holds out `validation_share` of them for early
    /// stopping): `epochs`, or more where that many passes would take fewer
    /// than `min_steps` steps.
    pub fn epochs_for(&self, examples: usize, validation_share: f64) -> u32 {
        let trained = (examples as f64 * (1.0 - validation_share)).ceil().max(1.0);
        let steps_per_epoch = (trained / f64::from(self.batch_size.max(1))).ceil();
        let wanted = (f64::from(self.min_steps) / steps_per_epoch).ceil() as u32;
        self.epochs.max(wanted.min(MAX_SCALED_EPOCHS))
    }

    /// The defaults for a committee on `arch`, in the mode it trains in.
    /// Heads train on embeddings in well under a second per epoch, so they
    /// get more epochs (early stopping ends them sooner) and larger batches.
    pub fn for_arch(arch: ModelArch) -> Self {
        match arch {
            ModelArch::SmallCnn => Self::default(),
            ModelArch::ResCnn => Self {
                arch,
                ..Self::default()
            },
            ModelArch::Null => Self {
                arch,
                ..Self::default()
            },
            // The detector heads' own defaults (`sieve-tools bench detect`):
            // feature maps are cached, epochs take seconds, early stopping
            // ends most runs well before the last. A de-identification run
            // trains nothing else (its plate heads are a detector's; MTCNN
            // is pretrained), in the mode it is run in.
            ModelArch::Faces => Self {
                arch,
                mode: TrainMode::Full,
                ..Self::for_arch(ModelArch::Detector)
            },
            ModelArch::Detector => Self {
                epochs: 60,
                batch_size: 16,
                learning_rate: 3e-3,
                arch,
                mode: TrainMode::Heads,
                min_steps: 0,
                ..Self::default()
            },
            ModelArch::MobilenetV2 => Self {
                epochs: 30,
                batch_size: 256,
                learning_rate: 1e-3,
                arch,
                mode: TrainMode::Heads,
                ..Self::default()
            },
        }
    }

    /// The defaults for a run of `arch` in `mode`. Fine-tuning MobileNetV2
    /// whole takes minutes per thousand images on a CPU (docs/benchmarks.md),
    /// so a full-mode run gets few epochs, small batches and a learning rate
    /// that moves pretrained weights gently.
    pub fn for_mode(arch: ModelArch, mode: TrainMode) -> Self {
        match (arch, mode) {
            (ModelArch::MobilenetV2, TrainMode::Full) => Self {
                epochs: 4,
                batch_size: 32,
                learning_rate: 5e-4,
                arch,
                mode,
                // Each step costs a forward and backward pass through the
                // unfrozen blocks: no more than the epochs asked for.
                min_steps: 0,
                ..Self::default()
            },
            _ => Self {
                mode,
                ..Self::for_arch(arch)
            },
        }
    }

    pub fn input_size(&self) -> u32 {
        self.input_size
            .unwrap_or_else(|| self.arch.default_input_size())
    }

    /// Why a run with these parameters cannot train, if it cannot: a mode
    /// the architecture has no use for, or blocks to unfreeze that it does
    /// not have.
    pub fn problem(&self) -> Option<String> {
        if let Some(threshold) = self.proposal_threshold {
            if !self.arch.takes_box_settings() {
                return Some(format!(
                    "proposal_threshold is a box committee's; {} proposes no boxes",
                    self.arch
                ));
            }
            if !PROPOSAL_THRESHOLDS.contains(&threshold) {
                return Some(format!(
                    "proposal_threshold = {threshold}: ask for {} to {}",
                    PROPOSAL_THRESHOLDS.start(),
                    PROPOSAL_THRESHOLDS.end()
                ));
            }
        }
        if self.arch == ModelArch::Detector && self.mode != TrainMode::Heads {
            return Some(
                "the detector trains its heads on the frozen backbone only (heads mode): \
                 fine-tuning its backbone is not built yet"
                    .to_string(),
            );
        }
        if !self.arch.trains_in(self.mode) {
            return Some(format!(
                "{} trains in {:?} mode only: it has no pretrained backbone to freeze",
                self.arch,
                self.arch.train_mode()
            ));
        }
        match self.unfrozen_blocks {
            Some(_) if self.mode != TrainMode::Full => Some(format!(
                "unfrozen_blocks applies to full mode; {:?} mode trains the heads alone",
                self.mode
            )),
            Some(n) if n > self.arch.backbone_blocks() => Some(format!(
                "unfrozen_blocks = {n}, but {} has {} blocks{}",
                self.arch,
                self.arch.backbone_blocks(),
                if self.arch.backbone_blocks() == 0 {
                    " (it is always trained whole)"
                } else {
                    ""
                }
            )),
            _ => None,
        }
    }
}

/// Train a new model version from a labeled snapshot (scheduler -> worker).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    pub schema: u16,
    pub run_id: TrainingRunId,
    pub project_id: ProjectId,
    /// The id and number the new version will be registered under.
    pub version_id: ModelVersionId,
    pub version: i32,
    /// The version to fine-tune from; `None` for a project's first model.
    pub base: Option<ModelRef>,
    /// Object-store key of the [`Snapshot`].
    pub snapshot_key: String,
    pub class_names: Vec<String>,
    pub params: TrainParams,
}

impl Message for TrainJob {
    const ROUTE: Route = Route::Train;
}

/// Which part of the labeled set an example belongs to. Decided by the item's
/// content hash, so the holdout is stable across snapshots and never leaks
/// into training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Holdout,
}

impl Split {
    /// 20% of items, by the first byte of their hex SHA-256, are holdout.
    pub fn of_hash(content_hash: &str) -> Self {
        let byte = content_hash
            .get(..2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
        if byte < 51 {
            Self::Holdout
        } else {
            Self::Train
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotExample {
    pub item_id: ItemId,
    pub object_key: String,
    pub class_index: u32,
    pub split: Split,
    /// Whether the item was picked at random for its label (the seed set,
    /// the audit sample) rather than for the model's doubt. Audit-sample
    /// items are always holdout: they are calibration evidence.
    #[serde(default)]
    pub random: bool,
    /// The label is the model's (the item was labeled by machine), in a
    /// run that asked for machine labels: always `Train`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub machine: bool,
    /// The row of the snapshot's [`EmbeddingTable`] holding the frozen
    /// backbone's embedding of the item, where a worker returned one with a
    /// prediction of the same architecture and input size: heads mode
    /// trains on these without reading the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_row: Option<u32>,
    /// The embedding itself, inline: how snapshots carried it before the
    /// table (about 13 KB of JSON per item). Still read; no longer written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
    /// A detection label's boxes, in pixels of the original image
    /// (`class_index` is then 0 and means nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boxes: Option<Vec<LabeledBox>>,
}

/// Where a snapshot's cached embeddings are: an object of `rows` rows of
/// `dim` little-endian `f32` each, nothing else (`format` `f32le`), with its
/// SHA-256. Written and read by `sieve_shared::embedding_table`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingTable {
    pub key: String,
    pub format: String,
    pub dim: u32,
    pub rows: u32,
    pub sha256: String,
}

/// The labeled set a training run learns from, written once to the object
/// store and never changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub schema: u16,
    pub project_id: ProjectId,
    pub class_names: Vec<String>,
    pub examples: Vec<SnapshotExample>,
    /// The examples' cached embeddings, when any example has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<EmbeddingTable>,
}

/// Holdout evaluation of a trained version.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HoldoutMetrics {
    pub holdout_size: u32,
    /// `None` when the holdout is empty.
    pub accuracy: Option<f64>,
    pub train_size: u32,
    /// Every holdout example as the version saw it: the evidence its
    /// routing thresholds are calibrated on.
    #[serde(default)]
    pub evaluations: Vec<HoldoutEvaluation>,
    /// Accuracy of the version this one started from (the champion when the
    /// run was queued) on this same holdout, so the two compare fairly.
    #[serde(default)]
    pub base_accuracy: Option<f64>,
    /// A detector's average precision at IoU 0.5 over the holdout's boxes
    /// (its `accuracy` is then the share of holdout images whose proposed
    /// boxes were all right).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub average_precision: Option<f64>,
    /// Where the base version was scored on this same holdout, example by
    /// example: the examples only one of the two got right (what a paired
    /// test of "is the candidate worse?" rests on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paired: Option<PairedOutcomes>,
}

/// How a candidate and its base differ on one holdout, example by example.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairedOutcomes {
    /// Examples the base got right and the candidate wrong.
    pub base_only: u32,
    /// Examples the candidate got right and the base wrong.
    pub candidate_only: u32,
}

impl PairedOutcomes {
    /// The counts from the two versions' verdicts on the same examples, in
    /// the same order; `None` when the lists differ in length.
    pub fn of(candidate: &[HoldoutEvaluation], base: &[HoldoutEvaluation]) -> Option<Self> {
        (candidate.len() == base.len()).then(|| {
            let (mut base_only, mut candidate_only) = (0, 0);
            for (c, b) in candidate.iter().zip(base) {
                match (c.is_correct(), b.is_correct()) {
                    (false, true) => base_only += 1,
                    (true, false) => candidate_only += 1,
                    _ => {}
                }
            }
            Self {
                base_only,
                candidate_only,
            }
        })
    }
}

/// One holdout example: its human label, the committee's top class and
/// confidence.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HoldoutEvaluation {
    pub label: u32,
    pub predicted: u32,
    pub confidence: f32,
    /// The snapshot example's `random` flag; `None` from workers that
    /// predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random: Option<bool>,
    /// Whether the version got the example right, where that is more than
    /// `predicted == label`: a detector's proposal for an image is right
    /// when every box it proposes matches a human box at IoU 0.5 and every
    /// human box is matched (a deidentify version's when no human box is
    /// missing). `predicted` is then the class of the least certain
    /// proposed box, as routing takes it, and `label` that class when
    /// right, `u32::MAX` when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correct: Option<bool>,
    /// A box version's proposal for the image, box by box: the evidence a
    /// precision target is calibrated on. `None` for a classifier (and from
    /// workers that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boxes: Option<crate::box_scores::BoxTally>,
}

impl HoldoutEvaluation {
    pub fn is_correct(&self) -> bool {
        self.correct.unwrap_or(self.predicted == self.label)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEventKind {
    Started {
        worker_id: String,
    },
    Progress {
        epoch: u32,
        loss: f64,
        val_accuracy: Option<f64>,
    },
    Completed {
        artifact_key: String,
        checksum: String,
        /// The config that rebuilds the module (architecture, classes, members).
        architecture: serde_json::Value,
        metrics: HoldoutMetrics,
    },
    Failed {
        reason: String,
    },
}

/// Progress and outcome of a training run (worker -> scheduler).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainEvent {
    pub schema: u16,
    pub run_id: TrainingRunId,
    pub project_id: ProjectId,
    pub version_id: ModelVersionId,
    #[serde(flatten)]
    pub kind: TrainEventKind,
}

impl Message for TrainEvent {
    const ROUTE: Route = Route::TrainEvents;
}

/// Fleet-wide notices on the control fanout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum ControlCommand {
    /// A project's active model changed: load it between batches.
    Activate {
        project_id: ProjectId,
        model: ModelRef,
    },
    /// A training run was cancelled: a worker training it stops at the
    /// next epoch and drops the job; a worker that gets the job later
    /// skips it.
    CancelTraining { run_id: TrainingRunId },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlMessage {
    pub schema: u16,
    #[serde(flatten)]
    pub command: ControlCommand,
}

impl Message for ControlMessage {
    const ROUTE: Route = Route::Control;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_params_say_what_an_architecture_cannot_train() {
        let mobile_full = TrainParams::for_mode(ModelArch::MobilenetV2, TrainMode::Full);
        assert_eq!(
            (mobile_full.mode, mobile_full.batch_size),
            (TrainMode::Full, 32)
        );
        assert_eq!(mobile_full.problem(), None);
        let last_four = TrainParams {
            unfrozen_blocks: Some(4),
            ..mobile_full.clone()
        };
        assert_eq!(last_four.problem(), None);

        let too_many = TrainParams {
            unfrozen_blocks: Some(18),
            ..mobile_full
        };
        let problem = too_many.problem().unwrap_or_default();
        assert!(problem.contains("17 blocks"), "{problem}");

        let heads = TrainParams {
            unfrozen_blocks: Some(2),
            ..TrainParams::for_arch(ModelArch::MobilenetV2)
        };
        let problem = heads.problem().unwrap_or_default();
        assert!(problem.contains("full mode"), "{problem}");

        let small_heads = TrainParams::for_mode(ModelArch::SmallCnn, TrainMode::Heads);
        let problem = small_heads.problem().unwrap_or_default();
        assert!(problem.contains("no pretrained backbone"), "{problem}");
        let small_partial = TrainParams {
            unfrozen_blocks: Some(1),
            ..TrainParams::default()
        };
        let problem = small_partial.problem().unwrap_or_default();
        assert!(problem.contains("trained whole"), "{problem}");
        assert_eq!(TrainParams::default().problem(), None);
    }

    #[test]
    fn few_labels_get_more_epochs_up_to_a_bound() {
        let params = TrainParams::default();
        assert_eq!(
            (params.epochs, params.batch_size, params.min_steps),
            (8, 64, 600)
        );
        // 13,000 labels: 183 steps an epoch, 8 epochs are plenty.
        assert_eq!(params.epochs_for(13_000, 0.1), 8);
        // 500 labels: 450 trained, 8 steps an epoch: 75 epochs for 600 steps.
        assert_eq!(params.epochs_for(500, 0.1), 75);
        // 20 labels: one step an epoch, bounded.
        assert_eq!(params.epochs_for(20, 0.1), MAX_SCALED_EPOCHS);
        // Off: the epochs as given.
        let fixed = TrainParams {
            min_steps: 0,
            ..params
        };
        assert_eq!(fixed.epochs_for(20, 0.1), 8);
        // A job from before the field: off.
        let old: TrainParams = serde_json::from_value(serde_json::json!({
            "members": 3, "epochs": 8, "batch_size": 64, "learning_rate": 0.002, "seed": 17
        }))
        .expect("an old job decodes");
        assert_eq!(old.min_steps, 0);
    }

    #[test]
    fn train_params_from_before_unfrozen_blocks_still_decode() {
        let old = r#"{"members":3,"epochs":8,"batch_size":64,"learning_rate":0.002,"seed":17,"arch":"mobilenet_v2","mode":"heads"}"#;
        let params: TrainParams = serde_json::from_str(old).unwrap_or_default();
        assert_eq!(
            (params.arch, params.mode, params.unfrozen_blocks),
            (ModelArch::MobilenetV2, TrainMode::Heads, None)
        );
        assert!(
            !serde_json::to_string(&params)
                .unwrap_or_default()
                .contains("unfrozen")
        );
    }

    fn job() -> PrelabelJob {
        PrelabelJob {
            size_bytes: None,
            schema: SCHEMA_VERSION,
            job_id: JobId::new(),
            project_id: ProjectId::new(),
            item_id: ItemId::new(),
            object_key: "images/ab/abcdef".into(),
            model: ModelRef {
                version_id: ModelVersionId::new(),
                version: 1,
                artifact_key: "models/x/1.bin".into(),
                checksum: "00".into(),
            },
        }
    }

    fn result(outcome: PrelabelOutcome) -> PrelabelResult {
        let job = job();
        PrelabelResult {
            schema: SCHEMA_VERSION,
            job_id: job.job_id,
            project_id: job.project_id,
            item_id: job.item_id,
            model_version_id: job.model.version_id,
            worker_id: "w1".into(),
            outcome,
        }
    }

    #[test]
    fn results_are_read_as_a_batch_or_one_by_one() {
        let failed = |reason: &str| {
            result(PrelabelOutcome::Failed {
                reason: reason.into(),
            })
        };
        let batch = PrelabelResults {
            schema: SCHEMA_VERSION,
            results: vec![failed("a"), failed("b")],
        };
        assert_eq!(
            decode_results(&encode(&batch)).expect("batch"),
            batch.results
        );
        let one = failed("c");
        assert_eq!(
            decode_results(&encode(&one)).expect("single"),
            vec![one.clone()]
        );
        // A batch with another schema is refused as a batch, by version.
        let mut value = serde_json::to_value(&batch).expect("json");
        value["schema"] = 99.into();
        let old = serde_json::to_vec(&value).expect("bytes");
        assert!(matches!(
            decode_results(&old),
            Err(DecodeError::UnsupportedSchema { found: 99 })
        ));
        // A batch whose results are not results is not read as anything.
        let broken = br#"{"schema": 1, "results": [{"job_id": 3}]}"#;
        assert!(matches!(
            decode_results(broken),
            Err(DecodeError::Invalid {
                kind: "PrelabelResults",
                ..
            })
        ));
        assert!(decode_results(b"not json").is_err());
    }

    #[test]
    fn round_trips_through_json() {
        let job = job();
        let decoded: PrelabelJob = decode(&encode(&job)).expect("decode");
        assert_eq!(decoded, job);
    }

    #[test]
    fn refuses_other_schema_versions_by_name() {
        let mut value = serde_json::to_value(job()).expect("json");
        value["schema"] = 99.into();
        let err = decode::<PrelabelJob>(value.to_string().as_bytes()).expect_err("must refuse");
        assert!(matches!(err, DecodeError::UnsupportedSchema { found: 99 }));
    }

    #[test]
    fn refuses_garbage_with_the_message_kind() {
        let err = decode::<PrelabelJob>(b"not json").expect_err("must refuse");
        assert!(err.to_string().contains("PrelabelJob"), "{err}");
        let err = decode::<PrelabelJob>(br#"{"schema":1}"#).expect_err("must refuse");
        assert!(matches!(err, DecodeError::Invalid { .. }));
    }

    #[test]
    fn holdout_split_is_a_fifth_by_hash() {
        assert_eq!(Split::of_hash("00ff"), Split::Holdout);
        assert_eq!(Split::of_hash("32ff"), Split::Holdout);
        assert_eq!(Split::of_hash("33ff"), Split::Train);
        assert_eq!(Split::of_hash("ff00"), Split::Train);
    }

    #[test]
    fn train_events_flatten_their_kind() {
        let event = TrainEvent {
            schema: SCHEMA_VERSION,
            run_id: TrainingRunId::new(),
            project_id: ProjectId::new(),
            version_id: ModelVersionId::new(),
            kind: TrainEventKind::Failed {
                reason: "loss diverged".into(),
            },
        };
        let json = serde_json::to_value(&event).expect("json");
        assert_eq!(json["event"], "failed");
        let back: TrainEvent = decode(&encode(&event)).expect("decode");
        assert_eq!(back, event);
    }
}
