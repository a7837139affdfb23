//! The detector of the `detection` task kind: a committee of K light, single-stage heads on
//! the frozen MobileNetV2 backbone, each predicting class-labelled boxes.
//!
//! # Why CenterNet
//! Each head is CenterNet-style ("Objects as Points", Zhou et al., 2019): per class a heatmap of
//! object centres on the stride-16 feature grid, plus, at every cell, the box size and the
//! sub-cell offset of the centre. That suits sieve:
//! - anchor-free: no anchor sizes or ratios to tune per project, nothing to match in training;
//! - one peak per object: decoding is a 3x3 max-pool peak pick, a top-k and a threshold, with
//!   no NMS inside an image (cheap, and the same on CPU and GPU);
//! - stride 16 (the end of MobileNetV2's 96-channel stage) keeps cells of 16 pixels, fine
//!   enough for small objects such as tree crowns in aerial tiles, while the backbone pass
//!   skips the two deepest stages.
//!
//! # Committee
//! Like classification's heads mode ([`train_heads`](super::train_heads)), the backbone stays
//! frozen and its feature maps are computed once per image ([`backbone_features`]) and reused
//! in every epoch. The K members differ by their initialisation (a stream of the seed each) and
//! by an online bootstrap (a Poisson(1) weight per image and member on its loss), so their
//! disagreement means something. The K heads run as one pair of convolutions: a 3x3
//! convolution to `K * 64` channels and a grouped 1x1 convolution (one group per member), so
//! member `k` reads only its own hidden channels.
//!
//! # Input and tiling
//! The detector sees square images of [`DetectorConfig::input`] pixels (a multiple of 32),
//! normalized as [`mobilenet`](super::mobilenet) does. Boxes (targets and predictions alike)
//! are in pixels of that input. A larger image is the caller's to tile, with an overlap of at
//! least the largest object, and to map each tile's boxes back; boxes found twice in an overlap
//! are merged with [`nms`].
//!
//! # Targets and loss
//! Per object, a gaussian peak on its class's heatmap (the radius from the box size, as
//! CenterNet computes it), and at the centre cell the log of the width and height in cells and
//! the centre's offset inside the cell. The loss is CenterNet's penalty-reduced focal loss on
//! the heatmap plus L1 on size and offset at the centres, normalised by the number of objects.
//! Two objects whose centres fall in the same cell share one size and offset (the last one
//! wins), as in CenterNet.

use std::fmt;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, PaddingConfig2d};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::{log_sigmoid, relu, sigmoid};
use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use sieve_shared::box_scores::ScoredBox;
use sieve_shared::boxes::LabeledBox;

use super::ModelError;
use super::mobilenet::{MobileNetV2, STRIDE_16_CHANNELS};
use super::net::stream_seed;
use super::recipe::{EpochReport, bootstrap_weights, split};
use super::tensors::{load_weights, read, scalar, step_loss, weights_to_bytes};

/// Pixels per cell of the feature grid.
pub const STRIDE: usize = 16;
/// Hidden channels of each member's 3x3 convolution.
const HIDDEN: usize = 64;
/// Regression channels per member: log width, log height (in cells), offset x, offset y.
const REGRESSION: usize = 4;
/// Initial heatmap logit, `ln(0.1 / 0.9)`: every cell starts at probability 0.1 (CenterNet's
/// prior), so the focal loss of the many empty cells does not swamp the first steps.
const HEAT_PRIOR: f32 = -2.19;
/// The focal loss's exponents (CenterNet's alpha and beta).
const FOCAL_ALPHA: f32 = 2.0;
const FOCAL_BETA: i32 = 4;
/// The IoU a box shifted within the gaussian's radius still keeps (CenterNet's choice).
const MIN_OVERLAP: f32 = 0.7;
/// Bounds the predicted log size: an untrained head must not produce infinite boxes.
const MAX_LOG_SIZE: f32 = 8.0;
/// Images per backbone pass: expanded activations are ~14 MiB per 384-pixel image.
const BACKBONE_CHUNK: usize = 8;
/// Images per heads pass in inference.
const HEADS_CHUNK: usize = 64;

const INIT_STREAM: u64 = 0xDE7E;
const SHUFFLE_STREAM: u64 = 0xDE75;

/// What a detector is: its classes, committee size, input size and decoding limits. Stored next
/// to the weights, since weights alone do not say which module to load them into.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DetectorConfig {
    /// Object classes (a heatmap each).
    pub classes: usize,
    /// Committee size K (at least 2, or there is no disagreement to measure).
    pub members: usize,
    /// Side of the square input, in pixels: a multiple of 32, from 32 to 1024.
    pub input: u32,
    /// Smallest heatmap peak reported as a box, in `(0, 1)`.
    pub score_threshold: f32,
    /// Most boxes per image and member, the best-scored first.
    pub max_boxes: usize,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            classes: 1,
            members: 3,
            input: 384,
            score_threshold: 0.3,
            max_boxes: 300,
        }
    }
}

impl DetectorConfig {
    /// The defaults with `classes` classes.
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            ..Self::default()
        }
    }

    /// Side of the feature grid, in cells.
    pub fn side(&self) -> usize {
        self.input as usize / STRIDE
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let problem = if self.classes == 0 {
            Some("needs at least 1 class".to_string())
        } else if self.members < 2 {
            Some("needs at least 2 committee members".to_string())
        } else if !self.input.is_multiple_of(32) || !(32..=1024).contains(&self.input) {
            Some(format!(
                "takes a multiple of 32 from 32 to 1024 pixels, not {}",
                self.input
            ))
        } else if !(self.score_threshold > 0.0 && self.score_threshold < 1.0) {
            Some(format!(
                "needs a score threshold in (0, 1), not {}",
                self.score_threshold
            ))
        } else if self.max_boxes == 0 {
            Some("needs max_boxes of at least 1".to_string())
        } else {
            None
        };
        match problem {
            Some(problem) => Err(ModelError::InvalidConfig(format!("detector {problem}"))),
            None => Ok(()),
        }
    }
}

/// The four corners of a box, in one array.
trait Corners {
    fn corners(&self) -> [f32; 4];
}

impl Corners for ScoredBox {
    fn corners(&self) -> [f32; 4] {
        [self.x_min, self.y_min, self.x_max, self.y_max]
    }
}

impl Corners for LabeledBox {
    fn corners(&self) -> [f32; 4] {
        [self.x_min, self.y_min, self.x_max, self.y_max]
    }
}

/// Boxes per image, per member: `boxes[image][member][box]`, each member's best-scored first.
pub type CommitteeBoxes = Vec<Vec<Vec<ScoredBox>>>;

/// Intersection over union of two boxes; 0 when either is empty.
pub fn iou(a: &ScoredBox, b: &ScoredBox) -> f32 {
    overlap(a.corners(), b.corners())
}

fn overlap(a: [f32; 4], b: [f32; 4]) -> f32 {
    let width = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let height = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let intersection = width * height;
    let area = |r: [f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - intersection;
    if union > 0.0 {
        intersection / union
    } else {
        0.0
    }
}

/// Greedy non-maximum suppression per class: the best-scored box stays, and every box of its
/// class overlapping it by more than `iou_threshold` goes. For merging the boxes of
/// overlapping tiles (within one image the heatmap peaks are already one per object).
/// Returns the kept boxes, best-scored first.
pub fn nms(mut boxes: Vec<ScoredBox>, iou_threshold: f32) -> Vec<ScoredBox> {
    boxes.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<ScoredBox> = Vec::with_capacity(boxes.len());
    for candidate in boxes {
        let suppressed = kept
            .iter()
            .any(|k| k.class == candidate.class && iou(k, &candidate) > iou_threshold);
        if !suppressed {
            kept.push(candidate);
        }
    }
    kept
}

/// How predicted boxes match labelled ones (see [`match_boxes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Matches {
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
}

