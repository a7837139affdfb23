//! Heads-only training: K linear heads on cached backbone embeddings (the frozen-backbone
//! "heads mode" of a retrain).
//!
//! With the backbone frozen, a retrain needs no images and no backbone pass: the embeddings
//! the workers returned with their predictions are the whole input. The K heads are one
//! `[dim, K * classes]` linear layer, so one matrix product computes every member; each member
//! still learns from its own online bootstrap sample (Poisson(1) weight per example and head,
//! as in [`train`](super::train)), with inverse-frequency class weights and early stopping on a
//! validation split.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::ModelError;
use super::net::stream_seed;
use super::recipe::{
    EpochReport, argmax, bootstrap_weights, class_weights, mean_over_members, split,
};
use super::tensors::step_loss;

const SHUFFLE_STREAM: u64 = 0x4EAD;

/// Cached embeddings and their labels.
#[derive(Clone, Debug, Default)]
pub struct EmbeddingData {
    /// `labels.len() * dim` values, row-major `[n, dim]`.
    pub embeddings: Vec<f32>,
    pub dim: usize,
    pub labels: Vec<usize>,
}

#[derive(Clone, Debug)]
pub struct HeadsOptions {
    pub members: usize,
    pub num_classes: usize,
    /// Upper bound on passes; early stopping may end sooner.
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
    pub validation_share: f64,
    pub patience: usize,
}

impl Default for HeadsOptions {
    fn default() -> Self {
        Self {
            members: 3,
            num_classes: 10,
            epochs: 20,
            batch_size: 256,
            learning_rate: 1e-3,
            weight_decay: 1e-4,
            seed: 0,
            validation_share: 0.1,
            patience: 3,
        }
    }
}

/// What a heads run did.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadsReport {
    pub epochs: usize,
    /// Mean weighted cross-entropy of the last epoch.
    pub loss: f64,
    /// Accuracy of the committee mean on the validation split, best epoch.
    pub val_accuracy: Option<f64>,
}

/// K heads as one linear layer: `logits[b, k, c] = (x W + b)[b, k * classes + c]`.
#[derive(Clone, Debug)]
pub struct Heads {
    pub(crate) linear: Linear,
    pub(crate) members: usize,
    pub(crate) num_classes: usize,
    pub(crate) dim: usize,
}

impl Heads {
    /// Class probabilities per item and member: `out[item][member][class]`.
    pub fn predict(
        &self,
        embeddings: &[f32],
        device: &Device,
    ) -> Result<Vec<Vec<Vec<f32>>>, ModelError> {
        let n = embeddings.len() / self.dim.max(1);
        let x = Tensor::<2>::from_data(
            TensorData::new(embeddings[..n * self.dim].to_vec(), [n, self.dim]),
            device,
        );
        let logits = self
            .linear
            .forward(x)
            .reshape([n, self.members, self.num_classes]);
        let flat = softmax(logits, 2)
            .try_into_vec_as::<f32>()
            .map_err(|err| ModelError::Backend(err.to_string()))?;
        Ok(flat
            .chunks(self.members * self.num_classes)
            .map(|item| item.chunks(self.num_classes).map(<[f32]>::to_vec).collect())
            .collect())
    }
}

