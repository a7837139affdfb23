//! torchvision's MobileNetV2, with its ImageNet weights imported from the `.pth` file.
//!
//! It is here as a frozen, pretrained backbone: [`MobileNetV2::features`] turns a photo into a
//! 1280-wide embedding that small committee heads can be trained on with a few hundred labels,
//! which a network trained from scratch on the same labels cannot match.
//!
//! The architecture follows torchvision's `mobilenet_v2` exactly (width 1.0, BatchNorm eps
//! 1e-5, ReLU6, dropout 0.2 before the classifier), because the weights only mean something
//! in the network they were trained in. The burn modules have readable names (`stem`,
//! `blocks.3.depthwise`, `head`) rather than torchvision's `nn.Sequential` indices, so the
//! import renames every key (`torchvision_key_remaps`) and then insists that every
//! parameter of the module was loaded and every tensor of the file was used: a silently
//! skipped tensor keeps its random initialisation and still produces plausible-looking
//! garbage.
//!
//! # Input
//! RGB, scaled to `[0, 1]` and normalized per channel with [`IMAGENET_MEAN`] and
//! [`IMAGENET_STD`], layout `[batch, 3, h, w]`. The weights were trained on 224x224 crops
//! (torchvision's eval transform: shorter side to 256, centre crop 224), which
//! [`imagenet_preprocess`] reproduces; global average pooling accepts other sizes (96x96 is
//! a cheap option for embeddings), at some cost in accuracy.
//!
//! # Train / eval behaviour
//! BatchNorm and dropout behave as in evaluation on a plain (non-autodiff) device. On an
//! autodiff device they train (batch statistics, running averages updated) unless the
//! backbone is frozen with [`Module::freeze`], which is what a head-only fine-tune wants.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d,
};
use burn::store::{ApplyResult, KeyRemapper, ModuleSnapshot, PytorchStore};
use burn::tensor::activation::relu6;
use burn::tensor::{Device, Tensor};
use image::imageops::{self, FilterType};
use image::{DynamicImage, RgbImage};

use super::ModelError;

/// ImageNet classes of the classifier.
pub const NUM_CLASSES: usize = 1000;
/// Width of the pooled embedding [`MobileNetV2::features`] returns.
pub const EMBEDDING_DIM: usize = 1280;
/// Per-channel (R, G, B) mean of the ImageNet training images, in `[0, 1]` units.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel (R, G, B) standard deviation of the ImageNet training images.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Output channels of the stem convolution.
const STEM_CHANNELS: usize = 32;
/// The inverted-residual stages as `(expansion t, output channels c, repeats n, stride s)`;
/// the stride applies to the first block of a stage only.
const STAGES: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];
/// The stages up to the last one at stride 16 (the 96-channel stage), whose output
/// [`MobileNetV2::stride16_features`] returns.
const STRIDE_16_STAGES: usize = 5;
/// Channels of the stride-16 feature map [`MobileNetV2::stride16_features`] returns.
pub const STRIDE_16_CHANNELS: usize = STAGES[STRIDE_16_STAGES - 1].1;
/// torchvision's `nn.BatchNorm2d` default.
const BN_EPSILON: f64 = 1e-5;
const DROPOUT: f64 = 0.2;

/// MobileNetV2 (Sandler et al., 2018) as torchvision builds it.
///
/// Field names are the parameter paths the weight import maps onto: renaming one breaks
/// `torchvision_key_remaps`.
#[derive(Module, Debug)]
pub struct MobileNetV2 {
    /// 3x3 convolution, stride 2, 3 -> 32 channels (torchvision `features.0`).
    stem: ConvBnRelu6,
    /// The 17 inverted-residual blocks (torchvision `features.1` to `features.17`).
    blocks: Vec<InvertedResidual>,
    /// 1x1 convolution, 320 -> 1280 channels (torchvision `features.18`).
    head: ConvBnRelu6,
    dropout: Dropout,
    classifier: Linear,
}

/// Convolution without bias, BatchNorm, ReLU6: torchvision's `ConvBNReLU`. The BatchNorm is
/// `None` once [`MobileNetV2::fold_batchnorm`] has folded it into the convolution.
#[derive(Module, Debug)]
struct ConvBnRelu6 {
    conv: Conv2d,
    bn: Option<BatchNorm>,
}

