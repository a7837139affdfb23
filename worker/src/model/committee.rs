//! [`Committee`]: the inference side of a model version, and its weights as bytes.
//!
//! Inputs and outputs are plain `Vec`s and slices, never tensors, so that callers (the queue
//! consumer, the scheduler's tests) need no burn types and the device stays an implementation
//! detail. Weights travel as burnpack bytes in memory (`Module::into_record().into_bytes()`),
//! because they go to an object store, not to a local file.

use std::sync::OnceLock;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use super::heads::Heads;
use super::mobilenet::{self, MobileNetV2};
use super::net::{ResCnn, SmallCnn};
use super::tensors::{load_weights, read, weights_to_bytes};
use super::{ArchitectureConfig, ModelError, check_images};

/// Images per forward pass. Bounds activation memory (the first conv layer alone is 50 KiB per
/// 28x28 image) when a caller hands over a large batch; large enough to keep the CPU busy.
const INFERENCE_CHUNK: usize = 256;
/// The same for MobileNetV2, whose expanded activations are ~1 MiB per 96x96 image.
const BACKBONE_CHUNK: usize = 32;

/// Class probabilities per item, per member: `probs[item][member][class]`.
pub type CommitteeProbs = Vec<Vec<Vec<f32>>>;
/// Backbone embedding per item: `embeddings[item][dim]`.
pub type Embeddings = Vec<Vec<f32>>;

/// A committee: one backbone shared by K linear heads (one backbone forward per batch, K cheap
/// heads). The backbone is either the small CNN, trained whole, or MobileNetV2 from its ImageNet
/// weights, kept frozen while heads train on its embeddings (heads mode) or fine-tuned with them
/// (full mode).
///
/// Immutable once built; share it between threads with an `Arc`.
#[derive(Clone, Debug)]
pub struct Committee {
    /// Always on the plain (non-autodiff) device: inference must not build autodiff graphs.
    pub(crate) net: Net,
    pub(crate) config: ArchitectureConfig,
    pub(crate) device: Device,
    /// A MobileNetV2 committee's backbone with its BatchNorms folded into the convolutions,
    /// made on first use: what inference runs (8-16% faster on flex). `net` keeps the
    /// backbone as imported, for the weights and for training runs that start from it.
    folded: OnceLock<MobileNetV2>,
}

/// The module behind a committee, by architecture.
// One per committee, never in a collection: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub(crate) enum Net {
    Small(SmallCnn),
    Residual(ResCnn),
    Mobile(BackboneHeads),
    /// The `null` architecture: no weights, the same answer for every image
    /// (for measuring the machinery around the model).
    Null,
}

/// MobileNetV2 and K linear heads as one `[1280, K * classes]` layer on its pooled embedding.
/// Field names are the keys in saved weights.
#[derive(Module, Debug)]
pub(crate) struct BackboneHeads {
    backbone: MobileNetV2,
    heads: Linear,
}

impl BackboneHeads {
    /// `[batch, members, classes]` logits, the heads reading the embedding times `mask`
    /// (`[batch, 1280]`, dropout in training).
    pub(crate) fn forward_masked(
        &self,
        images: Tensor<4>,
        mask: Option<Tensor<2>>,
        members: usize,
    ) -> Tensor<3> {
        let embedding = self.backbone.features(images); // [batch, 1280]
        let embedding = match mask {
            Some(mask) => embedding * mask,
            None => embedding,
        };
        let logits = self.heads.forward(embedding); // [batch, members * classes]
        let [batch, width] = logits.dims();
        logits.reshape([batch, members, width / members])
    }

    /// Ready for full-mode fine-tuning: every layer trainable, or, with `unfrozen` blocks, only
    /// the backbone's last `unfrozen` blocks, its final convolution and the heads.
    pub(crate) fn for_fine_tuning(self, unfrozen: Option<usize>) -> Self {
        let net = self.unfreeze();
        match unfrozen {
            None => net,
            Some(blocks) => Self {
                backbone: net.backbone.freeze_all_but_last(blocks),
                heads: net.heads,
            },
        }
    }
}

impl Committee {
    pub(crate) fn assemble(net: Net, config: ArchitectureConfig, device: Device) -> Self {
        Self {
            net,
            config,
            device,
            folded: OnceLock::new(),
        }
    }

