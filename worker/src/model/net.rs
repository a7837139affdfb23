//! The burn modules behind a small [`Committee`](super::Committee): one backbone and K linear
//! heads on its embedding. [`SmallCnn`] is the loop's: two convolutions. [`ResCnn`] is the
//! deeper alternative #28 measures: four more convolutions in two residual blocks, with
//! BatchNorm (`sieve-tools bench accuracy --arch res_cnn`).
//!
//! Sharing the backbone makes a committee cost one convolution pass per batch instead of K; the
//! members differ only in their heads (own initialisation, own bootstrap sample in training),
//! which is enough disagreement for query-by-committee on a budget.
//!
//! Weights are initialised here from our own seeded RNG rather than burn's: burn's flex RNG is one
//! process-wide mutex-guarded state, so two models initialised at the same time on different
//! threads (tests, or a worker loading while training) would not be reproducible.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{ArchitectureConfig, ModelError};

/// Output channels of the first and second convolution.
const CONV1_CHANNELS: usize = 16;
const CONV2_CHANNELS: usize = 32;

/// The small CNN with K heads. Field names are the keys in saved weights: renaming one breaks
/// every stored model version.
#[derive(Module, Debug)]
pub(crate) struct SmallCnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    embed: Linear,
    heads: Vec<Linear>,
}

/// Output of one forward pass.
pub(crate) struct Forward {
    /// `[batch, members, classes]`, before softmax.
    pub logits: Tensor<3>,
    /// `[batch, embedding_dim]`, after the ReLU.
    pub embedding: Tensor<2>,
}

impl SmallCnn {
    /// Build with fresh weights, deterministic for `seed`: the backbone draws from `seed`, head
    /// `k` from its own stream derived from `(seed, k)`, so heads differ from one another and
    /// adding a member does not change the others.
    pub(crate) fn init(
        config: &ArchitectureConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        validate(config)?;
        let mut rng = StdRng::seed_from_u64(seed);

        let mut conv1 = conv3x3(config.channels, CONV1_CHANNELS, device);
        conv1.weight = uniform(
            &mut rng,
            [CONV1_CHANNELS, config.channels, 3, 3],
            config.channels * 9,
            device,
        );
        conv1.bias = Some(uniform(
            &mut rng,
            [CONV1_CHANNELS],
            config.channels * 9,
            device,
        ));

        let mut conv2 = conv3x3(CONV1_CHANNELS, CONV2_CHANNELS, device);
        conv2.weight = uniform(
            &mut rng,
            [CONV2_CHANNELS, CONV1_CHANNELS, 3, 3],
            CONV1_CHANNELS * 9,
            device,
        );
        conv2.bias = Some(uniform(
            &mut rng,
            [CONV2_CHANNELS],
            CONV1_CHANNELS * 9,
            device,
        ));

        let flat = flat_features(config);
        let embed = linear(&mut rng, flat, config.embedding_dim, device);

        let heads = init_heads(config, seed, device);

        Ok(Self {
            conv1,
            conv2,
            pool: MaxPool2dConfig::new([2, 2]).init(),
            embed,
            heads,
        })
    }

    /// # Shapes
    /// - `images`: `[batch, channels, input_size, input_size]`
    /// - `logits`: `[batch, members, num_classes]`
    /// - `embedding`: `[batch, embedding_dim]`
    pub(crate) fn forward(&self, images: Tensor<4>) -> Forward {
        self.forward_masked(images, None)
    }

    /// [`forward`](Self::forward) with the heads reading the embedding multiplied by `mask`
    /// (`[batch, embedding_dim]`, for dropout in training); the returned embedding is unmasked.
    pub(crate) fn forward_masked(&self, images: Tensor<4>, mask: Option<Tensor<2>>) -> Forward {
        let x = self.pool.forward(relu(self.conv1.forward(images))); // [batch, 16, s/2, s/2]
        let x = self.pool.forward(relu(self.conv2.forward(x))); // [batch, 32, s/4, s/4]
        let x: Tensor<2> = x.flatten(1, 3); // [batch, 32 * (s/4)^2]
        let embedding = relu(self.embed.forward(x)); // [batch, embedding_dim]
        heads_forward(&self.heads, embedding, mask)
    }
}