impl Matches {
    /// Share of predicted boxes that match a labelled one (1 when nothing was predicted).
    pub fn precision(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_positives,
        )
    }

    /// Share of labelled boxes found (1 when there was nothing to find).
    pub fn recall(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_negatives,
        )
    }

    /// Harmonic mean of precision and recall (1 when nothing was predicted or to find).
    pub fn f1(&self) -> f64 {
        ratio(
            2 * self.true_positives,
            2 * self.true_positives + self.false_positives + self.false_negatives,
        )
    }

    fn add(&mut self, other: Self) {
        self.true_positives += other.true_positives;
        self.false_positives += other.false_positives;
        self.false_negatives += other.false_negatives;
    }
}

fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        1.0
    } else {
        part as f64 / whole as f64
    }
}

/// Matches one image's predictions to its labelled boxes greedily, best score first: a
/// prediction is a true positive when a not yet matched labelled box of its class overlaps it
/// by at least `iou_threshold` (0.5 is the usual choice).
pub fn match_boxes(predicted: &[ScoredBox], truth: &[LabeledBox], iou_threshold: f32) -> Matches {
    let mut order: Vec<&ScoredBox> = predicted.iter().collect();
    order.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut taken = vec![false; truth.len()];
    let mut matches = Matches::default();
    for prediction in order {
        let best = truth
            .iter()
            .enumerate()
            .filter(|(i, t)| !taken[*i] && t.class == prediction.class)
            .map(|(i, t)| (i, overlap(prediction.corners(), t.corners())))
            .filter(|&(_, overlap)| overlap >= iou_threshold)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((i, _)) => {
                taken[i] = true;
                matches.true_positives += 1;
            }
            None => matches.false_positives += 1,
        }
    }
    matches.false_negatives = taken.iter().filter(|&&t| !t).count();
    matches
}

/// Stride-16 feature maps of the frozen backbone, computed once per image
/// ([`backbone_features`]) and reused in every epoch, like the embeddings of heads mode.
#[derive(Clone, PartialEq)]
pub struct FeatureMaps {
    /// `[images, channels, side, side]`, row-major.
    values: Vec<f32>,
    images: usize,
    channels: usize,
    side: usize,
}

impl fmt::Debug for FeatureMaps {
    /// The shape only: the values run to hundreds of thousands per image.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeatureMaps")
            .field("images", &self.images)
            .field("channels", &self.channels)
            .field("side", &self.side)
            .finish_non_exhaustive()
    }
}

impl FeatureMaps {
    /// Feature maps from their values (`[images, channels, side, side]`, as
    /// [`values`](Self::values) gives them, say after a round trip through a cache); every
    /// value must be finite.
    pub fn new(
        values: Vec<f32>,
        images: usize,
        channels: usize,
        side: usize,
    ) -> Result<Self, ModelError> {
        let expected = images
            .checked_mul(channels)
            .and_then(|v| v.checked_mul(side))
            .and_then(|v| v.checked_mul(side))
            .ok_or_else(|| ModelError::bad_input("feature maps too large"))?;
        if values.len() != expected {
            return Err(ModelError::bad_input(format!(
                "expected {images} feature maps of {channels}x{side}x{side} ({expected} values), \
                 got {} values",
                values.len()
            )));
        }
        if let Some(position) = values.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::bad_input(format!(
                "non-finite feature value at index {position}"
            )));
        }
        Ok(Self {
            values,
            images,
            channels,
            side,
        })
    }

    pub fn images(&self) -> usize {
        self.images
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Side of each map, in cells (the input's side / [`STRIDE`]).
    pub fn side(&self) -> usize {
        self.side
    }

    /// `[images, channels, side, side]`, row-major.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub fn into_values(self) -> Vec<f32> {
        self.values
    }

    fn image_len(&self) -> usize {
        self.channels * self.side * self.side
    }

    /// The maps of `indices`, in that order.
    fn select(&self, indices: &[usize]) -> Self {
        let len = self.image_len();
        let mut values = Vec::with_capacity(indices.len() * len);
        for &i in indices {
            values.extend_from_slice(&self.values[i * len..(i + 1) * len]);
        }
        Self {
            values,
            images: indices.len(),
            ..*self
        }
    }

    /// # Shapes
    /// - returns `[indices.len(), channels, side, side]` on `device`
    fn tensor(&self, indices: &[usize], device: &Device) -> Tensor<4> {
        let selected = self.select(indices);
        let shape = [indices.len(), self.channels, self.side, self.side];
        Tensor::from_data(TensorData::new(selected.values, shape), device)
    }
}

/// The frozen backbone's stride-16 feature maps ([`MobileNetV2::stride16_features`]) of `batch`
/// square images of `input` pixels: `images` holds `batch * 3 * input * input` values,
/// normalized as [`mobilenet`](super::mobilenet) does, layout `[batch, 3, input, input]`.
/// Runs on the backbone's device, a few images at a time.
pub fn backbone_features(
    backbone: &MobileNetV2,
    images: &[f32],
    batch: usize,
    input: u32,
) -> Result<FeatureMaps, ModelError> {
    let side = input as usize;
    if !input.is_multiple_of(32) || input == 0 {
        return Err(ModelError::bad_input(format!(
            "the detector takes a multiple of 32 pixels, not {input}"
        )));
    }
    let image_len = 3 * side * side;
    if Some(images.len()) != batch.checked_mul(image_len) {
        return Err(ModelError::bad_input(format!(
            "expected {batch} images of 3x{side}x{side} values, got {} values",
            images.len()
        )));
    }
    if let Some(position) = images.iter().position(|v| !v.is_finite()) {
        return Err(ModelError::bad_input(format!(
            "non-finite pixel value at index {position}"
        )));
    }
    let device = backbone
        .devices()
        .into_iter()
        .next()
        .ok_or_else(|| ModelError::Backend("the backbone has no device".into()))?;
    let cells = side / STRIDE;
    let mut values = Vec::with_capacity(batch * STRIDE_16_CHANNELS * cells * cells);
    for chunk in images.chunks(BACKBONE_CHUNK * image_len) {
        let n = chunk.len() / image_len;
        let x =
            Tensor::<4>::from_data(TensorData::new(chunk.to_vec(), [n, 3, side, side]), &device);
        values.extend(read(backbone.stride16_features(x))?); // [n, 96, side/16, side/16]
    }
    FeatureMaps::new(values, batch, STRIDE_16_CHANNELS, cells)
}

/// The K heads as one module. Field names are the keys in saved weights.
#[derive(Module, Debug)]
struct HeadsNet {
    /// 3x3, `channels -> K * HIDDEN`: member `k` owns output channels `k * HIDDEN..`.
    hidden: Conv2d,
    /// 1x1 with K groups, `K * HIDDEN -> K * (classes + 4)`: member `k` reads its own hidden
    /// channels and writes `classes` heatmap logits, then log width, log height, offset x and
    /// offset y.
    output: Conv2d,
}

