//! The worker's machine-learning core: a committee of classifiers for active learning.
//!
//! # Layout
//! - [`ArchitectureConfig`] names the architecture and its sizes; together with the weight bytes
//!   it is all that is needed to rebuild a model version ([`Committee::from_weights`]).
//! - [`Committee`] (`committee.rs`) is the inference side: per-member class probabilities, for
//!   disagreement-based sampling, and backbone embeddings, for later head-only retraining.
//! - [`train`] (`train.rs`) fine-tunes a committee with AdamW; members are diversified by an
//!   online bootstrap so that their disagreement means something.
//! - [`train_heads`] (`heads.rs`) trains K linear heads on cached embeddings (frozen backbone).
//! - [`Detector`] (`detect.rs`) is a detection version's inference side: the frozen MobileNetV2
//!   and K detection heads ([`detector`]) over whole images by overlapping tiles.
//! - [`mtcnn::Mtcnn`] (`mtcnn.rs`) finds faces with MTCNN's three pretrained networks, for
//!   de-identification.
//! - [`Model`] is either, as a model version's artifact holds it.
//! - `net.rs` holds the small burn modules themselves (a small CNN backbone, or its residual
//!   variant, shared by K linear heads).
//!
//! Everything here is synchronous and CPU/GPU bound: call it from `spawn_blocking`, feeding whole
//! batches, and share a [`Committee`] between tasks through an `Arc`.

mod committee;
pub mod detect;
pub mod detector;
pub mod faces;
mod heads;
pub mod mobilenet;
pub mod mtcnn;
mod net;
mod recipe;
mod tensors;
mod train;

pub use committee::{Committee, CommitteeProbs, Embeddings};
pub use detect::Detector;
pub use faces::FaceCommittee;
pub use heads::{EmbeddingData, Heads, HeadsOptions, HeadsReport, train_heads};
pub use mobilenet::MobileNetV2;
pub use recipe::EpochReport;
pub use train::{TrainData, TrainOptions, train};

/// A loaded model version: a committee of classifiers or of detectors.
// One per model version, behind an `Arc`: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Model {
    Classifier(Committee),
    Detector(Detector),
    Faces(FaceCommittee),
}

impl Model {
    pub fn config(&self) -> &ArchitectureConfig {
        match self {
            Model::Classifier(c) => c.config(),
            Model::Detector(d) => d.config(),
            Model::Faces(f) => f.config(),
        }
    }

    /// The weights as bytes, as the architecture stores them.
    pub fn weights_to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        match self {
            Model::Classifier(c) => c.weights_to_bytes(),
            Model::Detector(d) => d.weights_to_bytes(),
            Model::Faces(f) => f.weights_to_bytes(),
        }
    }

    /// Rebuilds a version from its config and [`weights_to_bytes`](Self::weights_to_bytes).
    pub fn from_weights(
        config: &ArchitectureConfig,
        bytes: &[u8],
        device: &burn::tensor::Device,
    ) -> Result<Self, ModelError> {
        if config.arch == ArchitectureConfig::FACES {
            Ok(Model::Faces(FaceCommittee::from_weights(
                config, bytes, device,
            )?))
        } else if config.arch == ArchitectureConfig::DETECTOR {
            Ok(Model::Detector(Detector::from_weights(
                config, bytes, device,
            )?))
        } else {
            Ok(Model::Classifier(Committee::from_weights(
                config, bytes, device,
            )?))
        }
    }

    /// The committee of classifiers, if that is what this is.
    pub fn classifier(&self) -> Option<&Committee> {
        match self {
            Model::Classifier(c) => Some(c),
            Model::Detector(_) | Model::Faces(_) => None,
        }
    }
}

