//! Fine-tuning a [`Committee`] on labelled images.
//!
//! Shaped by what active learning needs from a committee:
//! - **Diverse members.** Each head trains on its own bootstrap sample, as an *online*
//!   bootstrap: a fixed Poisson(1) weight per (head, example) scales that head's cross-entropy,
//!   which is a resample with replacement without materialising K datasets or K backbone passes.
//!   The backbone learns from all heads together.
//! - **Imbalanced labels.** Annotators label what the sampler picks, rarely a balanced set, so
//!   the loss weights classes by inverse frequency.
//! - **Small data, no supervision.** Early stopping on a validation split (deterministic by
//!   seed) keeps the best epoch, so a run never ends worse than its best point.
//!
//! Training runs on the autodiff version of the committee's device; the result is handed back
//! on the plain device, ready for inference.

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Tensor, TensorData};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::committee::{BackboneHeads, Committee, Net};
use super::net::{ResCnn, SmallCnn, stream_seed};
use super::recipe::{
    EpochReport, argmax, bootstrap_weights, class_weights, mean_over_members, split,
};
use super::tensors::step_loss;
use super::{ModelError, check_images};

/// Stream tags: each use of the run's seed draws from its own generator, so changing how many
/// values one of them takes (more epochs, another head) leaves the others unchanged.
const SHUFFLE_STREAM: u64 = 0x5AFF;
const DROPOUT_STREAM: u64 = 0xD809;

/// Labelled training images.
#[derive(Clone, Debug, Default)]
pub struct TrainData {
    /// `labels.len() * config.input_len()` values, normalized, layout `[n, channels, h, w]`.
    pub images: Vec<f32>,
    /// One class index per image, each `< config.num_classes`.
    pub labels: Vec<usize>,
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Upper bound on passes over the training split (early stopping may end sooner).
    pub epochs: usize,
    pub batch_size: usize,
    /// AdamW's peak learning rate (see `cosine`).
    pub learning_rate: f64,
    /// Decay the learning rate along a half cosine from `learning_rate` in the first epoch to
    /// nearly zero after `epochs`; otherwise it stays constant.
    pub cosine: bool,
    /// Share of the embedding's units dropped (zeroed, the rest scaled up) for each training
    /// example, in `[0, 1)`; inference never drops. A regulariser for small label sets.
    pub dropout: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Seeds the validation split, the bootstrap weights and the shuffling.
    pub seed: u64,
    /// Share of `data` held out for early stopping, in `[0, 1)` (1 leaves nothing to train on:
    /// [`ModelError::NotEnoughData`]); 0 (or too little data to hold
    /// out a single example) trains on everything and keeps the last epoch.
    pub validation_share: f64,
    /// Epochs in a row without a better validation result (accuracy, then loss) before training
    /// stops; 0 counts as 1.
    pub patience: usize,
    /// A pretrained backbone (MobileNetV2): train only its last this many blocks (with its final
    /// convolution and the heads) and keep the rest frozen; `None` trains every layer. The small
    /// CNN has no pretrained layers to keep, and refuses it.
    pub unfrozen_blocks: Option<usize>,
}

impl Default for TrainOptions {
    /// Tuned for the small CNN on Fashion-MNIST-sized data on a CPU: a few thousand labels
    /// train in well under a minute, and early stopping usually ends the run before `epochs`.
    fn default() -> Self {
        Self {
            epochs: 20,
            batch_size: 64,
            learning_rate: 1e-3,
            cosine: false,
            dropout: 0.0,
            weight_decay: 1e-4,
            seed: 0,
            validation_share: 0.1,
            patience: 3,
            unfrozen_blocks: None,
        }
    }
}