/// Trains K fresh heads on `data` and returns the best epoch's heads (on the plain device).
///
/// `on_epoch` sees each epoch's report (as [`train`](super::train)'s does); returning false
/// cancels the run with [`ModelError::Cancelled`].
pub fn train_heads(
    data: &EmbeddingData,
    options: &HeadsOptions,
    device: &Device,
    mut on_epoch: impl FnMut(&EpochReport) -> bool,
) -> Result<(Heads, HeadsReport), ModelError> {
    let n = data.labels.len();
    let (dim, members, classes) = (data.dim, options.members, options.num_classes);
    if dim == 0 || data.embeddings.len() != n * dim {
        return Err(ModelError::bad_input(format!(
            "expected {n} embeddings of {dim} values, got {} values",
            data.embeddings.len()
        )));
    }
    if members < 2 || classes < 2 || options.batch_size == 0 {
        return Err(ModelError::InvalidOptions(
            "heads need at least 2 members, 2 classes and a batch size".into(),
        ));
    }
    if let Some(label) = data.labels.iter().find(|&&l| l >= classes) {
        return Err(ModelError::bad_input(format!(
            "label {label} is out of range for {classes} classes"
        )));
    }
    let plain = device.clone().without_autodiff();
    let train_device = plain.clone().autodiff();
    let (train_set, val_set) = split(n, options.validation_share, options.seed)?;
    let class_weights = class_weights(&data.labels, &train_set, classes);
    let bootstrap = bootstrap_weights(n, members, options.seed);

    let mut linear = LinearConfig::new(dim, members * classes)
        .init(&plain)
        .train();
    let mut optimizer = AdamWConfig::new()
        .with_weight_decay(options.weight_decay as f32)
        .init();
    let mut order = train_set;
    let mut best: Option<(f64, Linear)> = None;
    let mut since_best = 0;
    let mut report = HeadsReport {
        epochs: 0,
        loss: 0.0,
        val_accuracy: None,
    };
    let mut rows = Vec::with_capacity(options.batch_size * dim);
    for epoch in 1..=options.epochs {
        let mut rng = StdRng::seed_from_u64(stream_seed(
            stream_seed(options.seed, SHUFFLE_STREAM),
            epoch as u64,
        ));
        order.shuffle(&mut rng);
        let (mut loss_sum, mut weight_sum) = (0.0_f64, 0.0_f64);
        for batch in order.chunks(options.batch_size) {
            let mut weights = vec![0.0_f32; batch.len() * members * classes];
            let mut total = 0.0_f32;
            rows.clear();
            for (row, &i) in batch.iter().enumerate() {
                rows.extend_from_slice(&data.embeddings[i * dim..(i + 1) * dim]);
                let label = data.labels[i];
                for (head, w) in bootstrap.iter().enumerate() {
                    let weight = w[i] * class_weights[label];
                    weights[(row * members + head) * classes + label] = weight;
                    total += weight;
                }
            }
            if total == 0.0 {
                continue;
            }
            let x = Tensor::<2>::from_data(
                TensorData::new(rows.clone(), [batch.len(), dim]),
                &train_device,
            );
            let w = Tensor::<3>::from_data(
                TensorData::new(weights, [batch.len(), members, classes]),
                &train_device,
            );
            let logits = linear.forward(x).reshape([batch.len(), members, classes]);
            let loss = (log_softmax(logits, 2) * w).sum().neg().div_scalar(total);
            let value = step_loss(&loss, epoch)?;
            loss_sum += f64::from(value * total);
            weight_sum += f64::from(total);
            let grads = GradientsParams::from_grads(loss.backward(), &linear);
            linear = optimizer.step(options.learning_rate, linear, grads);
        }
        report.epochs = epoch;
        report.loss = if weight_sum > 0.0 {
            loss_sum / weight_sum
        } else {
            0.0
        };
        if val_set.is_empty() {
            if !on_epoch(&EpochReport {
                epoch,
                loss: report.loss,
                val_accuracy: None,
            }) {
                return Err(ModelError::Cancelled);
            }
            continue;
        }
        let snapshot = linear.valid();
        let heads = Heads {
            linear: snapshot.clone(),
            members,
            num_classes: classes,
            dim,
        };
        let mut val = Vec::with_capacity(val_set.len() * dim);
        for &i in &val_set {
            val.extend_from_slice(&data.embeddings[i * dim..(i + 1) * dim]);
        }
        let probs = heads.predict(&val, &plain)?;
        let correct = probs
            .iter()
            .zip(&val_set)
            .filter(|(item, i)| {
                let mean = mean_over_members(item);
                argmax(&mean) == data.labels[**i]
            })
            .count();
        let accuracy = correct as f64 / val_set.len() as f64;
        if !on_epoch(&EpochReport {
            epoch,
            loss: report.loss,
            val_accuracy: Some(accuracy),
        }) {
            return Err(ModelError::Cancelled);
        }
        if best.as_ref().is_none_or(|(a, _)| accuracy > *a) {
            best = Some((accuracy, snapshot));
            report.val_accuracy = Some(accuracy);
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= options.patience.max(1) {
                break;
            }
        }
    }
    let linear = best.map_or_else(|| linear.valid(), |(_, l)| l);
    Ok((
        Heads {
            linear,
            members,
            num_classes: classes,
            dim,
        },
        report,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rand::Rng;

    use super::*;

    /// Gaussian clusters, one per class.
    fn clusters(n: usize, dim: usize, classes: usize, seed: u64) -> EmbeddingData {
        let mut rng = StdRng::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> = (0..classes)
            .map(|_| (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        let mut embeddings = Vec::with_capacity(n * dim);
        let labels: Vec<usize> = (0..n).map(|i| i % classes).collect();
        for &l in &labels {
            embeddings.extend(centres[l].iter().map(|c| c + rng.random_range(-1.0..1.0)));
        }
        EmbeddingData {
            embeddings,
            dim,
            labels,
        }
    }

    #[test]
    fn heads_learn_separable_embeddings_and_differ() {
        let data = clusters(600, 32, 4, 1);
        let options = HeadsOptions {
            num_classes: 4,
            epochs: 10,
            batch_size: 32,
            learning_rate: 1e-2,
            ..HeadsOptions::default()
        };
        let (heads, report) = train_heads(&data, &options, &Device::flex(), |_| true).unwrap();
        assert!(report.val_accuracy.unwrap() > 0.9, "{report:?}");
        let probs = heads
            .predict(&data.embeddings[..32 * 2], &Device::flex())
            .unwrap();
        assert_eq!((probs.len(), probs[0].len(), probs[0][0].len()), (2, 3, 4));
        assert_ne!(probs[0][0], probs[0][1], "members differ");
    }

    #[test]
    fn refuses_bad_input() {
        let mut data = clusters(20, 8, 2, 1);
        data.labels[3] = 5;
        let options = HeadsOptions {
            num_classes: 2,
            ..HeadsOptions::default()
        };
        assert!(matches!(
            train_heads(&data, &options, &Device::flex(), |_| true),
            Err(ModelError::BadInput { .. })
        ));
    }
}