impl HeadsNet {
    /// Fresh weights: member `k` draws from its own stream of `seed`, so the members differ and
    /// adding one leaves the others unchanged.
    fn init(config: &DetectorConfig, channels: usize, seed: u64, device: &Device) -> Self {
        let (members, width) = (config.members, config.classes + REGRESSION);
        let mut hidden = Conv2dConfig::new([channels, members * HIDDEN], [3, 3])
            .with_padding(PaddingConfig2d::Same)
            .with_initializer(Initializer::Zeros)
            .init(device);
        let mut output = Conv2dConfig::new([members * HIDDEN, members * width], [1, 1])
            .with_groups(members)
            .with_initializer(Initializer::Zeros)
            .init(device);
        let (mut hidden_w, mut hidden_b, mut output_w, mut output_b) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for k in 0..members {
            let mut rng =
                StdRng::seed_from_u64(stream_seed(stream_seed(seed, INIT_STREAM), k as u64));
            let bound = 1.0 / ((channels * 9) as f32).sqrt();
            hidden_w.extend((0..HIDDEN * channels * 9).map(|_| rng.random_range(-bound..=bound)));
            hidden_b.extend((0..HIDDEN).map(|_| rng.random_range(-bound..=bound)));
            let bound = 1.0 / (HIDDEN as f32).sqrt();
            output_w.extend((0..width * HIDDEN).map(|_| rng.random_range(-bound..=bound)));
            output_b.extend((0..width).map(|c| if c < config.classes { HEAT_PRIOR } else { 0.0 }));
        }
        hidden.weight = param(hidden_w, [members * HIDDEN, channels, 3, 3], device);
        hidden.bias = Some(param(hidden_b, [members * HIDDEN], device));
        output.weight = param(output_w, [members * width, HIDDEN, 1, 1], device);
        output.bias = Some(param(output_b, [members * width], device));
        Self { hidden, output }
    }

    /// Heatmap logits and regression maps of every member.
    ///
    /// # Shapes
    /// - `features`: `[batch, channels, s, s]`
    /// - returns (`[batch, K, classes, s * s]`, `[batch, K, 4, s * s]`)
    fn forward(&self, features: Tensor<4>, config: &DetectorConfig) -> (Tensor<4>, Tensor<4>) {
        let [batch, _, side, _] = features.dims();
        let out = self.output.forward(relu(self.hidden.forward(features))); // [batch, K * (classes + 4), s, s]
        let out: Tensor<4> = out.reshape([
            batch,
            config.members,
            config.classes + REGRESSION,
            side * side,
        ]);
        let heat = out.clone().narrow(2, 0, config.classes);
        let regression = out.narrow(2, config.classes, REGRESSION);
        (heat, regression)
    }
}

/// A trained committee of K detection heads, on the plain (non-autodiff) device. Immutable;
/// share it between threads with an `Arc`.
#[derive(Clone, Debug)]
pub struct DetectorHeads {
    net: HeadsNet,
    config: DetectorConfig,
    /// Channels of the feature maps the heads read.
    channels: usize,
    device: Device,
}

impl DetectorHeads {
    pub fn config(&self) -> &DetectorConfig {
        &self.config
    }

    /// The same heads decoding every peak from `threshold` up (weights do
    /// not depend on it; training picks epochs at the config's own).
    pub fn decoding_from(mut self, threshold: f32) -> Result<Self, ModelError> {
        self.config.score_threshold = threshold;
        self.config.validate()?;
        Ok(self)
    }

    /// Every member's boxes for every image: `out[image][member][box]`, in pixels of the input,
    /// best-scored first, at most [`max_boxes`](DetectorConfig::max_boxes) each.
    pub fn predict(&self, features: &FeatureMaps) -> Result<CommitteeBoxes, ModelError> {
        self.check_features(features)?;
        let (members, classes) = (self.config.members, self.config.classes);
        let cells = features.side * features.side;
        let mut out = Vec::with_capacity(features.images);
        let all: Vec<usize> = (0..features.images).collect();
        for chunk in all.chunks(HEADS_CHUNK) {
            let (heat, regression) = self
                .net
                .forward(features.tensor(chunk, &self.device), &self.config);
            let heat = read(sigmoid(heat))?; // [n, K, classes, s * s]
            let regression = read(regression)?; // [n, K, 4, s * s]
            for (heat, regression) in heat
                .chunks(members * classes * cells)
                .zip(regression.chunks(members * REGRESSION * cells))
            {
                out.push(
                    heat.chunks(classes * cells)
                        .zip(regression.chunks(REGRESSION * cells))
                        .map(|(heat, regression)| {
                            decode(heat, regression, features.side, &self.config)
                        })
                        .collect(),
                );
            }
        }
        Ok(out)
    }

    /// The weights as burnpack bytes; [`from_weights`](Self::from_weights) with the same config
    /// reads them back.
    pub fn weights_to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        weights_to_bytes(&self.net)
    }

    /// Rebuilds heads for the backbone's stride-16 features from
    /// [`weights_to_bytes`](Self::weights_to_bytes) output. Corrupt bytes, weights of another
    /// shape (other classes or members) and non-finite weights are [`ModelError::Weights`].
    pub fn from_weights(
        config: &DetectorConfig,
        bytes: &[u8],
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::load(config, STRIDE_16_CHANNELS, bytes, device)
    }

    fn load(
        config: &DetectorConfig,
        channels: usize,
        bytes: &[u8],
        device: &Device,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let device = device.clone().without_autodiff();
        let net = load_weights(HeadsNet::init(config, channels, 0, &device), bytes)?;
        Ok(Self {
            net,
            config: config.clone(),
            channels,
            device,
        })
    }

    fn check_features(&self, features: &FeatureMaps) -> Result<(), ModelError> {
        if features.channels != self.channels || features.side != self.config.side() {
            return Err(ModelError::bad_input(format!(
                "heads for {}-channel maps of {} cells cannot read {}-channel maps of {} cells",
                self.channels,
                self.config.side(),
                features.channels,
                features.side
            )));
        }
        Ok(())
    }
}

/// Heads with fresh, untrained weights for the backbone's stride-16 features, deterministic for
/// `seed` (the shape to load weights into, or a detector that knows nothing yet).
pub fn untrained_heads(
    config: &DetectorConfig,
    seed: u64,
    device: &Device,
) -> Result<DetectorHeads, ModelError> {
    config.validate()?;
    let device = device.clone().without_autodiff();
    Ok(DetectorHeads {
        net: HeadsNet::init(config, STRIDE_16_CHANNELS, seed, &device),
        config: config.clone(),
        channels: STRIDE_16_CHANNELS,
        device,
    })
}

/// Options of [`train_heads`].
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Upper bound on passes over the training split (early stopping may end sooner).
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW's learning rate.
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Seeds the initialisation, the validation split, the bootstrap weights and the shuffling.
    pub seed: u64,
    /// Share of the images held out for early stopping, in `[0, 1)`; 0 (or too few images to
    /// hold [`MIN_VALIDATION_TILES`] out) trains on everything and keeps the last epoch.
    pub validation_share: f64,
    /// Epochs in a row without a lower validation loss before training stops; 0 counts as 1.
    pub patience: usize,
}

/// Fewest validation tiles early stopping runs on; with fewer, training uses them too and runs
/// every epoch. (A run on about 40 boxed canvases held 4 out, and stopped on their loss
/// anywhere from the 10th epoch on: its recall at the proposal threshold ranged 0.23-0.66.)
pub const MIN_VALIDATION_TILES: usize = 16;

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 60,
            batch_size: 16,
            learning_rate: 3e-3,
            weight_decay: 1e-4,
            seed: 0,
            validation_share: 0.1,
            patience: 8,
        }
    }
}

impl TrainOptions {
    fn validate(&self) -> Result<(), ModelError> {
        let problem = if self.batch_size == 0 {
            Some("batch_size must be at least 1")
        } else if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            Some("learning_rate must be positive and finite")
        } else if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            Some("weight_decay must be non-negative and finite")
        } else if !(0.0..1.0).contains(&self.validation_share) {
            Some("validation_share must be within [0, 1)")
        } else {
            None
        };
        match problem {
            Some(reason) => Err(ModelError::InvalidOptions(reason.to_string())),
            None => Ok(()),
        }
    }
}