/// Fine-tunes `start` (a fresh [`Committee::init`] or a loaded previous version) on `data` with
/// AdamW, and returns the best epoch's weights. A small CNN trains whole; a MobileNetV2 committee
/// trains its heads with its backbone, whole or only the last
/// [`unfrozen_blocks`](TrainOptions::unfrozen_blocks) (full mode; heads mode is
/// [`train_heads`](super::train_heads), on cached embeddings).
///
/// `on_epoch` is called after every epoch; returning `false` stops training with
/// [`ModelError::Cancelled`]. With zero training examples `start` comes back unchanged (a fresh,
/// untrained model is a legal first version). A NaN or infinite loss is
/// [`ModelError::Diverged`].
pub fn train(
    start: Committee,
    data: &TrainData,
    options: &TrainOptions,
    on_epoch: impl FnMut(&EpochReport) -> bool,
) -> Result<Committee, ModelError> {
    let config = start.config.clone();
    let n = data.labels.len();
    check_images(&config, &data.images, n)?;
    if let Some(label) = data
        .labels
        .iter()
        .find(|&&label| label >= config.num_classes)
    {
        return Err(ModelError::bad_input(format!(
            "label {label} is out of range for {} classes",
            config.num_classes
        )));
    }
    check_options(options)?;
    if options.unfrozen_blocks.is_some() && matches!(start.net, Net::Small(_) | Net::Residual(_)) {
        return Err(ModelError::InvalidOptions(format!(
            "{} has no pretrained layers to keep frozen: it always trains whole",
            config.arch
        )));
    }
    if n == 0 || options.epochs == 0 {
        return Ok(start);
    }

    match &start.net {
        Net::Small(net) => fit(net.clone(), &start, data, options, on_epoch),
        Net::Residual(net) => fit(net.clone(), &start, data, options, on_epoch),
        Net::Mobile(net) => {
            let net = net.clone().for_fine_tuning(options.unfrozen_blocks);
            fit(net, &start, data, options, on_epoch)
        }
        Net::Null => Err(ModelError::InvalidConfig(
            "the null architecture has nothing to train".into(),
        )),
    }
}

/// A committee's network as the fine-tuning loop sees it.
pub(crate) trait Tunable: Module {
    /// `[batch, members, classes]` logits, the heads reading the embedding times `mask`.
    fn logits(&self, images: Tensor<4>, mask: Option<Tensor<2>>, members: usize) -> Tensor<3>;
    fn into_net(self) -> Net;
}

impl Tunable for SmallCnn {
    fn logits(&self, images: Tensor<4>, mask: Option<Tensor<2>>, _members: usize) -> Tensor<3> {
        self.forward_masked(images, mask).logits
    }

    fn into_net(self) -> Net {
        Net::Small(self)
    }
}

impl Tunable for ResCnn {
    fn logits(&self, images: Tensor<4>, mask: Option<Tensor<2>>, _members: usize) -> Tensor<3> {
        self.forward_masked(images, mask).logits
    }

    fn into_net(self) -> Net {
        Net::Residual(self)
    }
}

impl Tunable for BackboneHeads {
    fn logits(&self, images: Tensor<4>, mask: Option<Tensor<2>>, members: usize) -> Tensor<3> {
        self.forward_masked(images, mask, members)
    }

    fn into_net(self) -> Net {
        Net::Mobile(self)
    }
}

