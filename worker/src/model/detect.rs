//! [`Detector`]: the inference side of a detection model version — the frozen MobileNetV2
//! backbone and the K detection heads ([`detector`](super::detector)) over whole images of any
//! size, and its weights as bytes.
//!
//! An image is cut into overlapping tiles of the input's side ([`tile_pixels`]), every tile of
//! a batch goes through the backbone and the heads at once, and each member's boxes come back
//! to image pixels, merged across the overlaps by non-maximum suppression. The committee's
//! view of an image ([`score`]) is then the members' boxes matched into objects
//! ([`sieve_shared::box_scores`]).

use burn::module::Module;
use burn::tensor::Device;
use image::RgbImage;
use sieve_shared::box_scores::{self, ImageScores, ScoredBox};
use sieve_shared::messages::PROPOSAL_THRESHOLDS;
use sieve_shared::tiles::{self, Tile};

use super::detector::{self, DetectorConfig, DetectorHeads};
use super::mobilenet::{self, MobileNetV2};
use super::tensors::{load_weights, next_part, push_part, weights_to_bytes};
use super::{ArchitectureConfig, ModelError};

/// Overlap of neighbouring tiles, in pixels: an object up to this size cut by one tile's edge
/// lies whole in its neighbour.
pub const TILE_OVERLAP: u32 = 64;
/// Boxes of members that overlap at least this much are one object (and the same box found in
/// two overlapping tiles is one box).
pub const MATCH_IOU: f32 = 0.5;
/// The committee proposes the objects whose confidence (the members' mean score) reaches this,
/// unless the project set its own ([`Detector::proposal_threshold`]).
pub const PROPOSAL_THRESHOLD: f32 = box_scores::DETECTION_PROPOSAL_THRESHOLD;
/// Objects under the proposal threshold by less than this are counted as near misses.
pub const NEAR_MISS_BAND: f32 = 0.25;
/// Each member reports peaks from this score up: low, so that what the committee is unsure it
/// saw is seen (an object every member scores at 0.2 is a likely miss, and the image's
/// confidence must say so), and so that average precision sees the whole ranking.
pub const DECODE_THRESHOLD: f32 = 0.05;

/// Every member's boxes for one image: `boxes[member][box]`, in pixels of the image.
pub type MemberBoxes = Vec<Vec<ScoredBox>>;

/// A detection model version. Immutable; share it between threads with an `Arc`.
#[derive(Clone, Debug)]
pub struct Detector {
    /// On the plain (non-autodiff) device, as the heads: what the version's weights are.
    backbone: MobileNetV2,
    /// The same backbone with its BatchNorms folded into the convolutions: what
    /// [`detect`](Self::detect) runs (8-16% faster on flex; never saved).
    folded: MobileNetV2,
    heads: DetectorHeads,
    config: ArchitectureConfig,
}