/// What a [`train_heads`] run did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainReport {
    /// Epochs run.
    pub epochs: usize,
    /// Mean training loss of the last epoch (per object and member).
    pub loss: f64,
    /// The kept epoch's validation F1 at IoU 0.5 (mean over members); `None` without a
    /// validation split, when the last epoch is kept.
    pub val_f1: Option<f64>,
    /// The epoch whose heads were kept.
    pub best_epoch: usize,
}

/// Trains K fresh heads on cached feature maps and per-image labelled boxes (`targets[i]` for
/// image `i`, in pixels of the input; boxes reaching past the input are clipped to it) and
/// returns the best epoch's heads (lowest validation loss), on the plain version of `device`.
///
/// `on_epoch` sees each epoch's report: its `loss` is this module's loss (per object and
/// member), its `val_accuracy` the validation F1 at IoU 0.5 (mean over members); returning
/// false cancels the run with [`ModelError::Cancelled`]. Feature maps and targets that do not
/// fit the config are [`ModelError::BadInput`]; no images at all, [`ModelError::NotEnoughData`].
pub fn train_heads(
    features: &FeatureMaps,
    targets: &[Vec<LabeledBox>],
    config: &DetectorConfig,
    options: &TrainOptions,
    device: &Device,
    mut on_epoch: impl FnMut(&EpochReport) -> bool,
) -> Result<(DetectorHeads, TrainReport), ModelError> {
    config.validate()?;
    options.validate()?;
    let n = features.images;
    if targets.len() != n {
        return Err(ModelError::bad_input(format!(
            "{n} feature maps but targets for {} images",
            targets.len()
        )));
    }
    if features.side != config.side() {
        return Err(ModelError::bad_input(format!(
            "{}-pixel input needs maps of {} cells, not {}",
            config.input,
            config.side(),
            features.side
        )));
    }
    if n == 0 {
        return Err(ModelError::NotEnoughData("no images to train on".into()));
    }
    let encoded = targets
        .iter()
        .map(|boxes| encode(boxes, config))
        .collect::<Result<Vec<_>, _>>()?;
    let plain = device.clone().without_autodiff();
    let train_device = plain.clone().autodiff();
    let (mut train_set, mut val_set) = split(n, options.validation_share, options.seed)?;
    if val_set.len() < MIN_VALIDATION_TILES {
        // A loss on a handful of tiles picks its best epoch by chance, often an early one:
        // train on everything for every epoch instead.
        train_set.append(&mut val_set);
    }
    let bootstrap = bootstrap_weights(n, config.members, options.seed);
    let val_features = features.select(&val_set);

    let mut net = HeadsNet::init(config, features.channels, options.seed, &plain).train();
    let mut optimizer = AdamWConfig::new()
        .with_weight_decay(options.weight_decay as f32)
        .init();
    let mut order = train_set;
    let mut best: Option<(Validation, usize, HeadsNet)> = None;
    let mut since_best = 0;
    let mut report = TrainReport {
        epochs: 0,
        loss: 0.0,
        val_f1: None,
        best_epoch: 0,
    };
    for epoch in 1..=options.epochs {
        let mut rng = StdRng::seed_from_u64(stream_seed(
            stream_seed(options.seed, SHUFFLE_STREAM),
            epoch as u64,
        ));
        order.shuffle(&mut rng);
        let (mut loss_sum, mut weight_sum) = (0.0_f64, 0.0_f64);
        for batch in order.chunks(options.batch_size) {
            let weights: Vec<f32> = batch
                .iter()
                .flat_map(|&i| bootstrap.iter().map(move |member| member[i]))
                .collect();
            if weights.iter().all(|&w| w == 0.0) {
                // Every member left all of these images out of its bootstrap sample.
                continue;
            }
            let batch_targets = BatchTargets::new(batch, &encoded, weights, config);
            let normaliser = batch_targets.objects.max(1.0);
            let x = features.tensor(batch, &train_device);
            let loss = batch_loss(&net, x, batch_targets, config, &train_device);
            let value = step_loss(&loss, epoch)?;
            loss_sum += f64::from(value * normaliser);
            weight_sum += f64::from(normaliser);
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            net = optimizer.step(options.learning_rate, net, grads);
        }
        report.epochs = epoch;
        report.loss = if weight_sum > 0.0 {
            loss_sum / weight_sum
        } else {
            0.0
        };
        if val_set.is_empty() {
            report.best_epoch = epoch;
            if !on_epoch(&EpochReport {
                epoch,
                loss: report.loss,
                val_accuracy: None,
            }) {
                return Err(ModelError::Cancelled);
            }
            continue;
        }
        let heads = DetectorHeads {
            net: net.valid(),
            config: config.clone(),
            channels: features.channels,
            device: plain.clone(),
        };
        let validation = validate(&heads, &val_features, &val_set, &encoded, targets)?;
        if !on_epoch(&EpochReport {
            epoch,
            loss: report.loss,
            val_accuracy: Some(validation.f1),
        }) {
            return Err(ModelError::Cancelled);
        }
        if best
            .as_ref()
            .is_none_or(|(b, _, _)| validation.better_than(b))
        {
            best = Some((validation, epoch, heads.net));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= options.patience.max(1) {
                break;
            }
        }
    }
    let net = match best {
        Some((validation, epoch, net)) => {
            report.val_f1 = Some(validation.f1);
            report.best_epoch = epoch;
            net
        }
        None => net.valid(),
    };
    Ok((
        DetectorHeads {
            net,
            config: config.clone(),
            channels: features.channels,
            device: plain,
        },
        report,
    ))
}

/// How the heads do on the validation split.
#[derive(Clone, Copy, Debug)]
struct Validation {
    /// F1 at IoU 0.5, mean over members.
    f1: f64,
    /// The training loss, every member weighted 1.
    loss: f64,
}

impl Validation {
    /// By the loss, not the F1: on the few images of a validation split the F1 moves in coarse
    /// steps and picks a lucky early epoch (on the synthetic test, held-out recall 0.85 when
    /// choosing by F1, 0.90 by loss).
    fn better_than(&self, other: &Self) -> bool {
        self.loss < other.loss
    }
}

fn validate(
    heads: &DetectorHeads,
    features: &FeatureMaps,
    indices: &[usize],
    encoded: &[Targets],
    targets: &[Vec<LabeledBox>],
) -> Result<Validation, ModelError> {
    let config = &heads.config;
    let predicted = heads.predict(features)?;
    let mut f1 = 0.0;
    for member in 0..config.members {
        let mut matches = Matches::default();
        for (boxes, &i) in predicted.iter().zip(indices) {
            matches.add(match_boxes(&boxes[member], &targets[i], 0.5));
        }
        f1 += matches.f1() / config.members as f64;
    }
    let all: Vec<usize> = (0..features.images).collect();
    let mut loss_sum = 0.0_f64;
    let mut weight_sum = 0.0_f64;
    for chunk in all.chunks(HEADS_CHUNK) {
        let images: Vec<usize> = chunk.iter().map(|&j| indices[j]).collect();
        let batch = BatchTargets::new(
            &images,
            encoded,
            vec![1.0; images.len() * config.members],
            config,
        );
        let normaliser = batch.objects.max(1.0);
        let value = scalar(&batch_loss(
            &heads.net,
            features.tensor(chunk, &heads.device),
            batch,
            config,
            &heads.device,
        ))?;
        loss_sum += f64::from(value * normaliser);
        weight_sum += f64::from(normaliser);
    }
    Ok(Validation {
        f1,
        loss: loss_sum / weight_sum.max(1.0),
    })
}