/// The training loop of [`train`], for either network.
fn fit<M: Tunable>(
    net: M,
    start: &Committee,
    data: &TrainData,
    options: &TrainOptions,
    mut on_epoch: impl FnMut(&EpochReport) -> bool,
) -> Result<Committee, ModelError> {
    let config = start.config.clone();
    let n = data.labels.len();
    let (train_set, val_set) = split(n, options.validation_share, options.seed)?;
    let class_weights = class_weights(&data.labels, &train_set, config.num_classes);
    let bootstrap = bootstrap_weights(n, config.members, options.seed);

    let train_device = start.device.clone().autodiff();
    let mut net = net.train();
    let mut optimizer = AdamWConfig::new()
        .with_weight_decay(options.weight_decay as f32)
        .init();
    let mut best: Option<Best<M>> = None;
    let mut epochs_since_best = 0;
    let mut order = train_set.clone();

    for epoch in 1..=options.epochs {
        let mut rng = StdRng::seed_from_u64(stream_seed(
            stream_seed(options.seed, SHUFFLE_STREAM),
            epoch as u64,
        ));
        order.shuffle(&mut rng);
        let learning_rate = options.learning_rate_at(epoch);
        let mut dropout_rng = StdRng::seed_from_u64(stream_seed(
            stream_seed(options.seed, DROPOUT_STREAM),
            epoch as u64,
        ));

        let (mut loss_sum, mut weight_sum) = (0.0_f64, 0.0_f64);
        for batch in order.chunks(options.batch_size) {
            let targets = LossWeights::new(batch, data, &bootstrap, &class_weights, &config);
            if targets.total == 0.0 {
                // Every head left all of these examples out of its bootstrap sample.
                continue;
            }
            let images = gather(data, batch, config.input_len());
            let x = start.images_tensor(&images, batch.len(), &train_device);
            let weights = Tensor::<3>::from_data(
                TensorData::new(
                    targets.values,
                    [batch.len(), config.members, config.num_classes],
                ),
                &train_device,
            );
            let mask = (options.dropout > 0.0).then(|| {
                dropout_mask(
                    &mut dropout_rng,
                    batch.len(),
                    config.embedding_dim,
                    options.dropout,
                    &train_device,
                )
            });
            // [batch, members, classes]
            let log_probs = log_softmax(net.logits(x, mask, config.members), 2);
            let loss = (log_probs * weights).sum().neg().div_scalar(targets.total);
            // Read back every batch: a NaN stops the run at once instead of training on.
            let value = step_loss(&loss, epoch)?;
            loss_sum += f64::from(value * targets.total);
            weight_sum += f64::from(targets.total);

            let grads = GradientsParams::from_grads(loss.backward(), &net);
            net = optimizer.step(learning_rate, net, grads);
        }

        let snapshot = net.valid();
        let validation = if val_set.is_empty() {
            None
        } else {
            let candidate = Committee::assemble(
                snapshot.clone().into_net(),
                config.clone(),
                start.device.clone(),
            );
            Some(evaluate(&candidate, data, &val_set)?)
        };
        let report = EpochReport {
            epoch,
            loss: if weight_sum > 0.0 {
                loss_sum / weight_sum
            } else {
                0.0
            },
            val_accuracy: validation.map(|v| v.accuracy),
        };
        if !on_epoch(&report) {
            return Err(ModelError::Cancelled);
        }

        // Without a validation split the last epoch is the result.
        let Some(validation) = validation else {
            continue;
        };
        if best
            .as_ref()
            .is_none_or(|b| validation.better_than(&b.validation))
        {
            best = Some(Best {
                validation,
                net: snapshot,
            });
            epochs_since_best = 0;
        } else {
            epochs_since_best += 1;
            if epochs_since_best >= options.patience.max(1) {
                break;
            }
        }
    }

    Ok(Committee::assemble(
        best.map_or_else(|| net.valid(), |b| b.net).into_net(),
        config,
        start.device.clone(),
    ))
}

fn check_options(options: &TrainOptions) -> Result<(), ModelError> {
    let problem = if options.batch_size == 0 {
        Some("batch_size must be at least 1")
    } else if !(options.learning_rate.is_finite() && options.learning_rate > 0.0) {
        Some("learning_rate must be positive and finite")
    } else if !(options.weight_decay.is_finite() && options.weight_decay >= 0.0) {
        Some("weight_decay must be non-negative and finite")
    } else if !(0.0..1.0).contains(&options.dropout) {
        Some("dropout must be within [0, 1)")
    } else if !(0.0..=1.0).contains(&options.validation_share) {
        Some("validation_share must be within [0, 1]")
    } else {
        None
    };
    match problem {
        Some(reason) => Err(ModelError::InvalidOptions(reason.to_string())),
        None => Ok(()),
    }
}