/// K heads, head `k` drawn from its own stream derived from `(seed, k)`, so heads differ from
/// one another and adding a member does not change the others.
fn init_heads(config: &ArchitectureConfig, seed: u64, device: &Device) -> Vec<Linear> {
    (0..config.members)
        .map(|k| {
            let mut rng = StdRng::seed_from_u64(stream_seed(seed, k as u64 + 1));
            linear(&mut rng, config.embedding_dim, config.num_classes, device)
        })
        .collect()
}

/// Every head on `embedding` (`[batch, embedding_dim]`) multiplied by `mask` where there is
/// one; the returned embedding is unmasked.
fn heads_forward(heads: &[Linear], embedding: Tensor<2>, mask: Option<Tensor<2>>) -> Forward {
    let head_input = match mask {
        Some(mask) => embedding.clone() * mask,
        None => embedding.clone(),
    };
    let per_head: Vec<Tensor<2>> = heads
        .iter()
        .map(|head| head.forward(head_input.clone())) // [batch, num_classes] each
        .collect();
    Forward {
        logits: Tensor::stack::<3>(per_head, 1), // [batch, members, num_classes]
        embedding,
    }
}

/// Checks everything `init` and `forward` rely on, so a bad config is an error, not a panic
/// deep inside burn.
pub(crate) fn validate(config: &ArchitectureConfig) -> Result<(), ModelError> {
    if config.arch != ArchitectureConfig::SMALL_CNN && config.arch != ArchitectureConfig::RES_CNN {
        return Err(ModelError::UnknownArchitecture(config.arch.clone()));
    }
    let problem = if config.num_classes < 2 {
        Some("num_classes must be at least 2")
    } else if config.members < 2 {
        Some("a committee needs at least 2 members")
    } else if config.input_size < 4 {
        Some("input_size must be at least 4 (two 2x2 poolings)")
    } else if config.channels == 0 {
        Some("channels must be at least 1")
    } else if config.embedding_dim == 0 {
        Some("embedding_dim must be at least 1")
    } else {
        None
    };
    match problem {
        Some(reason) => Err(ModelError::InvalidConfig(reason.to_string())),
        None => Ok(()),
    }
}

/// Width of the flattened backbone output: two 2x2 poolings floor the side twice.
fn flat_features(config: &ArchitectureConfig) -> usize {
    let side = config.input_size / 2 / 2;
    CONV2_CHANNELS * side * side
}

/// The small CNN made deeper: each convolution followed by BatchNorm, and after each of the two
/// poolings a residual block of two more convolutions. About twice the small CNN's arithmetic
/// per image; the same embedding and heads. Field names are the keys in saved weights.
#[derive(Module, Debug)]
pub(crate) struct ResCnn {
    conv1: ConvBn,
    block1: Residual,
    conv2: ConvBn,
    block2: Residual,
    pool: MaxPool2d,
    embed: Linear,
    heads: Vec<Linear>,
}

/// A 3x3 convolution (no bias: the BatchNorm has one) and its BatchNorm.
#[derive(Module, Debug)]
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

/// `relu(x + bn(conv(relu(bn(conv(x))))))`: a ResNet basic block that keeps its width.
#[derive(Module, Debug)]
struct Residual {
    first: ConvBn,
    second: ConvBn,
}