/// One image's training targets on the feature grid.
#[derive(Clone, Debug)]
struct Targets {
    /// `[classes, s, s]`: 1 at each object's centre cell, a gaussian around it, 0 elsewhere.
    heat: Vec<f32>,
    /// `[4, s, s]`: log width and height in cells, and the centre's offset in its cell; set
    /// at centre cells only.
    regression: Vec<f32>,
    /// `[s, s]`: 1 at centre cells.
    centres: Vec<f32>,
    /// Objects (centre cells) in the image.
    objects: usize,
}

/// Encodes one image's boxes (clipped to the input; boxes left empty by that are dropped).
fn encode(boxes: &[LabeledBox], config: &DetectorConfig) -> Result<Targets, ModelError> {
    let (classes, side) = (config.classes, config.side());
    let cells = side * side;
    let mut targets = Targets {
        heat: vec![0.0; classes * cells],
        regression: vec![0.0; REGRESSION * cells],
        centres: vec![0.0; cells],
        objects: 0,
    };
    let limit = config.input as f32;
    for b in boxes {
        if !b.corners().iter().all(|v| v.is_finite()) || b.x_min >= b.x_max || b.y_min >= b.y_max {
            return Err(ModelError::bad_input(format!("not a box: {b:?}")));
        }
        if b.class as usize >= classes {
            return Err(ModelError::bad_input(format!(
                "class {} is out of range for {classes} classes",
                b.class
            )));
        }
        let [x_min, y_min, x_max, y_max] = b.corners().map(|v| v.clamp(0.0, limit));
        if x_max <= x_min || y_max <= y_min {
            continue;
        }
        let stride = STRIDE as f32;
        let (width, height) = ((x_max - x_min) / stride, (y_max - y_min) / stride);
        let (cx, cy) = (
            (x_min + x_max) / 2.0 / stride,
            (y_min + y_max) / 2.0 / stride,
        );
        let col = (cx.floor() as usize).min(side - 1);
        let row = (cy.floor() as usize).min(side - 1);
        let radius = gaussian_radius(width, height).max(0.0) as usize;
        let sigma = (2 * radius + 1) as f32 / 6.0;
        let heat = &mut targets.heat[b.class as usize * cells..(b.class as usize + 1) * cells];
        for y in row.saturating_sub(radius)..=(row + radius).min(side - 1) {
            for x in col.saturating_sub(radius)..=(col + radius).min(side - 1) {
                let (dx, dy) = (x as f32 - col as f32, y as f32 - row as f32);
                let value = (-(dx * dx + dy * dy) / (2.0 * sigma * sigma)).exp();
                let cell = &mut heat[y * side + x];
                *cell = cell.max(value);
            }
        }
        let centre = row * side + col;
        if targets.centres[centre] == 0.0 {
            targets.objects += 1;
        }
        targets.centres[centre] = 1.0;
        for (channel, value) in [width.ln(), height.ln(), cx - col as f32, cy - row as f32]
            .into_iter()
            .enumerate()
        {
            targets.regression[channel * cells + centre] = value;
        }
    }
    Ok(targets)
}

/// CenterNet's gaussian radius for a `width` x `height` object (in cells): the largest corner
/// shift that keeps an IoU of [`MIN_OVERLAP`] with the box, the smallest of three cases.
/// Kept as CenterNet (and CornerNet) compute it, quirks included, since the loss was tuned
/// with it.
fn gaussian_radius(width: f32, height: f32) -> f32 {
    let (sum, area) = (width + height, width * height);
    let b1 = sum;
    let c1 = area * (1.0 - MIN_OVERLAP) / (1.0 + MIN_OVERLAP);
    let r1 = (b1 + (b1 * b1 - 4.0 * c1).sqrt()) / 2.0;
    let b2 = 2.0 * sum;
    let c2 = (1.0 - MIN_OVERLAP) * area;
    let r2 = (b2 + (b2 * b2 - 16.0 * c2).sqrt()) / 2.0;
    let a3 = 4.0 * MIN_OVERLAP;
    let b3 = -2.0 * MIN_OVERLAP * sum;
    let c3 = (MIN_OVERLAP - 1.0) * area;
    let r3 = (b3 + (b3 * b3 - 4.0 * a3 * c3).sqrt()) / 2.0;
    r1.min(r2).min(r3)
}

/// Boxes of one image and member: heatmap peaks (cells at least as high as their 3x3
/// neighbourhood, a 3x3 max-pool) at or above the threshold, best first, at most `max_boxes`,
/// with the size and offset read at the peak, clipped to the input.
///
/// `heat`: probabilities `[classes, s, s]`; `regression`: `[4, s, s]`.
fn decode(
    heat: &[f32],
    regression: &[f32],
    side: usize,
    config: &DetectorConfig,
) -> Vec<ScoredBox> {
    let cells = side * side;
    let mut peaks: Vec<(f32, usize, usize)> = Vec::new(); // (score, class, cell)
    for (class, map) in heat.chunks(cells).enumerate() {
        for row in 0..side {
            for col in 0..side {
                let score = map[row * side + col];
                if score < config.score_threshold {
                    continue;
                }
                let is_peak = (row.saturating_sub(1)..=(row + 1).min(side - 1)).all(|y| {
                    (col.saturating_sub(1)..=(col + 1).min(side - 1))
                        .all(|x| map[y * side + x] <= score)
                });
                if is_peak {
                    peaks.push((score, class, row * side + col));
                }
            }
        }
    }
    peaks.sort_by(|a, b| b.0.total_cmp(&a.0));
    peaks.truncate(config.max_boxes);
    let (stride, limit) = (STRIDE as f32, config.input as f32);
    peaks
        .into_iter()
        .map(|(score, class, cell)| {
            let at = |channel: usize| regression[channel * cells + cell];
            let width = at(0).clamp(-MAX_LOG_SIZE, MAX_LOG_SIZE).exp() * stride;
            let height = at(1).clamp(-MAX_LOG_SIZE, MAX_LOG_SIZE).exp() * stride;
            let cx = ((cell % side) as f32 + at(2)) * stride;
            let cy = ((cell / side) as f32 + at(3)) * stride;
            let clip = |v: f32| v.clamp(0.0, limit);
            ScoredBox {
                class: class as u32,
                score,
                x_min: clip(cx - width / 2.0),
                y_min: clip(cy - height / 2.0),
                x_max: clip(cx + width / 2.0),
                y_max: clip(cy + height / 2.0),
            }
        })
        .collect()
}

/// One batch's targets as flat buffers, ready to become tensors.
struct BatchTargets {
    /// `[batch, classes, s * s]`: 1 at centres.
    positives: Vec<f32>,
    /// `[batch, classes, s * s]`: the focal loss's `(1 - heat)^4` away from centres, 0 at them.
    negatives: Vec<f32>,
    /// `[batch, 4, s * s]`.
    regression: Vec<f32>,
    /// `[batch, s * s]`.
    centres: Vec<f32>,
    /// `[batch, K]`: each member's bootstrap weight of each image.
    weights: Vec<f32>,
    /// Objects weighted by the members' weights: the loss's normaliser.
    objects: f32,
    batch: usize,
}