/// Inverted residual block: 1x1 expansion (absent when t = 1), 3x3 depthwise convolution,
/// 1x1 linear projection (no activation), and a skip connection when the shape allows it.
#[derive(Module, Debug)]
struct InvertedResidual {
    expand: Option<ConvBnRelu6>,
    depthwise: ConvBnRelu6,
    project: Conv2d,
    project_bn: Option<BatchNorm>,
    /// Stride 1 and as many output as input channels.
    residual: bool,
}

/// What the ImageNet import loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportReport {
    /// Parameters and BatchNorm statistics loaded from the file: all of them, or the import
    /// fails.
    pub applied: usize,
    /// Tensors of the file deliberately left unused (after key remapping): PyTorch's
    /// BatchNorm `num_batches_tracked` step counters, which only matter when training with a
    /// cumulative moving average and which burn's BatchNorm does not have.
    pub ignored: Vec<String>,
}

impl MobileNetV2 {
    /// A MobileNetV2 with burn's default random initialisation (not torchvision's): the shape
    /// to load weights into, or to train from scratch.
    pub fn new(device: &Device) -> Self {
        let stem = ConvBnRelu6::new(3, STEM_CHANNELS, 3, 2, 1, device);
        let mut blocks = Vec::new();
        let mut channels = STEM_CHANNELS;
        for (expansion, out_channels, repeats, stride) in STAGES {
            for i in 0..repeats {
                let stride = if i == 0 { stride } else { 1 };
                blocks.push(InvertedResidual::new(
                    channels,
                    out_channels,
                    stride,
                    expansion,
                    device,
                ));
                channels = out_channels;
            }
        }
        let head = ConvBnRelu6::new(channels, EMBEDDING_DIM, 1, 1, 1, device);
        Self {
            stem,
            blocks,
            head,
            dropout: DropoutConfig::new(DROPOUT).init(),
            classifier: LinearConfig::new(EMBEDDING_DIM, NUM_CLASSES).init(device),
        }
    }

    /// ImageNet logits (before softmax); see the module docs for the input.
    ///
    /// # Shapes
    /// - `images`: `[batch, 3, h, w]`, any `h, w >= 1` (trained at 224; below 32 the last
    ///   stages see a single, mostly padded pixel)
    /// - returns `[batch, 1000]`
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let embedding = self.features(images); // [batch, 1280]
        self.classifier.forward(self.dropout.forward(embedding)) // [batch, 1000]
    }

    /// The same network with the stem and every inverted-residual block but the last `blocks`
    /// frozen ([`Module::freeze`]: no gradients, BatchNorm on its running statistics); the
    /// final 1x1 convolution always stays trainable. For partial fine-tuning, where the early
    /// layers' generic features are kept and their backward pass, the most expensive one at
    /// full resolution, is never computed.
    pub fn freeze_all_but_last(self, blocks: usize) -> Self {
        let trained_from = self.blocks.len().saturating_sub(blocks);
        Self {
            stem: self.stem.freeze(),
            blocks: self
                .blocks
                .into_iter()
                .enumerate()
                .map(|(i, block)| {
                    if i < trained_from {
                        block.freeze()
                    } else {
                        block
                    }
                })
                .collect(),
            head: self.head,
            dropout: self.dropout,
            classifier: self.classifier,
        }
    }

    /// The same function for inference only, each BatchNorm folded into the convolution
    /// before it (as ONNX Runtime's graph optimiser does): the elementwise passes over every
    /// activation map that BatchNorm costs at run time are gone. Its record differs from the
    /// artifact format (biases, no BatchNorm), so a folded network is never saved, nor
    /// trained.
    pub fn fold_batchnorm(self) -> Self {
        Self {
            stem: self.stem.fold_batchnorm(),
            blocks: self
                .blocks
                .into_iter()
                .map(InvertedResidual::fold_batchnorm)
                .collect(),
            head: self.head.fold_batchnorm(),
            dropout: self.dropout,
            classifier: self.classifier,
        }
    }

    /// The pooled 1280-wide embedding the classifier reads: the frozen-backbone output.
    ///
    /// # Shapes
    /// - `images`: `[batch, 3, h, w]`, as for [`forward`](Self::forward)
    /// - returns `[batch, 1280]`
    pub fn features(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = self.stem.forward(images); // [batch, 32, h/2, w/2]
        for block in &self.blocks {
            x = block.forward(x);
        } // [batch, 320, h/32, w/32]
        let x = self.head.forward(x); // [batch, 1280, h/32, w/32]
        x.mean_dims(&[2, 3]).flatten(1, 3) // [batch, 1280]
    }

    /// The feature map at the end of the last stage at stride 16 (the 96-channel stage,
    /// torchvision `features.13`): the input of a dense-prediction head (the detector's),
    /// which needs positions that the pooled [`features`](Self::features) average away. The
    /// stages after it (and the final 1x1 convolution) are not run.
    ///
    /// # Shapes
    /// - `images`: `[batch, 3, h, w]`, as for [`forward`](Self::forward)
    /// - returns `[batch, 96, ceil(h / 16), ceil(w / 16)]`
    pub fn stride16_features(&self, images: Tensor<4>) -> Tensor<4> {
        let blocks: usize = STAGES[..STRIDE_16_STAGES]
            .iter()
            .map(|&(_, _, repeats, _)| repeats)
            .sum();
        let mut x = self.stem.forward(images); // [batch, 32, h/2, w/2]
        for block in self.blocks.iter().take(blocks) {
            x = block.forward(x);
        }
        x // [batch, 96, h/16, w/16]
    }
}