/// What a model version is: the architecture and its sizes. Stored next to the weights, since
/// weights alone do not say which module to load them into.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ArchitectureConfig {
    /// Architecture name: [`SMALL_CNN`](Self::SMALL_CNN) or
    /// [`MOBILENET_V2`](Self::MOBILENET_V2).
    pub arch: String,
    pub num_classes: usize,
    /// Committee size K (at least 2, or there is no disagreement to measure).
    pub members: usize,
    /// Side of the square input image, in pixels.
    pub input_size: usize,
    /// Colour channels of the input (1 for grayscale).
    pub channels: usize,
    /// Width of the backbone embedding the heads read.
    pub embedding_dim: usize,
    /// Which weights a pretrained backbone carries: `None` for the ImageNet import as it came,
    /// otherwise the id of the model version whose full-mode run fine-tuned it (kept by the
    /// heads-mode versions trained on it). Embeddings are only comparable between versions with
    /// the same backbone, so the scheduler matches cached embeddings by this too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone: Option<String>,
    /// A box committee's proposal threshold, as its project set it when the version was trained
    /// (a de-identification version's plates'); `None`: the architecture's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal_threshold: Option<f32>,
}

impl ArchitectureConfig {
    pub const SMALL_CNN: &str = "small_cnn";
    /// The small CNN with two residual blocks and BatchNorm (measured by `bench accuracy`; no
    /// project trains it yet).
    pub const RES_CNN: &str = "res_cnn";
    pub const MOBILENET_V2: &str = "mobilenet_v2";
    pub const NULL: &str = "null";
    pub const DETECTOR: &str = "detector";
    pub const FACES: &str = "faces";

    /// The `null` architecture: no input, no weights, a uniform answer from
    /// each of `members` for every image (measurement only).
    pub fn null(num_classes: usize, members: usize) -> Self {
        Self {
            arch: Self::NULL.to_string(),
            num_classes,
            members,
            input_size: 0,
            channels: 0,
            embedding_dim: 0,
            backbone: None,
            proposal_threshold: None,
        }
    }

    /// Whether images need no decoding for this architecture.
    pub fn takes_no_input(&self) -> bool {
        self.arch == Self::NULL
    }

    /// The small CNN on 28x28 grayscale images (Fashion-MNIST sized) with a 256-wide embedding
    /// (measured against 64 and 128 with `sieve-tools bench accuracy`: docs/benchmarks.md).
    pub fn small_cnn(num_classes: usize, members: usize) -> Self {
        Self {
            arch: "small_cnn".to_string(),
            num_classes,
            members,
            input_size: 28,
            channels: 1,
            embedding_dim: 256,
            backbone: None,
            proposal_threshold: None,
        }
    }

    /// MobileNetV2 (frozen ImageNet backbone) on `input_size`-pixel RGB images, K heads on its
    /// 1280-wide embedding. Grayscale input is repeated into the three channels.
    pub fn mobilenet_v2(num_classes: usize, members: usize, input_size: usize) -> Self {
        Self {
            arch: Self::MOBILENET_V2.to_string(),
            num_classes,
            members,
            input_size,
            channels: 3,
            embedding_dim: mobilenet::EMBEDDING_DIM,
            backbone: None,
            proposal_threshold: None,
        }
    }

    /// The detector of the `detection` task kind: K heads on MobileNetV2's stride-16 feature
    /// maps ([`Detector`]), on tiles of `input_size` pixels (a multiple of 32).
    pub fn detector(num_classes: usize, members: usize, input_size: usize) -> Self {
        Self {
            arch: Self::DETECTOR.to_string(),
            num_classes,
            members,
            input_size,
            channels: 3,
            embedding_dim: 0,
            backbone: None,
            proposal_threshold: None,
        }
    }

    /// The face detector of the `deidentify` task kind ([`FaceCommittee`]): MTCNN on the image
    /// and its mirror image, at the image's own size (`input_size` 0: no plate heads).
    pub fn faces(num_classes: usize) -> Self {
        Self {
            arch: Self::FACES.to_string(),
            num_classes,
            members: faces::MEMBERS,
            input_size: 0,
            channels: 3,
            embedding_dim: 0,
            backbone: None,
            proposal_threshold: None,
        }
    }

    /// A de-identification version that also finds the classes people boxed (plates): MTCNN
    /// as [`faces`](Self::faces), and detection heads on `input_size`-pixel tiles
    /// ([`FaceCommittee::with_plates`]).
    pub fn faces_with_plates(num_classes: usize, input_size: usize) -> Self {
        Self {
            input_size,
            ..Self::faces(num_classes)
        }
    }