impl BatchTargets {
    fn new(
        batch: &[usize],
        encoded: &[Targets],
        weights: Vec<f32>,
        config: &DetectorConfig,
    ) -> Self {
        let cells = config.side() * config.side();
        let members = config.members;
        let mut targets = Self {
            positives: Vec::with_capacity(batch.len() * config.classes * cells),
            negatives: Vec::with_capacity(batch.len() * config.classes * cells),
            regression: Vec::with_capacity(batch.len() * REGRESSION * cells),
            centres: Vec::with_capacity(batch.len() * cells),
            objects: 0.0,
            weights,
            batch: batch.len(),
        };
        for (row, &i) in batch.iter().enumerate() {
            let image = &encoded[i];
            for &heat in &image.heat {
                let centre = heat >= 1.0;
                targets.positives.push(if centre { 1.0 } else { 0.0 });
                targets.negatives.push(if centre {
                    0.0
                } else {
                    (1.0 - heat).powi(FOCAL_BETA)
                });
            }
            targets.regression.extend_from_slice(&image.regression);
            targets.centres.extend_from_slice(&image.centres);
            let weight: f32 = targets.weights[row * members..(row + 1) * members]
                .iter()
                .sum();
            targets.objects += weight * image.objects as f32;
        }
        targets
    }
}

/// The batch's loss, summed over members (each image weighted by each member's bootstrap
/// weight) and divided by the weighted number of objects: penalty-reduced focal loss on the
/// heatmaps plus L1 on size and offset at the centres.
///
/// # Shapes
/// - `features`: `[batch, channels, s, s]` on `device`
/// - returns `[1]`
fn batch_loss(
    net: &HeadsNet,
    features: Tensor<4>,
    targets: BatchTargets,
    config: &DetectorConfig,
    device: &Device,
) -> Tensor<1> {
    let (batch, members, classes) = (targets.batch, config.members, config.classes);
    let cells = config.side() * config.side();
    let normaliser = targets.objects.max(1.0);
    let tensor = |values: Vec<f32>, shape: [usize; 4]| {
        Tensor::<4>::from_data(TensorData::new(values, shape), device)
    };
    let heat_shape = [batch, members, classes, cells];
    let regression_shape = [batch, members, REGRESSION, cells];
    let weights = tensor(targets.weights, [batch, members, 1, 1]);
    let positives = tensor(targets.positives, [batch, 1, classes, cells]).expand(heat_shape);
    let negatives = tensor(targets.negatives, [batch, 1, classes, cells]).expand(heat_shape);
    let wanted = tensor(targets.regression, [batch, 1, REGRESSION, cells]).expand(regression_shape);
    let centres = tensor(targets.centres, [batch, 1, 1, cells]).expand(regression_shape);

    let (logits, regression) = net.forward(features, config);
    let p = sigmoid(logits.clone());
    let focal = positives
        * p.clone().neg().add_scalar(1.0).powf_scalar(FOCAL_ALPHA)
        * log_sigmoid(logits.clone())
        + negatives * p.powf_scalar(FOCAL_ALPHA) * log_sigmoid(logits.neg());
    let focal = focal * weights.clone().expand(heat_shape);
    let l1 = (regression - wanted).abs() * centres * weights.expand(regression_shape);
    (l1.sum() - focal.sum()).div_scalar(normaliser)
}