impl ConvBn {
    fn init(rng: &mut StdRng, channels_in: usize, channels_out: usize, device: &Device) -> Self {
        let mut conv = Conv2dConfig::new([channels_in, channels_out], [3, 3])
            .with_padding(PaddingConfig2d::Same)
            .with_bias(false)
            .with_initializer(Initializer::Zeros)
            .init(device);
        conv.weight = uniform(
            rng,
            [channels_out, channels_in, 3, 3],
            channels_in * 9,
            device,
        );
        Self {
            conv,
            bn: BatchNormConfig::new(channels_out).init(device),
        }
    }

    /// `[batch, in, h, w]` to `[batch, out, h, w]`, before any activation.
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.bn.forward(self.conv.forward(x))
    }
}

impl Residual {
    fn init(rng: &mut StdRng, channels: usize, device: &Device) -> Self {
        Self {
            first: ConvBn::init(rng, channels, channels, device),
            second: ConvBn::init(rng, channels, channels, device),
        }
    }

    /// `[batch, c, h, w]` to the same shape.
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = self.second.forward(relu(self.first.forward(x.clone())));
        relu(y + x)
    }
}

impl ResCnn {
    /// Fresh weights, deterministic for `seed` as [`SmallCnn::init`]'s.
    pub(crate) fn init(
        config: &ArchitectureConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        validate(config)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let conv1 = ConvBn::init(&mut rng, config.channels, CONV1_CHANNELS, device);
        let block1 = Residual::init(&mut rng, CONV1_CHANNELS, device);
        let conv2 = ConvBn::init(&mut rng, CONV1_CHANNELS, CONV2_CHANNELS, device);
        let block2 = Residual::init(&mut rng, CONV2_CHANNELS, device);
        let embed = linear(
            &mut rng,
            flat_features(config),
            config.embedding_dim,
            device,
        );
        let heads = init_heads(config, seed, device);
        Ok(Self {
            conv1,
            block1,
            conv2,
            block2,
            pool: MaxPool2dConfig::new([2, 2]).init(),
            embed,
            heads,
        })
    }

    /// As [`SmallCnn::forward_masked`].
    pub(crate) fn forward_masked(&self, images: Tensor<4>, mask: Option<Tensor<2>>) -> Forward {
        let x = self.pool.forward(relu(self.conv1.forward(images))); // [batch, 16, s/2, s/2]
        let x = self.block1.forward(x);
        let x = self.pool.forward(relu(self.conv2.forward(x))); // [batch, 32, s/4, s/4]
        let x = self.block2.forward(x);
        let x: Tensor<2> = x.flatten(1, 3); // [batch, 32 * (s/4)^2]
        let embedding = relu(self.embed.forward(x)); // [batch, embedding_dim]
        heads_forward(&self.heads, embedding, mask)
    }
}

fn conv3x3(channels_in: usize, channels_out: usize, device: &Device) -> Conv2d {
    // Zeros: the real values are drawn right after, from our own RNG.
    Conv2dConfig::new([channels_in, channels_out], [3, 3])
        .with_padding(PaddingConfig2d::Same)
        .with_initializer(Initializer::Zeros)
        .init(device)
}

fn linear(rng: &mut StdRng, d_input: usize, d_output: usize, device: &Device) -> Linear {
    let mut layer = LinearConfig::new(d_input, d_output)
        .with_initializer(Initializer::Zeros)
        .init(device);
    layer.weight = uniform(rng, [d_input, d_output], d_input, device);
    layer.bias = Some(uniform(rng, [d_output], d_input, device));
    layer
}

/// A parameter drawn from `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, burn's (and PyTorch's) default
/// for conv and linear layers.
fn uniform<const D: usize>(
    rng: &mut StdRng,
    shape: [usize; D],
    fan_in: usize,
    device: &Device,
) -> Param<Tensor<D>> {
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    let len = shape.iter().product();
    let values: Vec<f32> = (0..len).map(|_| rng.random_range(-bound..=bound)).collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

/// An independent seed for stream `index` of `seed` (SplitMix64 finaliser), so neighbouring
/// seeds and streams do not produce correlated generators.
pub(crate) fn stream_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