    /// Whether the input is normalized with ImageNet's per-channel statistics (the pretrained
    /// backbone's) rather than to `[-1, 1]`.
    pub fn imagenet_normalized(&self) -> bool {
        self.arch == Self::MOBILENET_V2 || self.arch == Self::DETECTOR
    }

    /// Whether `other` is the same network shape (weights of one load into the other), whatever
    /// backbone weights either carries.
    pub fn same_shape(&self, other: &Self) -> bool {
        self.shape() == other.shape()
    }

    /// This config without what leaves the network as it is (the backbone's weights, the
    /// proposal threshold).
    pub fn shape(&self) -> Self {
        Self {
            backbone: None,
            proposal_threshold: None,
            ..self.clone()
        }
    }

    /// Number of `f32` values of one input image (`channels * input_size * input_size`).
    pub fn input_len(&self) -> usize {
        self.channels * self.input_size * self.input_size
    }
}

/// Why a model operation failed.
///
/// `BadInput`, `InvalidConfig`, `InvalidOptions`, `UnknownArchitecture`, `Weights` and
/// `NotEnoughData` are permanent for the given inputs (retrying cannot help); `Diverged` may go
/// away with other options (a lower learning rate); `Backend` is the device failing.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown architecture {0:?}")]
    UnknownArchitecture(String),
    #[error("invalid architecture config: {0}")]
    InvalidConfig(String),
    #[error("bad input: {reason}")]
    BadInput { reason: String },
    #[error("invalid training options: {0}")]
    InvalidOptions(String),
    /// The weight bytes are corrupt or do not fit the architecture config.
    #[error("weights do not load: {0}")]
    Weights(String),
    /// The training loss became NaN or infinite.
    #[error("training diverged in epoch {epoch} (non-finite loss)")]
    Diverged { epoch: usize },
    #[error("not enough data: {0}")]
    NotEnoughData(String),
    /// The `on_epoch` callback asked training to stop.
    #[error("training cancelled")]
    Cancelled,
    /// The backend failed to run or read back a tensor.
    #[error("backend error: {0}")]
    Backend(String),
}

impl ModelError {
    fn bad_input(reason: impl Into<String>) -> Self {
        Self::BadInput {
            reason: reason.into(),
        }
    }
}

/// Checks a flat image buffer against the config: its length, and that every value is finite
/// (one NaN pixel would turn a whole batch's predictions, or a training run, into NaN).
fn check_images(
    config: &ArchitectureConfig,
    images: &[f32],
    batch: usize,
) -> Result<(), ModelError> {
    let expected = batch
        .checked_mul(config.input_len())
        .ok_or_else(|| ModelError::bad_input(format!("batch of {batch} images is too large")))?;
    if images.len() != expected {
        return Err(ModelError::bad_input(format!(
            "expected {batch} images of {} values ({expected} in all), got {} values",
            config.input_len(),
            images.len()
        )));
    }
    if let Some(position) = images.iter().position(|value| !value.is_finite()) {
        return Err(ModelError::bad_input(format!(
            "non-finite pixel value at index {position}"
        )));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_data {
    //! Synthetic, separable images: class `c` is a bright square at a class-specific position
    //! on a noisy background. Easy enough to learn in a second, hard enough that an untrained
    //! model is at chance.

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::ArchitectureConfig;

    pub fn squares(config: &ArchitectureConfig, n: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let side = config.input_size;
        let square = 6;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut images = Vec::with_capacity(n * config.input_len());
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let class = i % config.num_classes;
            // Positions on a 4x3 grid of the image (10 classes fit).
            let row = (class / 4) * (side - square) / 2;
            let col = (class % 4) * (side - square) / 3;
            for _ in 0..config.channels {
                for y in 0..side {
                    for x in 0..side {
                        let inside =
                            (row..row + square).contains(&y) && (col..col + square).contains(&x);
                        let base = if inside { 1.0 } else { 0.0 };
                        images.push(base + rng.random_range(-0.3..0.3));
                    }
                }
            }
            labels.push(class);
        }
        (images, labels)
    }
}