impl ConvBnRelu6 {
    fn new(
        channels_in: usize,
        channels_out: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
        device: &Device,
    ) -> Self {
        let pad = (kernel - 1) / 2;
        Self {
            conv: Conv2dConfig::new([channels_in, channels_out], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_groups(groups)
                .with_bias(false)
                .init(device),
            bn: Some(batch_norm(channels_out, device)),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, channels_in, h, w]`
    /// - returns `[batch, channels_out, ceil(h / stride), ceil(w / stride)]`
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        relu6(normalized(self.bn.as_ref(), self.conv.forward(x)))
    }

    fn fold_batchnorm(self) -> Self {
        Self {
            conv: folded(self.conv, self.bn),
            bn: None,
        }
    }
}

impl InvertedResidual {
    fn new(
        channels_in: usize,
        channels_out: usize,
        stride: usize,
        expansion: usize,
        device: &Device,
    ) -> Self {
        let hidden = channels_in * expansion;
        let expand =
            (expansion != 1).then(|| ConvBnRelu6::new(channels_in, hidden, 1, 1, 1, device));
        Self {
            expand,
            depthwise: ConvBnRelu6::new(hidden, hidden, 3, stride, hidden, device),
            project: Conv2dConfig::new([hidden, channels_out], [1, 1])
                .with_bias(false)
                .init(device),
            project_bn: Some(batch_norm(channels_out, device)),
            residual: stride == 1 && channels_in == channels_out,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, channels_in, h, w]`
    /// - returns `[batch, channels_out, ceil(h / stride), ceil(w / stride)]`
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let hidden = match &self.expand {
            Some(expand) => expand.forward(x.clone()), // [batch, hidden, h, w]
            None => x.clone(),
        };
        let hidden = self.depthwise.forward(hidden); // [batch, hidden, h/s, w/s]
        let out = normalized(self.project_bn.as_ref(), self.project.forward(hidden)); // [batch, out, h/s, w/s]
        if self.residual { out + x } else { out }
    }

    fn fold_batchnorm(self) -> Self {
        Self {
            expand: self.expand.map(ConvBnRelu6::fold_batchnorm),
            depthwise: self.depthwise.fold_batchnorm(),
            project: folded(self.project, self.project_bn),
            project_bn: None,
            residual: self.residual,
        }
    }
}

/// `x` through `bn` on its running statistics, or as it is once folded.
fn normalized(bn: Option<&BatchNorm>, x: Tensor<4>) -> Tensor<4> {
    match bn {
        Some(bn) => bn.forward(x),
        None => x,
    }
}

/// `conv` then `bn` on its running statistics, as one convolution with a bias:
/// `w' = w * s` per output channel and `b' = (b - mean) * s + beta`, where
/// `s = gamma / sqrt(var + eps)`.
fn folded(conv: Conv2d, bn: Option<BatchNorm>) -> Conv2d {
    let Some(bn) = bn else {
        return conv;
    };
    let scale = bn.gamma.val() / bn.running_var.value().add_scalar(bn.epsilon).sqrt(); // [out]
    let mean = bn.running_mean.value();
    let centred = match &conv.bias {
        Some(bias) => bias.val() - mean,
        None => mean.neg(),
    };
    let bias = centred * scale.clone() + bn.beta.val(); // [out]
    let [out] = scale.shape().dims();
    let weight = conv.weight.val() * scale.reshape([out, 1, 1, 1]); // [out, in/groups, kh, kw]
    Conv2d {
        weight: Param::from_tensor(weight),
        bias: Some(Param::from_tensor(bias)),
        ..conv
    }
}

/// Multiply-adds of one forward pass of one `h` x `w` image, by layer arithmetic over the
/// convolutions and the classifier (`with_classifier`); BatchNorm, ReLU6, the residual adds
/// and the pooling are left out (well under 1% of the total). Twice this is the FLOP count.
/// At 224x224 with the classifier it is about 300 million, the figure the MobileNetV2 paper
/// gives.
pub fn multiply_adds(h: usize, w: usize, with_classifier: bool) -> u64 {
    // Output side of a convolution with padding (k - 1) / 2.
    let out = |side: usize, kernel: usize, stride: usize| {
        (side + 2 * ((kernel - 1) / 2) - kernel) / stride + 1
    };
    let (mut h, mut w) = (out(h, 3, 2), out(w, 3, 2));
    let mut total = (h * w * STEM_CHANNELS * 3 * 9) as u64;
    let mut channels = STEM_CHANNELS;
    for (expansion, out_channels, repeats, stride) in STAGES {
        for i in 0..repeats {
            let stride = if i == 0 { stride } else { 1 };
            let hidden = channels * expansion;
            if expansion != 1 {
                total += (h * w * hidden * channels) as u64;
            }
            (h, w) = (out(h, 3, stride), out(w, 3, stride));
            total += (h * w * hidden * 9) as u64; // depthwise
            total += (h * w * out_channels * hidden) as u64; // projection
            channels = out_channels;
        }
    }
    total += (h * w * EMBEDDING_DIM * channels) as u64;
    if with_classifier {
        total += (EMBEDDING_DIM * NUM_CLASSES) as u64;
    }
    total
}

fn batch_norm(channels: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels)
        .with_epsilon(BN_EPSILON)
        .init(device)
}