    /// The backbone inference runs: `net`'s, folded ([`MobileNetV2::fold_batchnorm`]).
    fn inference_backbone<'a>(&'a self, net: &BackboneHeads) -> &'a MobileNetV2 {
        self.folded
            .get_or_init(|| net.backbone.clone().fold_batchnorm())
    }

    /// Fresh, untrained weights, deterministic for `seed` (each head has its own stream derived
    /// from `seed`, so the members differ from the start).
    pub fn init(
        config: &ArchitectureConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let device = device.clone().without_autodiff();
        let net = match config.arch.as_str() {
            ArchitectureConfig::MOBILENET_V2 => {
                validate_mobilenet(config)?;
                // Random weights: the shape to load an artifact into. A real committee starts
                // from the ImageNet backbone ([`from_backbone`](Self::from_backbone)).
                Net::Mobile(BackboneHeads {
                    backbone: MobileNetV2::new(&device),
                    heads: heads_layer(config, &device),
                })
            }
            ArchitectureConfig::NULL => {
                validate_null(config)?;
                Net::Null
            }
            ArchitectureConfig::RES_CNN => Net::Residual(ResCnn::init(config, seed, &device)?),
            _ => Net::Small(SmallCnn::init(config, seed, &device)?),
        };
        Ok(Self::assemble(net, config.clone(), device))
    }

    /// A `mobilenet_v2` committee on `backbone` (the ImageNet import, or another version's) with
    /// fresh, untrained heads.
    pub fn from_backbone(
        config: &ArchitectureConfig,
        backbone: MobileNetV2,
        device: &Device,
    ) -> Result<Self, ModelError> {
        if config.arch != ArchitectureConfig::MOBILENET_V2 {
            return Err(ModelError::InvalidConfig(format!(
                "a MobileNetV2 backbone cannot carry a {:?} committee",
                config.arch
            )));
        }
        validate_mobilenet(config)?;
        let device = device.clone().without_autodiff();
        let net = Net::Mobile(BackboneHeads {
            backbone: backbone.to_device(&device),
            heads: heads_layer(config, &device),
        });
        Ok(Self::assemble(net, config.clone(), device))
    }

    /// The same backbone with other heads (trained by [`train_heads`](super::train_heads) on this
    /// committee's embeddings). The committee size follows the heads.
    pub fn with_heads(&self, heads: Heads) -> Result<Self, ModelError> {
        let Net::Mobile(net) = &self.net else {
            return Err(ModelError::InvalidConfig(format!(
                "{} has no frozen backbone to put heads on",
                self.config.arch
            )));
        };
        if heads.dim != self.config.embedding_dim || heads.num_classes != self.config.num_classes {
            return Err(ModelError::InvalidConfig(format!(
                "heads for {}-wide embeddings and {} classes do not fit a {}-wide, {}-class committee",
                heads.dim, heads.num_classes, self.config.embedding_dim, self.config.num_classes
            )));
        }
        let config = ArchitectureConfig {
            members: heads.members,
            ..self.config.clone()
        };
        validate_mobilenet(&config)?;
        let net = Net::Mobile(BackboneHeads {
            backbone: net.backbone.clone(),
            heads: heads.linear.to_device(&self.device),
        });
        let same_backbone = Self {
            folded: self.folded.clone(),
            ..Self::assemble(net, config, self.device.clone())
        };
        Ok(same_backbone)
    }

    /// The same weights, recorded as carrying the backbone fine-tuned for model version
    /// `version` (see [`ArchitectureConfig::backbone`]).
    pub fn with_backbone_of(self, version: impl Into<String>) -> Self {
        Self {
            config: ArchitectureConfig {
                backbone: Some(version.into()),
                ..self.config
            },
            ..self
        }
    }

    /// Whether the backbone is frozen (heads-only training): true for `mobilenet_v2`.
    pub fn has_frozen_backbone(&self) -> bool {
        matches!(self.net, Net::Mobile(_))
    }

    /// The backbone embedding of every image, flat `[batch, embedding_dim]`.
    pub fn embed(&self, images: &[f32], batch: usize) -> Result<Vec<f32>, ModelError> {
        check_images(&self.config, images, batch)?;
        let Net::Mobile(net) = &self.net else {
            let (_, embeddings) = self.run(images, batch, true)?;
            return Ok(embeddings.concat());
        };
        let input_len = self.config.input_len();
        let mut out = Vec::with_capacity(batch * self.config.embedding_dim);
        for chunk in images.chunks(BACKBONE_CHUNK * input_len) {
            let n = chunk.len() / input_len;
            let x = self.images_tensor(chunk, n, &self.device);
            out.extend(read(self.inference_backbone(net).features(x))?);
        }
        Ok(out)
    }

    /// Class probabilities of every member from backbone embeddings (as [`embed`](Self::embed)
    /// returns them, or as cached from earlier predictions), without the backbone:
    /// `out[item][member][class]`.
    pub fn predict_embeddings(
        &self,
        embeddings: &[f32],
        batch: usize,
    ) -> Result<CommitteeProbs, ModelError> {
        let dim = self.config.embedding_dim;
        let Net::Mobile(net) = &self.net else {
            return Err(ModelError::InvalidConfig(format!(
                "{} predicts from images only",
                self.config.arch
            )));
        };
        if embeddings.len() != batch * dim {
            return Err(ModelError::bad_input(format!(
                "expected {batch} embeddings of {dim} values, got {} values",
                embeddings.len()
            )));
        }
        if embeddings.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::bad_input("non-finite embedding value"));
        }
        let (members, classes) = (self.config.members, self.config.num_classes);
        let mut probs = Vec::with_capacity(batch);
        for chunk in embeddings.chunks(INFERENCE_CHUNK * dim) {
            let n = chunk.len() / dim;
            let x = Tensor::<2>::from_data(TensorData::new(chunk.to_vec(), [n, dim]), &self.device);
            let logits = net.heads.forward(x).reshape([n, members, classes]);
            probs.extend(split_probs(&read(softmax(logits, 2))?, members, classes));
        }
        Ok(probs)
    }

    pub fn config(&self) -> &ArchitectureConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The same weights on another device (a CPU baseline beside a GPU, say).
    pub fn to_device(&self, device: &Device) -> Self {
        let device = device.clone().without_autodiff();
        let net = match &self.net {
            Net::Small(net) => Net::Small(net.clone().to_device(&device)),
            Net::Residual(net) => Net::Residual(net.clone().to_device(&device)),
            Net::Mobile(net) => Net::Mobile(net.clone().to_device(&device)),
            Net::Null => Net::Null,
        };
        Self::assemble(net, self.config.clone(), device)
    }

    /// Class probabilities of every member for every image.
    ///
    /// `images`: `batch * config.input_len()` f32 values, already normalized, layout
    /// `[batch, channels, h, w]`. Returns `out[item][member][class]`; each member's
    /// probabilities sum to 1.
    pub fn predict(&self, images: &[f32], batch: usize) -> Result<CommitteeProbs, ModelError> {
        Ok(self.run(images, batch, false)?.0)
    }

    /// Like [`predict`](Self::predict), and also the backbone embedding of every image:
    /// `(probs[item][member][class], embeddings[item][dim])`.
    pub fn predict_with_embeddings(
        &self,
        images: &[f32],
        batch: usize,
    ) -> Result<(CommitteeProbs, Embeddings), ModelError> {
        self.run(images, batch, true)
    }

    /// The weights as burnpack bytes; [`from_weights`](Self::from_weights) with the same config
    /// reads them back.
    pub fn weights_to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        match &self.net {
            Net::Small(net) => weights_to_bytes(net),
            Net::Residual(net) => weights_to_bytes(net),
            Net::Mobile(net) => weights_to_bytes(net),
            Net::Null => Ok(Vec::new()),
        }
    }

    /// Rebuilds a committee from [`weights_to_bytes`](Self::weights_to_bytes) output.
    ///
    /// Corrupt bytes, weights of another shape (a different `num_classes`, `members`, …) and
    /// non-finite weights are all [`ModelError::Weights`]; nothing here panics on bad bytes.
    pub fn from_weights(
        config: &ArchitectureConfig,
        bytes: &[u8],
        device: &Device,
    ) -> Result<Self, ModelError> {
        let device = device.clone().without_autodiff();
        if config.arch == ArchitectureConfig::NULL {
            if !bytes.is_empty() {
                return Err(ModelError::Weights(format!(
                    "the null architecture has no weights, got {} bytes",
                    bytes.len()
                )));
            }
            return Self::init(config, 0, &device);
        }
        // The seed does not matter: every parameter is overwritten.
        let net = match Self::init(config, 0, &device)?.net {
            Net::Small(net) => Net::Small(load_weights(net, bytes)?),
            Net::Residual(net) => Net::Residual(load_weights(net, bytes)?),
            Net::Mobile(net) => Net::Mobile(load_weights(net, bytes)?),
            Net::Null => Net::Null,
        };
        Ok(Self::assemble(net, config.clone(), device))
    }

    fn run(
        &self,
        images: &[f32],
        batch: usize,
        with_embeddings: bool,
    ) -> Result<(CommitteeProbs, Embeddings), ModelError> {
        check_images(&self.config, images, batch)?;
        let input_len = self.config.input_len();
        let (members, classes) = (self.config.members, self.config.num_classes);
        let mut probs = Vec::with_capacity(batch);
        let mut embeddings = Vec::with_capacity(if with_embeddings { batch } else { 0 });

        let chunk_len = match self.net {
            Net::Small(_) | Net::Residual(_) => INFERENCE_CHUNK,
            Net::Mobile(_) => BACKBONE_CHUNK,
            Net::Null => {
                let uniform = vec![vec![1.0 / classes as f32; classes]; members];
                return Ok((vec![uniform; batch], Vec::new()));
            }
        };
        for chunk in images.chunks(chunk_len * input_len) {
            let n = chunk.len() / input_len;
            let x = self.images_tensor(chunk, n, &self.device);
            let (logits, embedding) = match &self.net {
                Net::Small(net) => {
                    let output = net.forward(x);
                    (output.logits, output.embedding)
                }
                Net::Residual(net) => {
                    let output = net.forward_masked(x, None);
                    (output.logits, output.embedding)
                }
                Net::Mobile(net) => {
                    let embedding = self.inference_backbone(net).features(x); // [n, 1280]
                    let logits = net.heads.forward(embedding.clone());
                    (logits.reshape([n, members, classes]), embedding)
                }
                Net::Null => unreachable!("answered above"),
            };
            let flat = read(softmax(logits, 2))?; // [n, members, classes]
            probs.extend(split_probs(&flat, members, classes));
            if with_embeddings {
                let flat = read(embedding)?; // [n, embedding_dim]
                embeddings.extend(flat.chunks(self.config.embedding_dim).map(<[f32]>::to_vec));
            }
        }
        Ok((probs, embeddings))
    }

    /// # Shapes
    /// - returns `[n, channels, input_size, input_size]` on `device`
    pub(crate) fn images_tensor(&self, images: &[f32], n: usize, device: &Device) -> Tensor<4> {
        let side = self.config.input_size;
        let shape = [n, self.config.channels, side, side];
        Tensor::from_data(TensorData::new(images.to_vec(), shape), device)
    }
}