impl Detector {
    /// A detector from its backbone and heads; `config` must describe the heads.
    pub fn new(
        config: &ArchitectureConfig,
        backbone: MobileNetV2,
        heads: DetectorHeads,
    ) -> Result<Self, ModelError> {
        let fits = DetectorConfig {
            score_threshold: heads.config().score_threshold,
            ..heads_config(config)
        };
        if heads.config() != &fits {
            return Err(ModelError::InvalidConfig(format!(
                "detector heads for {:?} do not fit the version's config {config:?}",
                heads.config()
            )));
        }
        let heads = heads.decoding_from(DECODE_THRESHOLD)?;
        let device = backbone_device(&backbone)?.without_autodiff();
        let backbone = backbone.to_device(&device);
        Ok(Self {
            folded: backbone.clone().fold_batchnorm(),
            backbone,
            heads,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ArchitectureConfig {
        &self.config
    }

    /// The confidence from which this version proposes an object: its project's setting when
    /// it was trained, or [`PROPOSAL_THRESHOLD`].
    pub fn proposal_threshold(&self) -> f32 {
        self.config.proposal_threshold.unwrap_or(PROPOSAL_THRESHOLD)
    }

    /// The same version proposing from `threshold` (`None`: the default).
    pub fn with_proposal_threshold(mut self, threshold: Option<f32>) -> Result<Self, ModelError> {
        check_proposal_threshold(threshold)?;
        self.config.proposal_threshold = threshold;
        Ok(self)
    }

    pub fn backbone(&self) -> &MobileNetV2 {
        &self.backbone
    }

    /// Every member's boxes for each image, in the image's pixels: tiles of every image through
    /// the backbone and the heads, boxes mapped back and merged per member across the overlaps.
    pub fn detect(&self, images: &[RgbImage]) -> Result<Vec<MemberBoxes>, ModelError> {
        let input = self.config.input_size as u32;
        let mut pixels = Vec::new();
        let mut owners: Vec<(usize, Tile)> = Vec::new();
        for (i, image) in images.iter().enumerate() {
            let (grid, values) = tile_pixels(image, input, TILE_OVERLAP);
            pixels.extend(values);
            owners.extend(grid.into_iter().map(|tile| (i, tile)));
        }
        let mut out: Vec<MemberBoxes> = vec![vec![Vec::new(); self.config.members]; images.len()];
        if owners.is_empty() {
            return Ok(out);
        }
        let features = detector::backbone_features(&self.folded, &pixels, owners.len(), input)?;
        drop(pixels);
        let predicted = self.heads.predict(&features)?; // [tile][member][box]
        for ((image, tile), members) in owners.iter().zip(predicted) {
            for (member, boxes) in members.into_iter().enumerate() {
                out[*image][member].extend(boxes.into_iter().map(|b| on_image(tile, &b)));
            }
        }
        for (members, image) in out.iter_mut().zip(images) {
            let (width, height) = (image.width() as f32, image.height() as f32);
            for boxes in members.iter_mut() {
                // A tile padded past a small image's edge may place a box
                // there: it is clipped to the image, and dropped if nothing
                // of it is left.
                *boxes = detector::nms(std::mem::take(boxes), MATCH_IOU)
                    .into_iter()
                    .map(|b| ScoredBox {
                        x_min: b.x_min.clamp(0.0, width),
                        y_min: b.y_min.clamp(0.0, height),
                        x_max: b.x_max.clamp(0.0, width),
                        y_max: b.y_max.clamp(0.0, height),
                        ..b
                    })
                    .filter(|b| b.x_max > b.x_min && b.y_max > b.y_min)
                    .collect();
            }
        }
        Ok(out)
    }

    /// The weights as bytes: the backbone's burnpack record, then the heads', the first one's
    /// length in front as a little-endian u64. [`from_weights`](Self::from_weights) with the
    /// same config reads them back.
    pub fn weights_to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        let backbone = weights_to_bytes(&self.backbone)?;
        let heads = self.heads.weights_to_bytes()?;
        let mut out = Vec::with_capacity(8 + backbone.len() + heads.len());
        push_part(&mut out, &backbone);
        out.extend_from_slice(&heads);
        Ok(out)
    }

    /// Rebuilds a detector from [`weights_to_bytes`](Self::weights_to_bytes) output; corrupt,
    /// truncated, misshapen or non-finite weights are [`ModelError::Weights`].
    pub fn from_weights(
        config: &ArchitectureConfig,
        bytes: &[u8],
        device: &Device,
    ) -> Result<Self, ModelError> {
        validate(config)?;
        let device = device.clone().without_autodiff();
        let (backbone, heads) = next_part(bytes, "detector")?;
        let backbone = load_weights(MobileNetV2::new(&device), backbone)?;
        let heads = DetectorHeads::from_weights(&heads_config(config), heads, &device)?;
        Self::new(config, backbone, heads)
    }
}

/// The heads' config for a version's: its classes, members and input, the heads' defaults for
/// the rest.
pub fn heads_config(config: &ArchitectureConfig) -> DetectorConfig {
    DetectorConfig {
        classes: config.num_classes,
        members: config.members,
        input: config.input_size as u32,
        ..DetectorConfig::default()
    }
}

/// Checks a detector version's config.
pub fn validate(config: &ArchitectureConfig) -> Result<(), ModelError> {
    if config.arch != ArchitectureConfig::DETECTOR || config.channels != 3 {
        return Err(ModelError::InvalidConfig(format!(
            "not a detector's config: {config:?}"
        )));
    }
    check_proposal_threshold(config.proposal_threshold)?;
    heads_config(config).validate()
}

/// Checks a box committee's proposal threshold, if it has its own.
pub fn check_proposal_threshold(threshold: Option<f32>) -> Result<(), ModelError> {
    match threshold {
        Some(t) if !PROPOSAL_THRESHOLDS.contains(&t) => Err(ModelError::InvalidConfig(format!(
            "a proposal threshold of {t}: it must be {} to {}",
            PROPOSAL_THRESHOLDS.start(),
            PROPOSAL_THRESHOLDS.end()
        ))),
        _ => Ok(()),
    }
}

/// The committee's view of one image from its members' boxes: the objects it proposes (at
/// `threshold`) and how sure it is.
pub fn score(members: &[Vec<ScoredBox>], threshold: f32) -> ImageScores {
    box_scores::image_scores(members, MATCH_IOU, threshold, NEAR_MISS_BAND)
}

/// The tiles of `image` for an input of `input` pixels overlapping by `overlap`, and their
/// pixels normalized for the backbone, `[tiles, 3, input, input]`. A tile smaller than the
/// input (an image smaller than a tile) is padded with black at its right and bottom.
pub fn tile_pixels(image: &RgbImage, input: u32, overlap: u32) -> (Vec<Tile>, Vec<f32>) {
    let grid = tiles::grid(image.width(), image.height(), input, overlap);
    let mut pixels = Vec::with_capacity(grid.len() * 3 * (input * input) as usize);
    for t in &grid {
        pixels.extend(mobilenet::imagenet_normalize(&tile_of(image, t, input)));
    }
    (grid, pixels)
}

/// Tile `t` of `image` on a black canvas of `input` pixels a side.
pub fn tile_of(image: &RgbImage, t: &Tile, input: u32) -> RgbImage {
    let crop = image::imageops::crop_imm(image, t.x, t.y, t.width, t.height).to_image();
    if t.width == input && t.height == input {
        return crop;
    }
    let mut canvas = RgbImage::new(input, input);
    image::imageops::replace(&mut canvas, &crop, 0, 0);
    canvas
}

/// A box found in tile `tile`, in the image's pixels.
fn on_image(tile: &Tile, b: &ScoredBox) -> ScoredBox {
    let at = tile.to_image(b.as_box());
    ScoredBox {
        class: at.class,
        score: b.score,
        x_min: at.x_min,
        y_min: at.y_min,
        x_max: at.x_max,
        y_max: at.y_max,
    }
}

fn backbone_device(backbone: &MobileNetV2) -> Result<Device, ModelError> {
    backbone
        .devices()
        .into_iter()
        .next()
        .ok_or_else(|| ModelError::Backend("the backbone has no device".into()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_image_and_pad_the_small_one() {
        let image = RgbImage::from_pixel(500, 200, image::Rgb([255, 255, 255]));
        let (grid, pixels) = tile_pixels(&image, 128, 32);
        assert_eq!(pixels.len(), grid.len() * 3 * 128 * 128);
        assert_eq!(
            grid.last().map(|t| (t.x + t.width, t.y + t.height)),
            Some((500, 200))
        );
        let small = RgbImage::from_pixel(40, 30, image::Rgb([255, 255, 255]));
        let padded = tile_of(&small, &tiles::grid(40, 30, 64, 16)[0], 64);
        assert_eq!(padded.dimensions(), (64, 64));
        assert_eq!(padded.get_pixel(39, 29).0, [255, 255, 255]);
        assert_eq!(padded.get_pixel(40, 30).0, [0, 0, 0]);
    }

    #[test]
    fn weights_round_trip_and_truncated_weights_are_refused() {
        let config = ArchitectureConfig::detector(2, 2, 64);
        let device = Device::flex();
        let heads = detector::untrained_heads(&heads_config(&config), 5, &device).unwrap();
        let detector = Detector::new(&config, MobileNetV2::new(&device), heads).unwrap();
        let bytes = detector.weights_to_bytes().unwrap();
        let back = Detector::from_weights(&config, &bytes, &device).unwrap();
        let image = RgbImage::from_fn(100, 70, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 3) as u8, 90])
        });
        let a = detector.detect(std::slice::from_ref(&image)).unwrap();
        let b = back.detect(&[image]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0].len(), 2, "one list per member");
        assert!(matches!(
            Detector::from_weights(&config, &bytes[..bytes.len() / 2], &device),
            Err(ModelError::Weights(_))
        ));
        assert!(matches!(
            Detector::from_weights(&config, &[1, 2, 3], &device),
            Err(ModelError::Weights(_))
        ));
        let other = ArchitectureConfig::detector(3, 2, 64);
        assert!(Detector::from_weights(&other, &bytes, &device).is_err());
    }

    #[test]
    fn a_versions_proposal_threshold_travels_with_its_config() {
        let device = Device::flex();
        let plain = ArchitectureConfig::detector(1, 2, 64);
        let heads = detector::untrained_heads(&heads_config(&plain), 5, &device).unwrap();
        let bytes = Detector::new(&plain, MobileNetV2::new(&device), heads)
            .unwrap()
            .weights_to_bytes()
            .unwrap();
        // A version from before projects set thresholds: its config has none.
        let old: ArchitectureConfig =
            serde_json::from_value(serde_json::to_value(&plain).unwrap()).unwrap();
        let loaded = Detector::from_weights(&old, &bytes, &device).unwrap();
        assert_eq!(loaded.proposal_threshold(), PROPOSAL_THRESHOLD);

        let set = ArchitectureConfig {
            proposal_threshold: Some(0.4),
            ..plain.clone()
        };
        let stored = serde_json::to_value(&set).unwrap();
        let written = stored["proposal_threshold"].as_f64().unwrap();
        assert!((written - 0.4).abs() < 1e-6, "{written}");
        let back: ArchitectureConfig = serde_json::from_value(stored).unwrap();
        let loaded = Detector::from_weights(&back, &bytes, &device).unwrap();
        assert_eq!(loaded.proposal_threshold(), 0.4);
        assert_eq!(loaded.config(), &set);

        let out_of_range = ArchitectureConfig {
            proposal_threshold: Some(0.99),
            ..plain
        };
        match Detector::from_weights(&out_of_range, &bytes, &device) {
            Err(ModelError::InvalidConfig(message)) => {
                assert!(message.contains("0.1 to 0.95"), "{message}")
            }
            other => panic!("a threshold of 0.99 was not refused: {other:?}"),
        }
    }
}