/// Loads torchvision's ImageNet weights (`mobilenet_v2-b0353104.pth`) into a new
/// MobileNetV2 on `device`.
///
/// Fails with [`ModelError::Weights`], naming the keys, unless every parameter of the module
/// was loaded and every tensor of the file was used (BatchNorm step counters aside, see
/// [`ImportReport::ignored`]).
pub fn load_imagenet(path: &Path, device: &Device) -> Result<MobileNetV2, ModelError> {
    load_imagenet_with_report(path, device).map(|(model, _report)| model)
}

/// [`load_imagenet`], also returning what was loaded.
pub fn load_imagenet_with_report(
    path: &Path,
    device: &Device,
) -> Result<(MobileNetV2, ImportReport), ModelError> {
    let remapper = KeyRemapper::from_patterns(torchvision_key_remaps())
        .map_err(|err| ModelError::Weights(format!("invalid key remapping: {err}")))?;
    let mut store = PytorchStore::from_file(path)
        .remap(remapper)
        // The remapping already yields the module's indices; renumbering after it could only
        // hide a block that is absent from the file.
        .map_indices_contiguous(false)
        // Missing tensors are checked below, with their names, together with unused ones
        // (which the store would let through).
        .allow_partial(true);
    // burn initialises parameters lazily, so the random weights replaced here are never drawn.
    let mut model = MobileNetV2::new(device);
    let result = model
        .load_from(&mut store)
        .map_err(|err| ModelError::Weights(format!("{}: {err}", path.display())))?;
    let report = check_import(result)
        .map_err(|problem| ModelError::Weights(format!("{}: {problem}", path.display())))?;
    Ok((model, report))
}