/// `[n, members, classes]` flat values as `out[item][member][class]`.
fn split_probs(flat: &[f32], members: usize, classes: usize) -> CommitteeProbs {
    flat.chunks(members * classes)
        .map(|item| item.chunks(classes).map(<[f32]>::to_vec).collect())
        .collect()
}

/// The K heads as one linear layer on the backbone embedding.
fn heads_layer(config: &ArchitectureConfig, device: &Device) -> Linear {
    LinearConfig::new(config.embedding_dim, config.members * config.num_classes).init(device)
}

fn validate_null(config: &ArchitectureConfig) -> Result<(), ModelError> {
    if config.input_len() != 0 || config.embedding_dim != 0 {
        return Err(ModelError::InvalidConfig(
            "the null architecture takes no input and has no embedding".into(),
        ));
    }
    if config.num_classes == 0 || config.members == 0 {
        return Err(ModelError::InvalidConfig(
            "the null architecture needs classes and members to answer with".into(),
        ));
    }
    Ok(())
}

fn validate_mobilenet(config: &ArchitectureConfig) -> Result<(), ModelError> {
    let problem = if config.channels != 3 {
        Some(format!("takes RGB input, not {} channels", config.channels))
    } else if config.embedding_dim != mobilenet::EMBEDDING_DIM {
        Some(format!(
            "has a {}-wide embedding, not {}",
            mobilenet::EMBEDDING_DIM,
            config.embedding_dim
        ))
    } else if !(32..=512).contains(&config.input_size) {
        Some(format!(
            "runs at 32 to 512 pixels, not {}",
            config.input_size
        ))
    } else if config.members < 2 {
        Some("needs at least 2 committee members".to_string())
    } else if config.num_classes < 2 {
        Some("needs at least 2 classes".to_string())
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ModelError::InvalidConfig(format!("mobilenet_v2 {problem}"))),
        None => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::test_data::squares;

    fn config() -> ArchitectureConfig {
        ArchitectureConfig::small_cnn(10, 3)
    }

    fn committee(seed: u64) -> Committee {
        Committee::init(&config(), seed, &Device::flex()).unwrap()
    }

    #[test]
    fn the_null_committee_answers_uniformly_and_has_no_weights() {
        let null = ArchitectureConfig::null(4, 3);
        let committee = Committee::init(&null, 7, &Device::flex()).unwrap();
        let probs = committee.predict(&[], 5).unwrap();
        assert_eq!(probs, vec![vec![vec![0.25; 4]; 3]; 5]);
        assert!(committee.weights_to_bytes().unwrap().is_empty());
        let loaded = Committee::from_weights(&null, &[], &Device::flex()).unwrap();
        assert_eq!(
            loaded.predict(&[], 1).unwrap(),
            vec![vec![vec![0.25; 4]; 3]]
        );
        assert!(matches!(
            Committee::from_weights(&null, &[1, 2, 3], &Device::flex()),
            Err(ModelError::Weights(_))
        ));
        // Input where none is taken, or a null config with an input size.
        assert!(committee.predict(&[0.5], 1).is_err());
        let sized = ArchitectureConfig {
            input_size: 28,
            channels: 1,
            ..null
        };
        assert!(Committee::init(&sized, 0, &Device::flex()).is_err());
    }

    fn assert_close(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>], tolerance: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a
            .iter()
            .flatten()
            .flatten()
            .zip(b.iter().flatten().flatten())
        {
            assert!((x - y).abs() <= tolerance, "{x} vs {y}");
        }
    }

    #[test]
    fn is_send_and_sync() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<Committee>();
    }

    #[test]
    fn predicts_one_distribution_per_item_and_member() {
        let committee = committee(1);
        let (images, _) = squares(&config(), 5, 0);
        let (probs, embeddings) = committee.predict_with_embeddings(&images, 5).unwrap();

        assert_eq!(probs.len(), 5);
        for item in &probs {
            assert_eq!(item.len(), 3);
            for member in item {
                assert_eq!(member.len(), 10);
                let sum: f32 = member.iter().sum();
                assert!((sum - 1.0).abs() < 1e-4, "sum {sum}");
                assert!(member.iter().all(|p| (0.0..=1.0).contains(p)));
            }
        }
        assert_eq!(embeddings.len(), 5);
        assert!(embeddings.iter().all(|e| e.len() == config().embedding_dim));
        // The embedding is taken after the ReLU.
        assert!(embeddings.iter().flatten().all(|&v| v >= 0.0));
        assert_close(&committee.predict(&images, 5).unwrap(), &probs, 0.0);
    }

    #[test]
    fn large_batches_match_small_ones() {
        // More than one inference chunk: items must stay in order across chunks.
        let committee = committee(1);
        let n = INFERENCE_CHUNK + 3;
        let (images, _) = squares(&config(), n, 0);
        let all = committee.predict(&images, n).unwrap();
        let tail = committee
            .predict(&images[(n - 3) * config().input_len()..], 3)
            .unwrap();
        assert_eq!(all.len(), n);
        assert_close(&all[n - 3..], &tail, 1e-5);
    }

    #[test]
    fn an_empty_batch_predicts_nothing() {
        assert!(committee(1).predict(&[], 0).unwrap().is_empty());
    }

    #[test]
    fn refuses_bad_input() {
        let committee = committee(1);
        let (mut images, _) = squares(&config(), 2, 0);
        assert!(matches!(
            committee.predict(&images, 3),
            Err(ModelError::BadInput { .. })
        ));
        assert!(matches!(
            committee.predict(&images[1..], 2),
            Err(ModelError::BadInput { .. })
        ));
        images[7] = f32::NAN;
        assert!(matches!(
            committee.predict_with_embeddings(&images, 2),
            Err(ModelError::BadInput { .. })
        ));
    }

    #[test]
    fn refuses_bad_configs() {
        let device = Device::flex();
        let mut unknown = config();
        unknown.arch = "resnet50".into();
        assert!(matches!(
            Committee::init(&unknown, 0, &device),
            Err(ModelError::UnknownArchitecture(name)) if name == "resnet50"
        ));
        let lonely = ArchitectureConfig::small_cnn(10, 1);
        assert!(matches!(
            Committee::init(&lonely, 0, &device),
            Err(ModelError::InvalidConfig(_))
        ));
    }

    #[test]
    fn init_is_deterministic_for_a_seed() {
        let (images, _) = squares(&config(), 4, 0);
        let a = committee(7).predict(&images, 4).unwrap();
        let b = committee(7).predict(&images, 4).unwrap();
        let other = committee(8).predict(&images, 4).unwrap();
        assert_close(&a, &b, 0.0);
        assert_ne!(a, other, "another seed must give other weights");
        // Each head has its own initialisation.
        assert_ne!(a[0][0], a[0][1]);
    }

    #[test]
    fn weights_round_trip_exactly() {
        let committee = committee(3);
        let bytes = committee.weights_to_bytes().unwrap();
        let loaded = Committee::from_weights(&config(), &bytes, &Device::flex()).unwrap();

        let (images, _) = squares(&config(), 6, 1);
        assert_close(
            &committee.predict(&images, 6).unwrap(),
            &loaded.predict(&images, 6).unwrap(),
            1e-6,
        );
        assert_eq!(loaded.config(), &config());
    }

    #[test]
    fn refuses_weights_that_do_not_fit() {
        let device = Device::flex();
        let bytes = committee(3).weights_to_bytes().unwrap();
        let refused = |config: &ArchitectureConfig, bytes: &[u8]| {
            matches!(
                Committee::from_weights(config, bytes, &device),
                Err(ModelError::Weights(_))
            )
        };

        assert!(refused(&config(), &bytes[..bytes.len() / 2]), "truncated");
        assert!(refused(&config(), &[]), "empty");
        assert!(refused(&config(), &[0xAB; 4096]), "garbage");
        assert!(refused(&config(), b"not a model at all"), "text");
        assert!(
            refused(&ArchitectureConfig::small_cnn(5, 3), &bytes),
            "num_classes"
        );
        assert!(
            refused(&ArchitectureConfig::small_cnn(10, 4), &bytes),
            "members"
        );
        let mut wide = config();
        wide.embedding_dim = 32;
        assert!(refused(&wide, &bytes), "embedding_dim");
    }

    #[test]
    fn corrupted_weights_never_panic() {
        // Flip bytes all over the file (header, metadata, data): every load is either a
        // clean error or a committee that still predicts finite probabilities.
        let device = Device::flex();
        let bytes = committee(3).weights_to_bytes().unwrap();
        let (images, _) = squares(&config(), 1, 0);
        let step = (bytes.len() / 200).max(1);
        for position in (0..bytes.len()).step_by(step).chain(0..64) {
            let mut corrupt = bytes.clone();
            corrupt[position] ^= 0xFF;
            match Committee::from_weights(&config(), &corrupt, &device) {
                Ok(loaded) => {
                    let probs = loaded.predict(&images, 1).unwrap();
                    assert!(probs.iter().flatten().flatten().all(|p| p.is_finite()));
                }
                Err(ModelError::Weights(_)) => {}
                Err(other) => panic!("byte {position}: unexpected error {other}"),
            }
        }
    }

    fn mobilenet_config() -> ArchitectureConfig {
        // 32 pixels: the smallest input the backbone takes, to keep the test fast.
        ArchitectureConfig::mobilenet_v2(4, 3, 32)
    }

    fn mobilenet_images(n: usize) -> Vec<f32> {
        let len = n * mobilenet_config().input_len();
        (0..len)
            .map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0)
            .collect()
    }

    #[test]
    fn a_mobilenet_committee_predicts_from_images_or_from_their_embeddings_alike() {
        let config = mobilenet_config();
        let committee = Committee::init(&config, 0, &Device::flex()).unwrap();
        assert!(committee.has_frozen_backbone());
        let images = mobilenet_images(3);
        let (probs, embeddings) = committee.predict_with_embeddings(&images, 3).unwrap();
        assert_eq!((probs.len(), probs[0].len(), probs[0][0].len()), (3, 3, 4));
        assert!(embeddings.iter().all(|e| e.len() == 1280));

        let flat = committee.embed(&images, 3).unwrap();
        assert_eq!(flat, embeddings.concat());
        let from_embeddings = committee.predict_embeddings(&flat, 3).unwrap();
        assert_close(&probs, &from_embeddings, 1e-5);
        assert!(matches!(
            committee.predict_embeddings(&flat[1..], 3),
            Err(ModelError::BadInput { .. })
        ));
    }

    #[test]
    fn mobilenet_weights_round_trip_and_new_heads_keep_the_backbone() {
        let config = mobilenet_config();
        let device = Device::flex();
        let committee = Committee::init(&config, 0, &device).unwrap();
        let bytes = committee.weights_to_bytes().unwrap();
        let loaded = Committee::from_weights(&config, &bytes, &device).unwrap();
        let images = mobilenet_images(2);
        assert_close(
            &committee.predict(&images, 2).unwrap(),
            &loaded.predict(&images, 2).unwrap(),
            1e-6,
        );
        // A small-CNN config does not load MobileNetV2 weights, nor the reverse.
        assert!(matches!(
            Committee::from_weights(&ArchitectureConfig::small_cnn(4, 3), &bytes, &device),
            Err(ModelError::Weights(_))
        ));
        let small = Committee::init(&ArchitectureConfig::small_cnn(4, 3), 0, &device).unwrap();
        assert!(matches!(
            Committee::from_weights(&config, &small.weights_to_bytes().unwrap(), &device),
            Err(ModelError::Weights(_))
        ));

        // Heads trained elsewhere (two members now): same embeddings, other probabilities.
        let data = super::super::EmbeddingData {
            embeddings: committee.embed(&mobilenet_images(8), 8).unwrap(),
            dim: 1280,
            labels: vec![0, 1, 2, 3, 0, 1, 2, 3],
        };
        let options = super::super::HeadsOptions {
            members: 2,
            num_classes: 4,
            epochs: 2,
            validation_share: 0.0,
            ..super::super::HeadsOptions::default()
        };
        let (heads, _) = super::super::train_heads(&data, &options, &device, |_| true).unwrap();
        let retrained = committee.with_heads(heads).unwrap();
        assert_eq!(retrained.config().members, 2);
        assert_eq!(
            retrained.embed(&images, 2).unwrap(),
            committee.embed(&images, 2).unwrap(),
            "the backbone is frozen"
        );
        assert_eq!(retrained.predict(&images, 2).unwrap()[0].len(), 2);
    }

    #[test]
    fn refuses_mobilenet_configs_it_cannot_run() {
        let device = Device::flex();
        for (config, why) in [
            (
                ArchitectureConfig::mobilenet_v2(4, 3, 16),
                "runs at 32 to 512",
            ),
            (
                ArchitectureConfig::mobilenet_v2(4, 1, 96),
                "2 committee members",
            ),
            (
                ArchitectureConfig {
                    channels: 1,
                    ..ArchitectureConfig::mobilenet_v2(4, 3, 96)
                },
                "RGB",
            ),
        ] {
            match Committee::init(&config, 0, &device) {
                Err(ModelError::InvalidConfig(message)) => {
                    assert!(message.contains(why), "{message}");
                }
                other => panic!("{config:?}: expected InvalidConfig, got {other:?}"),
            }
        }
        assert!(matches!(
            committee(1).predict_embeddings(&[0.0; 64], 1),
            Err(ModelError::InvalidConfig(_))
        ));
    }

    #[test]
    fn refuses_non_finite_weights() {
        let bytes = committee(3).weights_to_bytes().unwrap();
        // Overwrite the last parameter value (data sits at the end of a burnpack) with NaN.
        let mut poisoned = bytes.clone();
        let end = poisoned.len();
        poisoned[end - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            Committee::from_weights(&config(), &poisoned, &Device::flex()),
            Err(ModelError::Weights(message)) if message.contains("non-finite")
        ));
    }
}
