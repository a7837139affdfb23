//! [`FaceCommittee`]: a de-identification version's inference side. MTCNN's pretrained networks
//! ([`Mtcnn`]) run on the image and on its mirror image; the two are the committee's members,
//! so a face one of them misses, or scores differently, shows as disagreement, and the image's
//! scores ([`score`]) come from [`sieve_shared::box_scores`] as a detector's do.
//!
//! The face class is the project's first (a de-identification project's classes start with
//! `face`). MTCNN learns nothing: a version holds its three networks' weights, packaged from
//! `worker.face_weights` by the project's first run. The other classes (licence plates) have
//! no pretrained detector: once people have boxed some, a run trains detection heads on the
//! frozen ImageNet MobileNetV2 for them ([`Detector`], two members like the faces'), and the
//! version carries those too. Faces are proposed at [`FACE_THRESHOLD`], the learned classes at
//! [`PLATE_THRESHOLD`]; each side is scored on its own and the two merged
//! ([`ImageScores::merge`]).

use std::path::Path;

use burn::tensor::Device;
use image::RgbImage;
use image::imageops;
use sieve_shared::box_scores::{self, ImageScores, ScoredBox};

use super::detect::{Detector, MATCH_IOU, MemberBoxes, NEAR_MISS_BAND};
use super::mtcnn::{FACE_THRESHOLD, Mtcnn, MtcnnConfig};
use super::tensors::{next_part, push_part};
use super::{ArchitectureConfig, ModelError};

/// The face class's index: a de-identification project's first class.
pub const FACE: u32 = 0;
/// The plate heads' proposal threshold, under the detection kind's
/// [`PROPOSAL_THRESHOLD`](super::detect::PROPOSAL_THRESHOLD) of 0.5: recall first, since a
/// plate left out leaks and an extra box only blurs more. On the drawn-plate scenes of
/// `worker/tests/it/deidentify.rs`, heads trained on about 50 images scored a third of the
/// plates 0.35-0.5 (found 13 of 19 at 0.5, 19 of 19 at 0.35 with 4 false, 19 at 0.3 with 5).
pub const PLATE_THRESHOLD: f32 = box_scores::PLATE_PROPOSAL_THRESHOLD;

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
    /// The heads people's plate (and other non-face) boxes trained, once there are some.
    plates: Option<Detector>,
    config: ArchitectureConfig,
}

impl FaceCommittee {
    /// The committee from MTCNN's `.pt` files in `dir` (`worker.face_weights`), for a project
    /// of `classes` classes (the first is `face`).
    pub fn load(dir: &Path, classes: usize, device: &Device) -> Result<Self, ModelError> {
        Ok(Self {
            mtcnn: Mtcnn::load(dir, committee_config(), &device.clone().without_autodiff())?,
            plates: None,
            config: ArchitectureConfig::faces(classes),
        })
    }

    /// The same face detector with `plates`, a detector of the project's classes trained on
    /// the boxes of every class but faces, with [`MEMBERS`] members.
    pub fn with_plates(self, plates: Detector) -> Result<Self, ModelError> {
        let fits = ArchitectureConfig::detector(
            self.config.num_classes,
            MEMBERS,
            plates.config().input_size,
        );
        if plates.config().shape() != fits {
            return Err(ModelError::InvalidConfig(format!(
                "plate heads {:?} do not fit a de-identification project of {} classes",
                plates.config(),
                self.config.num_classes
            )));
        }
        Ok(Self {
            config: ArchitectureConfig {
                proposal_threshold: self.config.proposal_threshold,
                ..ArchitectureConfig::faces_with_plates(
                    self.config.num_classes,
                    plates.config().input_size,
                )
            },
            plates: Some(plates),
            mtcnn: self.mtcnn,
        })
    }

    /// The confidence from which this version proposes a plate (any class but faces): its
    /// project's setting when it was trained, or [`PLATE_THRESHOLD`].
    pub fn plate_threshold(&self) -> f32 {
        self.config.proposal_threshold.unwrap_or(PLATE_THRESHOLD)
    }