impl TrainOptions {
    /// The learning rate of `epoch` (counted from 1).
    pub fn learning_rate_at(&self, epoch: usize) -> f64 {
        if !self.cosine {
            return self.learning_rate;
        }
        let progress = (epoch.saturating_sub(1)) as f64 / self.epochs.max(1) as f64;
        self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// An inverted-dropout mask for `[batch, dim]` embeddings: each unit kept with probability
/// `1 - p` and then scaled by `1 / (1 - p)`, so the expected activation is unchanged and
/// inference needs no rescaling. Drawn from our own seeded RNG (burn's is process-wide), so a
/// run is reproducible.
fn dropout_mask(
    rng: &mut StdRng,
    batch: usize,
    dim: usize,
    p: f64,
    device: &burn::tensor::Device,
) -> Tensor<2> {
    let keep = (1.0 / (1.0 - p)) as f32;
    let values: Vec<f32> = (0..batch * dim)
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    Tensor::from_data(TensorData::new(values, [batch, dim]), device)
}

/// The per-(item, head, class) loss weights of one batch: zero except at the label, where it is
/// the head's bootstrap weight times the class weight. Multiplied into the log-probabilities,
/// this is every head's weighted cross-entropy at once.
struct LossWeights {
    /// `[batch, members, classes]`, row-major.
    values: Vec<f32>,
    total: f32,
}

impl LossWeights {
    fn new(
        batch: &[usize],
        data: &TrainData,
        bootstrap: &[Vec<f32>],
        class_weights: &[f32],
        config: &super::ArchitectureConfig,
    ) -> Self {
        let (members, classes) = (config.members, config.num_classes);
        let mut values = vec![0.0; batch.len() * members * classes];
        let mut total = 0.0;
        for (row, &i) in batch.iter().enumerate() {
            let label = data.labels[i];
            for (head, weights) in bootstrap.iter().enumerate() {
                let weight = weights[i] * class_weights[label];
                values[(row * members + head) * classes + label] = weight;
                total += weight;
            }
        }
        Self { values, total }
    }
}

fn gather(data: &TrainData, indices: &[usize], input_len: usize) -> Vec<f32> {
    let mut images = Vec::with_capacity(indices.len() * input_len);
    for &i in indices {
        images.extend_from_slice(&data.images[i * input_len..(i + 1) * input_len]);
    }
    images
}

/// How the committee's mean prediction does on held-out examples.
#[derive(Clone, Copy, Debug)]
struct Validation {
    accuracy: f64,
    /// Mean negative log-likelihood: breaks ties in accuracy, frequent on small splits.
    nll: f64,
}

impl Validation {
    fn better_than(&self, other: &Validation) -> bool {
        self.accuracy > other.accuracy || (self.accuracy == other.accuracy && self.nll < other.nll)
    }
}

struct Best<M> {
    validation: Validation,
    net: M,
}

fn evaluate(
    committee: &Committee,
    data: &TrainData,
    indices: &[usize],
) -> Result<Validation, ModelError> {
    let input_len = committee.config.input_len();
    let probs = committee.predict(&gather(data, indices, input_len), indices.len())?;
    let (mut correct, mut nll) = (0_usize, 0.0_f64);
    for (item, &i) in probs.iter().zip(indices) {
        let mean = mean_over_members(item);
        let predicted = argmax(&mean);
        correct += usize::from(predicted == data.labels[i]);
        nll -= f64::from(mean[data.labels[i]].max(1e-12)).ln();
    }
    Ok(Validation {
        accuracy: correct as f64 / indices.len() as f64,
        nll: nll / indices.len() as f64,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Instant;

    use burn::tensor::Device;

    use super::*;
    use crate::model::ArchitectureConfig;
    use crate::model::test_data::squares;

    fn config() -> ArchitectureConfig {
        ArchitectureConfig::small_cnn(10, 4)
    }

    fn data(n: usize, seed: u64) -> TrainData {
        let (images, labels) = squares(&config(), n, seed);
        TrainData { images, labels }
    }

    fn fresh() -> Committee {
        Committee::init(&config(), 11, &Device::flex()).unwrap()
    }

    fn accuracy(committee: &Committee, data: &TrainData) -> f64 {
        let probs = committee.predict(&data.images, data.labels.len()).unwrap();
        let correct = probs
            .iter()
            .zip(&data.labels)
            .filter(|(item, label)| argmax(&mean_over_members(item)) == **label)
            .count();
        correct as f64 / data.labels.len() as f64
    }

    #[test]
    fn learns_separable_images_and_keeps_members_diverse() {
        let train_data = data(400, 1);
        let held_out = data(200, 2);
        let options = TrainOptions {
            epochs: 8,
            seed: 5,
            ..TrainOptions::default()
        };
        let untrained = fresh();
        assert!(
            accuracy(&untrained, &held_out) < 0.5,
            "the task must need training"
        );

        let started = Instant::now();
        let mut reports = Vec::new();
        let trained = train(untrained, &train_data, &options, |report| {
            reports.push(report.clone());
            true
        })
        .unwrap();
        let elapsed = started.elapsed();

        let accuracy = accuracy(&trained, &held_out);
        assert!(
            accuracy > 0.9,
            "held-out accuracy {accuracy}, reports {reports:?}"
        );
        assert!(!reports.is_empty());
        assert!(
            reports
                .iter()
                .all(|r| r.val_accuracy.is_some() && r.loss.is_finite())
        );
        assert_eq!(reports[0].epoch, 1);
        eprintln!(
            "trained {} epochs in {elapsed:?}: {reports:?}",
            reports.len()
        );

        // Diversity: the members do not all say the same thing. Once trained they agree to
        // the last digit on these easy images, so probe with inputs unlike any training image,
        // where each head's own bootstrap sample shows.
        let mut rng = StdRng::seed_from_u64(8);
        let noise: Vec<f32> = (0..200 * config().input_len())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let probs = trained.predict(&noise, 200).unwrap();
        let spread = probs
            .iter()
            .flat_map(|item| {
                item[1..]
                    .iter()
                    .flat_map(move |member| member.iter().zip(&item[0]).map(|(p, q)| (p - q).abs()))
            })
            .fold(0.0_f32, f32::max);
        assert!(spread > 1e-3, "members agree to {spread}");
    }

    #[test]
    fn the_residual_network_learns_and_keeps_its_batchnorm_statistics_in_its_weights() {
        let config = ArchitectureConfig {
            arch: ArchitectureConfig::RES_CNN.to_string(),
            ..config()
        };
        let (images, labels) = squares(&config, 400, 1);
        let (held_out, truth) = squares(&config, 200, 2);
        let device = Device::flex();
        let start = Committee::init(&config, 11, &device).unwrap();
        let options = TrainOptions {
            epochs: 6,
            seed: 5,
            ..TrainOptions::default()
        };
        let trained = train(start, &TrainData { images, labels }, &options, |_| true).unwrap();
        let probs = trained.predict(&held_out, 200).unwrap();
        let right = probs
            .iter()
            .zip(&truth)
            .filter(|(item, label)| argmax(&mean_over_members(item)) == **label)
            .count();
        assert!(right > 180, "{right} of 200 held-out images right");

        // Inference runs on the running statistics training left: a reload that lost them
        // (fresh statistics: mean 0, variance 1) would predict otherwise.
        let bytes = trained.weights_to_bytes().unwrap();
        let loaded = Committee::from_weights(&config, &bytes, &device).unwrap();
        assert_eq!(loaded.predict(&held_out, 200).unwrap(), probs);
    }

    #[test]
    fn zero_examples_return_the_start_unchanged() {
        let start = fresh();
        let probe = data(3, 0);
        let before = start.predict(&probe.images, 3).unwrap();
        let mut called = false;
        let after = train(
            start,
            &TrainData::default(),
            &TrainOptions::default(),
            |_| {
                called = true;
                true
            },
        )
        .unwrap();
        assert_eq!(after.predict(&probe.images, 3).unwrap(), before);
        assert!(!called);
    }

    #[test]
    fn the_callback_can_cancel() {
        let mut epochs = 0;
        let result = train(fresh(), &data(40, 0), &TrainOptions::default(), |_| {
            epochs += 1;
            false
        });
        assert!(matches!(result, Err(ModelError::Cancelled)));
        assert_eq!(epochs, 1);
    }

    #[test]
    fn a_runaway_learning_rate_is_reported_as_divergence() {
        let options = TrainOptions {
            epochs: 3,
            batch_size: 8,
            learning_rate: 1e30,
            ..TrainOptions::default()
        };
        let result = train(fresh(), &data(40, 0), &options, |_| true);
        assert!(
            matches!(result, Err(ModelError::Diverged { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn refuses_bad_data_and_options() {
        let mut bad_label = data(4, 0);
        bad_label.labels[2] = 10;
        assert!(matches!(
            train(fresh(), &bad_label, &TrainOptions::default(), |_| true),
            Err(ModelError::BadInput { .. })
        ));

        let mut short = data(4, 0);
        short.images.pop();
        assert!(matches!(
            train(fresh(), &short, &TrainOptions::default(), |_| true),
            Err(ModelError::BadInput { .. })
        ));

        let zero_batch = TrainOptions {
            batch_size: 0,
            ..TrainOptions::default()
        };
        assert!(matches!(
            train(fresh(), &data(4, 0), &zero_batch, |_| true),
            Err(ModelError::InvalidOptions(_))
        ));

        for dropout in [1.0, -0.1, f64::NAN] {
            let bad_dropout = TrainOptions {
                dropout,
                ..TrainOptions::default()
            };
            assert!(
                matches!(
                    train(fresh(), &data(4, 0), &bad_dropout, |_| true),
                    Err(ModelError::InvalidOptions(_))
                ),
                "dropout {dropout}"
            );
        }

        let all_validation = TrainOptions {
            validation_share: 1.0,
            ..TrainOptions::default()
        };
        assert!(matches!(
            train(fresh(), &data(4, 0), &all_validation, |_| true),
            Err(ModelError::NotEnoughData(_))
        ));

        // The small CNN has nothing pretrained to keep.
        let partial = TrainOptions {
            unfrozen_blocks: Some(2),
            ..TrainOptions::default()
        };
        match train(fresh(), &data(4, 0), &partial, |_| true) {
            Err(ModelError::InvalidOptions(reason)) => {
                assert!(reason.contains("always trains whole"), "{reason}");
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
    }

    /// Every float parameter (BatchNorm running statistics included) of a MobileNetV2
    /// committee with its module's path, in the module's own order.
    fn mobilenet_params(committee: &Committee) -> Vec<(String, Vec<f32>)> {
        use burn::module::{ModuleVisitor, Param};

        #[derive(Default)]
        struct Values {
            stack: Vec<String>,
            values: Vec<(String, Vec<f32>)>,
        }
        impl ModuleVisitor for Values {
            fn enter_module(&mut self, name: &str, _container_type: &str) {
                self.stack.push(name.to_string());
            }
            fn exit_module(&mut self, _name: &str, _container_type: &str) {
                self.stack.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let values = param.val().try_into_vec_as::<f32>().unwrap();
                self.values.push((self.stack.join("."), values));
            }
        }
        let Net::Mobile(net) = &committee.net else {
            panic!("not a MobileNetV2 committee");
        };
        let mut visitor = Values::default();
        net.visit(&mut visitor);
        visitor.values
    }

    /// Which parameters moved between two committees of the same shape, by path.
    fn moved(before: &Committee, after: &Committee) -> Vec<String> {
        let (before, after) = (mobilenet_params(before), mobilenet_params(after));
        assert_eq!(before.len(), after.len());
        before
            .iter()
            .zip(&after)
            .filter(|((_, a), (_, b))| a != b)
            .map(|((path, _), _)| path.clone())
            .collect()
    }

    #[test]
    fn full_mode_fine_tunes_mobilenet_whole_or_only_its_last_blocks() {
        // 32 pixels, the smallest input the backbone takes, to keep the test fast.
        let config = ArchitectureConfig::mobilenet_v2(4, 2, 32);
        let start = Committee::init(&config, 0, &Device::flex()).unwrap();
        let (images, labels) = squares(&config, 16, 5);
        let data = TrainData { images, labels };
        let options = TrainOptions {
            epochs: 1,
            batch_size: 8,
            validation_share: 0.0,
            ..TrainOptions::default()
        };

        let partial = TrainOptions {
            unfrozen_blocks: Some(1),
            ..options.clone()
        };
        let trained = train(start.clone(), &data, &partial, |_| true).unwrap();
        let changed = moved(&start, &trained);
        let under = |prefix: &str| changed.iter().filter(|p| p.starts_with(prefix)).count();
        assert!(under("heads") > 0, "the heads train: {changed:?}");
        assert!(
            under("backbone.head") > 0,
            "the final convolution trains: {changed:?}"
        );
        assert!(
            under("backbone.blocks.16") > 0,
            "the last block trains: {changed:?}"
        );
        // Weights and BatchNorm statistics of everything before it stay as they were.
        assert_eq!(under("backbone.stem"), 0, "{changed:?}");
        for block in 0..16 {
            assert_eq!(
                under(&format!("backbone.blocks.{block}.")),
                0,
                "block {block} is frozen: {changed:?}"
            );
        }

        let whole = train(start.clone(), &data, &options, |_| true).unwrap();
        let changed = moved(&start, &whole);
        assert!(
            changed.iter().any(|p| p.starts_with("backbone.stem")),
            "without unfrozen_blocks every layer trains: {changed:?}"
        );
        assert!(
            changed.iter().any(|p| p.starts_with("backbone.blocks.0.")),
            "{changed:?}"
        );
        // Inference afterwards: probabilities for every member, nothing NaN.
        let probs = whole
            .predict(&data.images[..2 * config.input_len()], 2)
            .unwrap();
        assert!(
            probs.iter().flatten().flatten().all(|p| p.is_finite()),
            "{probs:?}"
        );
    }

    #[test]
    fn the_split_is_deterministic_and_disjoint() {
        let (train_set, val_set) = split(100, 0.1, 3).unwrap();
        assert_eq!((train_set.len(), val_set.len()), (90, 10));
        let mut all: Vec<usize> = train_set.iter().chain(&val_set).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(split(100, 0.1, 3).unwrap(), (train_set.clone(), val_set));
        assert_ne!(split(100, 0.1, 4).unwrap().0, train_set);
        // Too little data for a validation example: train on everything.
        assert_eq!(split(3, 0.1, 3).unwrap().1, Vec::<usize>::new());
    }

    #[test]
    fn rare_classes_weigh_more() {
        let labels = [0, 0, 0, 1, 2, 2];
        let weights = class_weights(&labels, &[0, 1, 2, 3, 4, 5], 4);
        assert!(weights[1] > weights[2] && weights[2] > weights[0]);
        assert_eq!(weights[3], 0.0);
        // Balanced: the mean weight per example is 1.
        let mean: f32 = labels.iter().map(|&l| weights[l]).sum::<f32>() / 6.0;
        assert!((mean - 1.0).abs() < 1e-6);
    }

    #[test]
    fn each_head_has_its_own_bootstrap_sample() {
        let weights = bootstrap_weights(5000, 3, 9);
        for head in &weights {
            let mean = head.iter().sum::<f32>() / head.len() as f32;
            assert!((mean - 1.0).abs() < 0.05, "Poisson(1) mean {mean}");
            let left_out = head.iter().filter(|&&w| w == 0.0).count() as f32 / 5000.0;
            assert!(
                (left_out - (-1.0_f32).exp()).abs() < 0.03,
                "P(0) {left_out}"
            );
        }
        assert_ne!(weights[0], weights[1]);
        assert_eq!(bootstrap_weights(5000, 3, 9), weights);
    }

    #[test]
    fn cosine_decays_from_the_peak_to_near_zero() {
        let options = TrainOptions {
            epochs: 10,
            learning_rate: 2e-3,
            cosine: true,
            ..TrainOptions::default()
        };
        assert_eq!(options.learning_rate_at(1), 2e-3);
        let rates: Vec<f64> = (1..=10).map(|e| options.learning_rate_at(e)).collect();
        assert!(rates.windows(2).all(|w| w[1] < w[0]), "{rates:?}");
        // Half way (epoch 6 of 10 starts at progress 0.5): half the peak.
        assert!((options.learning_rate_at(6) - 1e-3).abs() < 1e-12);
        assert!(options.learning_rate_at(10) < 0.03 * 2e-3);
        let constant = TrainOptions {
            cosine: false,
            ..options
        };
        assert!((1..=10).all(|e| constant.learning_rate_at(e) == 2e-3));
    }

    #[test]
    fn dropout_masks_keep_the_expected_activation_and_are_reproducible() {
        let device = Device::flex();
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            dropout_mask(&mut rng, 100, 64, 0.25, &device)
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
        };
        let mask = draw(3);
        let dropped = mask.iter().filter(|&&v| v == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.25).abs() < 0.03, "dropped {dropped}");
        assert!(
            mask.iter()
                .all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6)
        );
        let mean = mask.iter().map(|&v| f64::from(v)).sum::<f64>() / mask.len() as f64;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        assert_eq!(draw(3), mask);
        assert_ne!(draw(4), mask);
    }

    #[test]
    fn training_with_dropout_and_cosine_still_learns() {
        let options = TrainOptions {
            epochs: 8,
            seed: 5,
            cosine: true,
            dropout: 0.3,
            ..TrainOptions::default()
        };
        let trained = train(fresh(), &data(400, 1), &options, |_| true).unwrap();
        let accuracy = accuracy(&trained, &data(200, 2));
        assert!(accuracy > 0.9, "held-out accuracy {accuracy}");
        // Inference never drops: the same input gives the same output.
        let probe = data(5, 7);
        assert_eq!(
            trained.predict(&probe.images, 5).unwrap(),
            trained.predict(&probe.images, 5).unwrap()
        );
    }
}