/// Turns burn-store's apply result into an [`ImportReport`], or a message naming every
/// missing, unused or mismatched tensor.
pub(super) fn check_import(result: ApplyResult) -> Result<ImportReport, String> {
    let (ignored, unused): (Vec<String>, Vec<String>) = result
        .unused
        .into_iter()
        .partition(|key| key.ends_with(".num_batches_tracked"));
    let mut problems = Vec::new();
    if !result.errors.is_empty() {
        let errors: Vec<String> = result.errors.iter().map(ToString::to_string).collect();
        problems.push(format!(
            "{} tensors do not fit: {}",
            errors.len(),
            errors.join("; ")
        ));
    }
    if !result.missing.is_empty() {
        let missing: Vec<&str> = result.missing.iter().map(|(key, _)| key.as_str()).collect();
        problems.push(format!(
            "{} module parameters not in the file: {}",
            missing.len(),
            missing.join(", ")
        ));
    }
    if !unused.is_empty() {
        problems.push(format!(
            "{} tensors of the file unused (after key remapping): {}",
            unused.len(),
            unused.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(ImportReport {
            applied: result.applied.len(),
            ignored,
        })
    } else {
        Err(problems.join("; "))
    }
}

/// torchvision's state-dict keys to this module's parameter paths, as `(regex, replacement)`
/// pairs applied in order, each to the output of the ones before.
///
/// torchvision nests `nn.Sequential`s: `features.{0,18}` are `ConvBNReLU(conv, bn, relu6)`;
/// block `features.i.conv` is `[ConvBNReLU expand, ConvBNReLU depthwise, conv, bn]`, without
/// the expansion in block 1 (t = 1); `classifier` is `[Dropout, Linear]`. For example
/// `features.2.conv.1.0.weight` becomes `blocks.1.depthwise.conv.weight`. BatchNorm
/// `weight`/`bias` become `gamma`/`beta` in burn-store's PyTorch adapter, not here.
fn torchvision_key_remaps() -> Vec<(String, String)> {
    let structure = [
        (r"^features\.0\.", "stem."),
        (r"^features\.18\.", "head."),
        (r"^features\.1\.conv\.0\.", "features.1.depthwise."),
        (r"^features\.1\.conv\.1\.", "features.1.project."),
        (r"^features\.1\.conv\.2\.", "features.1.project_bn."),
        (r"^features\.(\d+)\.conv\.0\.", "features.${1}.expand."),
        (r"^features\.(\d+)\.conv\.1\.", "features.${1}.depthwise."),
        (r"^features\.(\d+)\.conv\.2\.", "features.${1}.project."),
        (r"^features\.(\d+)\.conv\.3\.", "features.${1}.project_bn."),
        (
            r"^(stem|head|features\.\d+\.(?:expand|depthwise))\.0\.",
            "${1}.conv.",
        ),
        (
            r"^(stem|head|features\.\d+\.(?:expand|depthwise))\.1\.",
            "${1}.bn.",
        ),
        (r"^classifier\.1\.", "classifier."),
    ];
    let mut remaps: Vec<(String, String)> = structure
        .into_iter()
        .map(|(from, to)| (from.to_string(), to.to_string()))
        .collect();
    // features.1 ..= features.17 are blocks 0 ..= 16: a regex cannot subtract.
    let blocks: usize = STAGES.iter().map(|&(_, _, repeats, _)| repeats).sum();
    remaps
        .extend((1..=blocks).map(|i| (format!(r"^features\.{i}\."), format!("blocks.{}.", i - 1))));
    remaps
}

/// torchvision's ImageNet eval transform for one image: resize the shorter side to
/// `side * 256 / 224` (256 for 224), centre crop `side x side`, then [`imagenet_normalize`].
///
/// Returns `3 * side * side` values, layout `[3, side, side]`.
pub fn imagenet_preprocess(image: &DynamicImage, side: u32) -> Result<Vec<f32>, ModelError> {
    let (width, height) = (image.width(), image.height());
    if side == 0 || width == 0 || height == 0 {
        return Err(ModelError::bad_input(format!(
            "cannot crop {side}x{side} from a {width}x{height} image"
        )));
    }
    let short = (u64::from(side) * 256).div_ceil(224);
    // Like torchvision, the longer side is truncated, not rounded.
    let (new_width, new_height) = if width <= height {
        (short, short * u64::from(height) / u64::from(width))
    } else {
        (short * u64::from(width) / u64::from(height), short)
    };
    let (new_width, new_height) = (
        u32::try_from(new_width).map_err(|_| too_elongated(width, height))?,
        u32::try_from(new_height).map_err(|_| too_elongated(width, height))?,
    );
    // Triangle is bilinear, widened when shrinking like PIL's (torchvision's default).
    let resized = imageops::resize(
        &image.to_rgb8(),
        new_width,
        new_height,
        FilterType::Triangle,
    );
    let left = (new_width - side).div_ceil(2);
    let top = (new_height - side).div_ceil(2);
    let cropped = imageops::crop_imm(&resized, left, top, side, side).to_image();
    Ok(imagenet_normalize(&cropped))
}

fn too_elongated(width: u32, height: u32) -> ModelError {
    ModelError::bad_input(format!(
        "a {width}x{height} image is too elongated to resize"
    ))
}

/// An RGB image as the network's input: `[0, 1]` scaling, then per-channel
/// `(x - mean) / std` with [`IMAGENET_MEAN`] and [`IMAGENET_STD`].
///
/// Returns `3 * h * w` values, layout `[3, h, w]` (channel-major, as the network reads them).
pub fn imagenet_normalize(image: &RgbImage) -> Vec<f32> {
    let plane = image.width() as usize * image.height() as usize;
    let mut out = vec![0.0; 3 * plane];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(pixel[c]) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use burn::module::{ModuleVisitor, Param};

    use super::*;

    /// Collects the module's parameter paths, as the import sees them.
    #[derive(Default)]
    struct Paths {
        stack: Vec<String>,
        paths: Vec<String>,
    }

    impl ModuleVisitor for Paths {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
            self.paths.push(self.stack.join("."));
        }
    }

    #[test]
    fn has_torchvision_shape() {
        let model = MobileNetV2::new(&Device::flex());
        assert_eq!(model.blocks.len(), 17);
        assert_eq!(model.blocks.iter().filter(|b| b.residual).count(), 10);
        assert!(model.blocks[0].expand.is_none());
        // 3,504,872 parameters in torchvision (BatchNorm running statistics not counted).
        let running_stats: usize = 2 * (32 + 1280)
            + model
                .blocks
                .iter()
                .map(|b| {
                    let [out] = b.project_bn.as_ref().unwrap().gamma.shape().dims();
                    let [hidden] = b.depthwise.bn.as_ref().unwrap().gamma.shape().dims();
                    2 * (out + hidden + if b.expand.is_some() { hidden } else { 0 })
                })
                .sum::<usize>();
        assert_eq!(model.num_params() - running_stats, 3_504_872);
    }

    #[test]
    fn remaps_every_torchvision_key_onto_a_parameter() {
        let mut paths = Paths::default();
        MobileNetV2::new(&Device::flex()).visit(&mut paths);
        // The same regex engine as the import, through burn-store's remapper.
        let remaps = KeyRemapper::from_patterns(torchvision_key_remaps())
            .unwrap()
            .to_regex_pairs();
        let remap = |key: &str| {
            remaps.iter().fold(key.to_string(), |key, (from, to)| {
                from.replace_all(&key, to.as_str()).into_owned()
            })
        };
        let burn_name = |key: String| {
            key.replace("bn.weight", "bn.gamma")
                .replace("bn.bias", "bn.beta")
        };

        assert_eq!(remap("features.0.0.weight"), "stem.conv.weight");
        assert_eq!(remap("features.0.1.running_var"), "stem.bn.running_var");
        assert_eq!(
            remap("features.1.conv.0.0.weight"),
            "blocks.0.depthwise.conv.weight"
        );
        assert_eq!(remap("features.1.conv.1.weight"), "blocks.0.project.weight");
        assert_eq!(remap("features.1.conv.2.bias"), "blocks.0.project_bn.bias");
        assert_eq!(
            remap("features.2.conv.0.1.weight"),
            "blocks.1.expand.bn.weight"
        );
        assert_eq!(
            remap("features.17.conv.1.0.weight"),
            "blocks.16.depthwise.conv.weight"
        );
        assert_eq!(
            remap("features.17.conv.3.running_mean"),
            "blocks.16.project_bn.running_mean"
        );
        assert_eq!(remap("features.18.0.weight"), "head.conv.weight");
        assert_eq!(remap("classifier.1.weight"), "classifier.weight");

        // Every module parameter is the image of some torchvision key.
        let mut keys = vec![
            "classifier.1.weight".to_string(),
            "classifier.1.bias".into(),
        ];
        for f in [0, 18] {
            keys.push(format!("features.{f}.0.weight"));
            keys.extend(bn_keys(&format!("features.{f}.1")));
        }
        keys.push("features.1.conv.0.0.weight".into());
        keys.extend(bn_keys("features.1.conv.0.1"));
        keys.push("features.1.conv.1.weight".into());
        keys.extend(bn_keys("features.1.conv.2"));
        for f in 2..=17 {
            for part in ["0", "1"] {
                keys.push(format!("features.{f}.conv.{part}.0.weight"));
                keys.extend(bn_keys(&format!("features.{f}.conv.{part}.1")));
            }
            keys.push(format!("features.{f}.conv.2.weight"));
            keys.extend(bn_keys(&format!("features.{f}.conv.3")));
        }
        let mut mapped: Vec<String> = keys.into_iter().map(|k| burn_name(remap(&k))).collect();
        mapped.sort();
        paths.paths.sort();
        assert_eq!(mapped, paths.paths);
    }

    fn bn_keys(prefix: &str) -> Vec<String> {
        ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .map(|name| format!("{prefix}.{name}"))
            .collect()
    }

    #[test]
    fn import_check_names_missing_and_unused_keys() {
        let result = |missing: &[&str], unused: &[&str]| ApplyResult {
            applied: vec!["stem.conv.weight".to_string()],
            skipped: Vec::new(),
            missing: missing
                .iter()
                .map(|key| (key.to_string(), "Struct:MobileNetV2".to_string()))
                .collect(),
            unused: unused.iter().map(|key| key.to_string()).collect(),
            errors: Vec::new(),
        };

        let report = check_import(result(&[], &["stem.bn.num_batches_tracked"])).unwrap();
        assert_eq!(report.applied, 1);
        assert_eq!(report.ignored, ["stem.bn.num_batches_tracked"]);

        let problem = check_import(result(
            &["head.bn.gamma"],
            &["features.18.1.weight", "stem.bn.num_batches_tracked"],
        ))
        .unwrap_err();
        assert!(problem.contains("head.bn.gamma"), "{problem}");
        assert!(problem.contains("features.18.1.weight"), "{problem}");
        assert!(!problem.contains("num_batches_tracked"), "{problem}");
    }

    #[test]
    fn preprocess_matches_torchvision_geometry() {
        // 400x300 landscape: shorter side to 256 gives 341x256, crop 224 from (59, 16).
        let image = DynamicImage::ImageRgb8(RgbImage::from_fn(400, 300, |x, _| {
            image::Rgb([if x < 200 { 0 } else { 255 }, 128, 255])
        }));
        let input = imagenet_preprocess(&image, 224).unwrap();
        assert_eq!(input.len(), 3 * 224 * 224);
        let plane = 224 * 224;
        let expected = |c: usize, v: f32| (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        assert!((input[0] - expected(0, 0.0)).abs() < 1e-5);
        assert!((input[223] - expected(0, 255.0)).abs() < 1e-5);
        assert!((input[plane] - expected(1, 128.0)).abs() < 1e-5);
        assert!((input[2 * plane] - expected(2, 255.0)).abs() < 1e-5);
        assert!(imagenet_preprocess(&image, 0).is_err());
    }
}