fn param<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Param<Tensor<D>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// Input side of the synthetic scenes (8x8 cells).
    const SCENE: usize = 128;
    /// Side of the pixel blocks [`block_features`] averages.
    const BLOCK: usize = 4;

    fn scene_config() -> DetectorConfig {
        DetectorConfig {
            classes: 2,
            members: 3,
            input: SCENE as u32,
            ..DetectorConfig::default()
        }
    }

    fn target(class: u32, x_min: f32, y_min: f32, x_max: f32, y_max: f32) -> LabeledBox {
        LabeledBox {
            class,
            x_min,
            y_min,
            x_max,
            y_max,
        }
    }

    fn scored(class: u32, score: f32, corners: [f32; 4]) -> ScoredBox {
        ScoredBox {
            class,
            score,
            x_min: corners[0],
            y_min: corners[1],
            x_max: corners[2],
            y_max: corners[3],
        }
    }

    /// Random boxes of `classes` classes on a `side`-pixel input, none overlapping another
    /// and no two centres in one cell (where targets cannot tell objects apart).
    fn random_boxes(
        rng: &mut StdRng,
        count: usize,
        sizes: std::ops::RangeInclusive<usize>,
        classes: u32,
        side: usize,
    ) -> Vec<LabeledBox> {
        let mut boxes: Vec<LabeledBox> = Vec::new();
        for _ in 0..count * 100 {
            if boxes.len() == count {
                break;
            }
            let (w, h) = (
                rng.random_range(sizes.clone()),
                rng.random_range(sizes.clone()),
            );
            let (x, y) = (
                rng.random_range(0..=side - w),
                rng.random_range(0..=side - h),
            );
            let candidate = target(
                rng.random_range(0..classes),
                x as f32,
                y as f32,
                (x + w) as f32,
                (y + h) as f32,
            );
            let cell = |b: &LabeledBox| {
                let c = |lo: f32, hi: f32| ((lo + hi) / 2.0 / STRIDE as f32).floor() as usize;
                (c(b.x_min, b.x_max), c(b.y_min, b.y_max))
            };
            let apart = boxes.iter().all(|b| {
                let margin = [b.x_min - 2.0, b.y_min - 2.0, b.x_max + 2.0, b.y_max + 2.0];
                overlap(margin, candidate.corners()) == 0.0 && cell(b) != cell(&candidate)
            });
            if apart {
                boxes.push(candidate);
            }
        }
        boxes
    }

    /// Synthetic scenes, `[n, 3, 128, 128]`: 1 to 3 squares of 14 to 40 pixels on uniform
    /// noise, a class-0 square bright in the red channel, a class-1 square in the green one.
    fn scenes(n: usize, seed: u64) -> (Vec<f32>, Vec<Vec<LabeledBox>>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let plane = SCENE * SCENE;
        let mut images = Vec::with_capacity(n * 3 * plane);
        let mut targets = Vec::with_capacity(n);
        for _ in 0..n {
            let count = rng.random_range(1..=3);
            let boxes = random_boxes(&mut rng, count, 14..=40, 2, SCENE);
            let start = images.len();
            images.extend((0..3 * plane).map(|_| rng.random_range(-0.3_f32..0.3)));
            let image = &mut images[start..];
            for b in &boxes {
                let channel = b.class as usize;
                for y in b.y_min as usize..b.y_max as usize {
                    for x in b.x_min as usize..b.x_max as usize {
                        image[channel * plane + y * SCENE + x] += 1.0;
                    }
                }
            }
            targets.push(boxes);
        }
        (images, targets)
    }

    /// Feature maps without a backbone, for tests that must not depend on pretrained
    /// weights: per 16-pixel cell, the mean of each 4x4-pixel block of each colour channel
    /// (48 channels), which keeps enough of the layout inside a cell to find box edges.
    fn block_features(images: &[f32], n: usize) -> FeatureMaps {
        let (side, cells, sub) = (SCENE, SCENE / STRIDE, STRIDE / BLOCK);
        let channels = 3 * sub * sub;
        let mut values = vec![0.0; n * channels * cells * cells];
        let scale = 1.0 / (BLOCK * BLOCK) as f32;
        for i in 0..n {
            for c in 0..3 {
                let plane = &images[(i * 3 + c) * side * side..(i * 3 + c + 1) * side * side];
                for (p, &value) in plane.iter().enumerate() {
                    let (y, x) = (p / side, p % side);
                    let channel = c * sub * sub + (y % STRIDE / BLOCK) * sub + x % STRIDE / BLOCK;
                    let cell = (y / STRIDE) * cells + x / STRIDE;
                    values[(i * channels + channel) * cells * cells + cell] += value * scale;
                }
            }
        }
        FeatureMaps::new(values, n, channels, cells).unwrap()
    }

    /// Precision and recall at IoU 0.5 of each member, over all images.
    fn scores(
        predicted: &CommitteeBoxes,
        truth: &[Vec<LabeledBox>],
        members: usize,
    ) -> Vec<Matches> {
        (0..members)
            .map(|member| {
                let mut matches = Matches::default();
                for (boxes, truth) in predicted.iter().zip(truth) {
                    matches.add(match_boxes(&boxes[member], truth, 0.5));
                }
                matches
            })
            .collect()
    }

    #[test]
    fn decoding_the_encoded_targets_gives_the_boxes_back() {
        let config = DetectorConfig::new(3); // 384 pixels, 24x24 cells
        let side = config.side();
        let mut rng = StdRng::seed_from_u64(4);
        for round in 0..20 {
            let mut boxes = random_boxes(&mut rng, 12, 6..=150, 3, config.input as usize);
            // One box reaching past the input, clipped by the encoding.
            boxes.push(target(1, 360.0, -20.0, 420.0, 10.0));
            let targets = encode(&boxes, &config).unwrap();
            let clipped: Vec<LabeledBox> = boxes
                .iter()
                .map(|b| {
                    let [x_min, y_min, x_max, y_max] = b.corners().map(|v| v.clamp(0.0, 384.0));
                    target(b.class, x_min, y_min, x_max, y_max)
                })
                .collect();
            assert_eq!(targets.objects, clipped.len());

            let decoded = decode(&targets.heat, &targets.regression, side, &config);
            assert_eq!(decoded.len(), clipped.len(), "round {round}: {decoded:?}");
            for b in &clipped {
                let found = decoded
                    .iter()
                    .find(|d| {
                        d.class == b.class
                            && d.corners()
                                .iter()
                                .zip(b.corners())
                                .all(|(d, b)| (d - b).abs() < 1.0)
                    })
                    .unwrap_or_else(|| panic!("round {round}: {b:?} not in {decoded:?}"));
                assert_eq!(found.score, 1.0);
            }
        }

        // Large boxes spread a gaussian around the peak; small ones mark their centre only.
        let big = encode(&[target(0, 0.0, 0.0, 120.0, 120.0)], &config).unwrap();
        let centre = 3 * side + 3;
        assert_eq!(big.heat[centre], 1.0);
        assert!(big.heat[centre + 1] > 0.1 && big.heat[centre + 1] < 1.0);
        assert!(big.heat[centre + 2 * side] > 0.0);
        let small = encode(&[target(0, 0.0, 0.0, 20.0, 20.0)], &config).unwrap();
        assert_eq!(small.heat.iter().filter(|&&v| v > 0.0).count(), 1);
    }

    #[test]
    fn refuses_bad_boxes_and_drops_those_outside_the_input() {
        let config = DetectorConfig::new(2);
        for bad in [
            target(2, 0.0, 0.0, 10.0, 10.0),
            target(0, 10.0, 0.0, 5.0, 10.0),
            target(0, f32::NAN, 0.0, 5.0, 10.0),
        ] {
            assert!(
                matches!(encode(&[bad], &config), Err(ModelError::BadInput { .. })),
                "{bad:?}"
            );
        }
        let outside = encode(&[target(0, 400.0, 0.0, 420.0, 10.0)], &config).unwrap();
        assert_eq!(outside.objects, 0);
        assert!(outside.heat.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn iou_and_nms() {
        let a = scored(0, 0.9, [0.0, 0.0, 2.0, 2.0]);
        let b = scored(0, 0.8, [1.0, 0.0, 3.0, 2.0]);
        assert!((iou(&a, &a) - 1.0).abs() < 1e-6);
        assert!((iou(&a, &b) - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(iou(&a, &scored(0, 0.5, [5.0, 5.0, 6.0, 6.0])), 0.0);
        assert_eq!(iou(&a, &scored(0, 0.5, [1.0, 1.0, 1.0, 1.0])), 0.0);

        let duplicate = scored(0, 0.7, [0.1, 0.0, 2.1, 2.0]);
        let other_class = scored(1, 0.6, [0.0, 0.0, 2.0, 2.0]);
        let kept = nms(vec![b, duplicate, a, other_class], 0.5);
        // The duplicate of `a` goes; `b` overlaps `a` by only 1/3; another class never goes.
        assert_eq!(kept, vec![a, b, other_class]);
        assert_eq!(nms(vec![b, a], 0.3), vec![a]);
        assert!(nms(Vec::new(), 0.5).is_empty());
    }

    #[test]
    fn matching_counts_each_labelled_box_once() {
        let truth = [
            target(0, 0.0, 0.0, 10.0, 10.0),
            target(1, 20.0, 20.0, 30.0, 30.0),
        ];
        let predicted = [
            scored(0, 0.9, [1.0, 0.0, 11.0, 10.0]),
            scored(0, 0.8, [0.0, 0.0, 10.0, 10.0]), // a second hit on the same box
            scored(0, 0.7, [20.0, 20.0, 30.0, 30.0]), // the wrong class
        ];
        let matches = match_boxes(&predicted, &truth, 0.5);
        assert_eq!(
            matches,
            Matches {
                true_positives: 1,
                false_positives: 2,
                false_negatives: 1,
            }
        );
        assert!((matches.precision() - 1.0 / 3.0).abs() < 1e-9);
        assert!((matches.recall() - 0.5).abs() < 1e-9);
        assert_eq!(match_boxes(&[], &[], 0.5).f1(), 1.0);
    }

    #[test]
    fn refuses_bad_configs_and_options() {
        let valid = DetectorConfig::default();
        valid.validate().unwrap();
        for bad in [
            DetectorConfig {
                classes: 0,
                ..valid.clone()
            },
            DetectorConfig {
                members: 1,
                ..valid.clone()
            },
            DetectorConfig {
                input: 100,
                ..valid.clone()
            },
            DetectorConfig {
                input: 2048,
                ..valid.clone()
            },
            DetectorConfig {
                score_threshold: 1.0,
                ..valid.clone()
            },
            DetectorConfig {
                score_threshold: f32::NAN,
                ..valid.clone()
            },
            DetectorConfig {
                max_boxes: 0,
                ..valid.clone()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(ModelError::InvalidConfig(_))),
                "{bad:?}"
            );
        }
        let config = scene_config();
        let (images, targets) = scenes(4, 0);
        let features = block_features(&images, 4);
        let train = |targets: &[Vec<LabeledBox>], options: &TrainOptions| {
            train_heads(
                &features,
                targets,
                &config,
                options,
                &Device::flex(),
                |_| true,
            )
        };
        assert!(matches!(
            train(&targets[..3], &TrainOptions::default()),
            Err(ModelError::BadInput { .. })
        ));
        let bad_options = TrainOptions {
            batch_size: 0,
            ..TrainOptions::default()
        };
        assert!(matches!(
            train(&targets, &bad_options),
            Err(ModelError::InvalidOptions(_))
        ));
        let other_input = DetectorConfig {
            input: 256,
            ..config.clone()
        };
        assert!(matches!(
            train_heads(
                &features,
                &targets,
                &other_input,
                &TrainOptions::default(),
                &Device::flex(),
                |_| true
            ),
            Err(ModelError::BadInput { .. })
        ));
        assert!(FeatureMaps::new(vec![0.0; 5], 1, 1, 2).is_err());
        assert!(FeatureMaps::new(vec![f32::INFINITY; 4], 1, 1, 2).is_err());
    }

    /// Trains the committee on synthetic scenes through [`block_features`]: it must find the
    /// squares of held-out scenes, and its members must not all say the same thing.
    #[test]
    fn learns_synthetic_squares_and_members_differ() {
        let config = scene_config();
        let started = Instant::now();
        let (images, targets) = scenes(256, 1);
        let features = block_features(&images, 256);
        let (held_out_images, held_out) = scenes(32, 2);
        let held_out_features = block_features(&held_out_images, 32);
        let prepared = started.elapsed();

        let options = TrainOptions {
            seed: 7,
            ..TrainOptions::default()
        };
        let mut reports = Vec::new();
        let mut last = Instant::now();
        let mut epoch_times = Vec::new();
        let (heads, report) = train_heads(
            &features,
            &targets,
            &config,
            &options,
            &Device::flex(),
            |r| {
                epoch_times.push(last.elapsed());
                last = Instant::now();
                reports.push(r.clone());
                true
            },
        )
        .unwrap();
        let trained = started.elapsed();
        let predicted = heads.predict(&held_out_features).unwrap();
        eprintln!(
            "prepared in {prepared:?}, trained {} epochs in {:?} (per epoch {epoch_times:?}), \
             {report:?}, reports {reports:?}",
            report.epochs,
            trained - prepared
        );
        assert_eq!(predicted.len(), 32);
        assert!(predicted.iter().all(|image| image.len() == 3));
        let matches = scores(&predicted, &held_out, config.members);
        let precision = matches.iter().map(Matches::precision).sum::<f64>() / 3.0;
        let recall = matches.iter().map(Matches::recall).sum::<f64>() / 3.0;
        eprintln!("held out: precision {precision:.3}, recall {recall:.3}, {matches:?}");
        assert!(precision >= 0.8 && recall >= 0.8, "{matches:?}");

        // Members differ: their scores for the same scene are not identical.
        let differ = predicted.iter().any(|image| {
            let score =
                |member: usize| -> Vec<f32> { image[member].iter().map(|b| b.score).collect() };
            score(0) != score(1) || score(1) != score(2)
        });
        assert!(differ, "the members agree on every score");

        // The weights round-trip exactly.
        let bytes = heads.weights_to_bytes().unwrap();
        let loaded = DetectorHeads::load(&config, heads.channels, &bytes, &Device::flex()).unwrap();
        assert_eq!(loaded.predict(&held_out_features).unwrap(), predicted);
        assert!(matches!(
            DetectorHeads::load(
                &DetectorConfig::new(3),
                heads.channels,
                &bytes,
                &Device::flex()
            ),
            Err(ModelError::Weights(_) | ModelError::InvalidConfig(_))
        ));
        assert!(matches!(
            DetectorHeads::from_weights(&config, &bytes[..bytes.len() / 2], &Device::flex()),
            Err(ModelError::Weights(_))
        ));
        // Maps of another shape are refused, not misread.
        assert!(matches!(
            DetectorHeads::from_weights(&config, &bytes, &Device::flex()),
            Err(ModelError::Weights(_))
        ));
        assert!(matches!(
            heads.predict(&FeatureMaps::new(vec![0.0; 96 * 64], 1, 96, 8).unwrap()),
            Err(ModelError::BadInput { .. })
        ));
    }

    /// The same task on the ImageNet backbone's real features: squares pasted on crops of
    /// the test photos. Needs `ops/weights/` and `ops/test-photos/` (`bash ops/install-deps.sh`);
    /// skipped without them, since the unit tests must run anywhere.
    #[test]
    fn learns_squares_on_photos_with_the_imagenet_backbone() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let weights = root.join("ops/weights/mobilenet_v2-b0353104.pth");
        let photos = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
            .map(|name| root.join("ops/test-photos").join(name));
        if !weights.exists() || photos.iter().any(|p| !p.exists()) {
            eprintln!("skipped: no ImageNet weights or test photos (bash ops/install-deps.sh)");
            return;
        }
        let started = Instant::now();
        let backbone = super::super::mobilenet::load_imagenet(&weights, &Device::flex()).unwrap();
        let photos: Vec<image::RgbImage> = photos
            .iter()
            .map(|path| image::open(path).unwrap().to_rgb8())
            .collect();
        let make = |n: usize, seed: u64| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut values = Vec::with_capacity(n * 3 * SCENE * SCENE);
            let mut targets = Vec::with_capacity(n);
            for i in 0..n {
                let photo = &photos[i % photos.len()];
                let side = SCENE as u32;
                let (x, y) = (
                    rng.random_range(0..=photo.width() - side),
                    rng.random_range(0..=photo.height() - side),
                );
                let mut crop = image::imageops::crop_imm(photo, x, y, side, side).to_image();
                let count = rng.random_range(1..=3);
                let boxes = random_boxes(&mut rng, count, 14..=40, 2, SCENE);
                for b in &boxes {
                    let colour = if b.class == 0 {
                        [230, 30, 30]
                    } else {
                        [30, 60, 230]
                    };
                    for y in b.y_min as u32..b.y_max as u32 {
                        for x in b.x_min as u32..b.x_max as u32 {
                            crop.put_pixel(x, y, image::Rgb(colour));
                        }
                    }
                }
                values.extend(super::super::mobilenet::imagenet_normalize(&crop));
                targets.push(boxes);
            }
            let features = backbone_features(&backbone, &values, n, SCENE as u32).unwrap();
            (features, targets)
        };
        let (features, targets) = make(256, 1);
        let (held_out_features, held_out) = make(32, 2);
        let prepared = started.elapsed();
        let config = scene_config();
        let options = TrainOptions {
            epochs: 30,
            batch_size: 16,
            learning_rate: 3e-3,
            seed: 7,
            // Too few images for a validation split that early stopping could trust.
            validation_share: 0.0,
            ..TrainOptions::default()
        };
        let (heads, report) = train_heads(
            &features,
            &targets,
            &config,
            &options,
            &Device::flex(),
            |_| true,
        )
        .unwrap();
        let predicted = heads.predict(&held_out_features).unwrap();
        let matches = scores(&predicted, &held_out, config.members);
        let precision = matches.iter().map(Matches::precision).sum::<f64>() / 3.0;
        let recall = matches.iter().map(Matches::recall).sum::<f64>() / 3.0;
        eprintln!(
            "ImageNet backbone: features of 288 images in {prepared:?}, trained in {:?}, \
             {report:?}; held out: precision {precision:.3}, recall {recall:.3}",
            started.elapsed() - prepared
        );
        assert!(precision >= 0.8 && recall >= 0.8, "{matches:?}");
    }

    #[test]
    fn backbone_features_are_the_stride_16_maps() {
        let backbone = MobileNetV2::new(&Device::flex());
        let input = 64;
        let n = BACKBONE_CHUNK + 2;
        let images: Vec<f32> = (0..n * 3 * 64 * 64)
            .map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0)
            .collect();
        let features = backbone_features(&backbone, &images, n, input).unwrap();
        assert_eq!(
            (features.images(), features.channels(), features.side()),
            (n, 96, 4)
        );
        // Chunking keeps images in order.
        let tail =
            backbone_features(&backbone, &images[(n - 2) * 3 * 64 * 64..], 2, input).unwrap();
        let len = 96 * 16;
        for (a, b) in features.values()[(n - 2) * len..].iter().zip(tail.values()) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        assert!(matches!(
            backbone_features(&backbone, &images[1..], n, input),
            Err(ModelError::BadInput { .. })
        ));
        assert!(matches!(
            backbone_features(&backbone, &images, n, 48),
            Err(ModelError::BadInput { .. })
        ));
    }
}
