//! [`FaceCommittee`]: a de-identification version's inference side. MTCNN's pretrained networks
//! ([`Mtcnn`]) run on the image and on its mirror image; the two are the committee's members,
//! so a face one of them misses, or scores differently, shows as disagreement, and the image's
//! scores ([`score`]) come from [`sieve_shared::box_scores`] as a detector's do.
//!
//! The face class is the project's first (a de-identification project's classes start with
//! `face`). Nothing is trained: a version holds the three networks' weights, packaged from
//! `worker.face_weights` by the project's first run.

use std::path::Path;

use burn::tensor::Device;
use image::RgbImage;
use image::imageops;
use sieve_shared::box_scores::{self, ImageScores, ScoredBox};

use super::detect::{MATCH_IOU, MemberBoxes, NEAR_MISS_BAND};
use super::mtcnn::{FACE_THRESHOLD, Mtcnn, MtcnnConfig};
use super::{ArchitectureConfig, ModelError};

/// The committee: the image as it is, and mirrored.
pub const MEMBERS: usize = 2;

/// MTCNN as the committee runs it: O-Net keeps candidates down to the bottom of the near-miss
/// band under [`FACE_THRESHOLD`], so that a face it is unsure of is seen as a possible miss
/// and the image goes to a person.
pub fn committee_config() -> MtcnnConfig {
    MtcnnConfig {
        thresholds: [0.6, 0.7, FACE_THRESHOLD - NEAR_MISS_BAND],
        ..MtcnnConfig::default()
    }
}

/// A de-identification model version. Immutable; share it between threads with an `Arc`.
#[derive(Clone, Debug)]
pub struct FaceCommittee {
    mtcnn: Mtcnn,
    config: ArchitectureConfig,
}

impl FaceCommittee {
    /// The committee from MTCNN's `.pt` files in `dir` (`worker.face_weights`), for a project
    /// of `classes` classes (the first is `face`).
    pub fn load(dir: &Path, classes: usize, device: &Device) -> Result<Self, ModelError> {
        Ok(Self {
            mtcnn: Mtcnn::load(dir, committee_config(), &device.clone().without_autodiff())?,
            config: ArchitectureConfig::faces(classes),
        })
    }

    pub fn config(&self) -> &ArchitectureConfig {
        &self.config
    }

    /// Every member's faces in each image, in the image's pixels.
    pub fn detect(&self, images: &[RgbImage]) -> Result<Vec<MemberBoxes>, ModelError> {
        images
            .iter()
            .map(|image| {
                let seen = self.mtcnn.detect(image)?;
                let mirrored = self.mtcnn.detect(&imageops::flip_horizontal(image))?;
                let width = image.width() as f32;
                let as_is: Vec<ScoredBox> = seen.iter().map(|f| f.at).collect();
                let back: Vec<ScoredBox> = mirrored
                    .iter()
                    .map(|f| ScoredBox {
                        x_min: width - f.at.x_max,
                        x_max: width - f.at.x_min,
                        ..f.at
                    })
                    .collect();
                Ok(vec![as_is, back])
            })
            .collect()
    }

    pub fn weights_to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        self.mtcnn.weights_to_bytes()
    }

    /// Rebuilds a version from [`weights_to_bytes`](Self::weights_to_bytes) output.
    pub fn from_weights(
        config: &ArchitectureConfig,
        bytes: &[u8],
        device: &Device,
    ) -> Result<Self, ModelError> {
        if config.arch != ArchitectureConfig::FACES || config.num_classes == 0 {
            return Err(ModelError::InvalidConfig(format!(
                "not a face detector's config: {config:?}"
            )));
        }
        Ok(Self {
            mtcnn: Mtcnn::from_weights(
                bytes,
                committee_config(),
                &device.clone().without_autodiff(),
            )?,
            config: config.clone(),
        })
    }
}

/// The committee's view of one image: the faces it proposes (at [`FACE_THRESHOLD`]), the
/// candidates under it, and how sure it is.
pub fn score(members: &[Vec<ScoredBox>]) -> ImageScores {
    box_scores::image_scores(members, MATCH_IOU, FACE_THRESHOLD, NEAR_MISS_BAND)
}