    /// The same version proposing plates from `threshold` (`None`: the default).
    pub fn with_plate_threshold(mut self, threshold: Option<f32>) -> Result<Self, ModelError> {
        super::detect::check_proposal_threshold(threshold)?;
        self.config.proposal_threshold = threshold;
        Ok(self)
    }

    pub fn config(&self) -> &ArchitectureConfig {
        &self.config
    }

    /// Whether the version finds plates too (people had boxed some when it was made).
    pub fn finds_plates(&self) -> bool {
        self.plates.is_some()
    }

    /// Every member's faces in each image, in the image's pixels, and after them its plates
    /// where the version finds plates (member `i` of the plate heads beside member `i` of the
    /// faces; a face class box of the heads is dropped: faces are MTCNN's).
    pub fn detect(&self, images: &[RgbImage]) -> Result<Vec<MemberBoxes>, ModelError> {
        let mut found = self.faces(images)?;
        if let Some(plates) = &self.plates {
            for (members, plate_members) in found.iter_mut().zip(plates.detect(images)?) {
                for (boxes, plate_boxes) in members.iter_mut().zip(plate_members) {
                    boxes.extend(plate_boxes.into_iter().filter(|b| b.class != FACE));
                }
            }
        }
        Ok(found)
    }

    /// Each member's faces in each image.
    fn faces(&self, images: &[RgbImage]) -> Result<Vec<MemberBoxes>, ModelError> {
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

    /// The weights as bytes: MTCNN's alone; with plate heads, MTCNN's length as a little-endian
    /// u64, MTCNN's, then the plate detector's.
    pub fn weights_to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        let mtcnn = self.mtcnn.weights_to_bytes()?;
        let Some(plates) = &self.plates else {
            return Ok(mtcnn);
        };
        let plates = plates.weights_to_bytes()?;
        let mut out = Vec::with_capacity(8 + mtcnn.len() + plates.len());
        push_part(&mut out, &mtcnn);
        out.extend_from_slice(&plates);
        Ok(out)
    }

    /// Rebuilds a version from [`weights_to_bytes`](Self::weights_to_bytes) output; the
    /// config says whether plate heads follow MTCNN (its input size is their tile side).
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
        let device = device.clone().without_autodiff();
        if config.input_size == 0 {
            return Ok(Self {
                mtcnn: Mtcnn::from_weights(bytes, committee_config(), &device)?,
                plates: None,
                config: config.clone(),
            });
        }
        let (mtcnn, plates) = next_part(bytes, "de-identification")?;
        let plates = Detector::from_weights(
            &ArchitectureConfig::detector(config.num_classes, MEMBERS, config.input_size),
            plates,
            &device,
        )?;
        Self {
            mtcnn: Mtcnn::from_weights(mtcnn, committee_config(), &device)?,
            plates: None,
            config: ArchitectureConfig::faces(config.num_classes),
        }
        .with_plate_threshold(config.proposal_threshold)?
        .with_plates(plates)
    }
}

/// The committee's view of one image: the faces it proposes (at [`FACE_THRESHOLD`]) and the
/// other classes' boxes (at `plate_threshold`), the candidates under either, and how sure it
/// is of both.
pub fn score(members: &[Vec<ScoredBox>], plate_threshold: f32) -> ImageScores {
    let (faces, plates): (Vec<Vec<ScoredBox>>, Vec<Vec<ScoredBox>>) = members
        .iter()
        .map(|boxes| {
            boxes
                .iter()
                .partition::<Vec<ScoredBox>, _>(|b| b.class == FACE)
        })
        .unzip();
    box_scores::image_scores(&faces, MATCH_IOU, FACE_THRESHOLD, NEAR_MISS_BAND).merge(
        box_scores::image_scores(&plates, MATCH_IOU, plate_threshold, NEAR_MISS_BAND),
    )
}

/// Whether `b` is one the committee proposes: a face at [`FACE_THRESHOLD`], another class at
/// `plate_threshold`.
pub fn proposed(b: &ScoredBox, plate_threshold: f32) -> bool {
    b.score
        >= if b.class == FACE {
            FACE_THRESHOLD
        } else {
            plate_threshold
        }
}
