//! The pieces of the training recipe that both training loops use: full
//! fine-tuning (`train.rs`) and heads on cached embeddings (`heads.rs`).
//! The validation split, inverse-frequency class weights, the online
//! bootstrap's Poisson(1) weights, the per-epoch report, and the
//! committee's consensus. Kept apart so that neither loop imports the other.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::ModelError;
use super::net::stream_seed;

const SPLIT_STREAM: u64 = 0x5011;
const BOOTSTRAP_STREAM: u64 = 0xB007;

/// Progress after one epoch, passed to `train`'s `on_epoch`.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    /// Counts from 1.
    pub epoch: usize,
    /// Mean weighted training cross-entropy over the epoch (all heads).
    pub loss: f64,
    /// Accuracy of the committee's mean prediction on the validation split; `None` without one.
    pub val_accuracy: Option<f64>,
}

/// Splits example indices into (training, validation), shuffled by `seed`.
pub(crate) fn split(
    n: usize,
    share: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), ModelError> {
    let mut indices: Vec<usize> = (0..n).collect();
    indices.shuffle(&mut StdRng::seed_from_u64(stream_seed(seed, SPLIT_STREAM)));
    let val_len = (n as f64 * share).round() as usize;
    if val_len >= n {
        return Err(ModelError::NotEnoughData(format!(
            "a validation share of {share} leaves none of {n} examples for training"
        )));
    }
    let train = indices.split_off(val_len);
    Ok((train, indices))
}

/// Inverse class frequency over the training split, scaled so that the mean weight per
/// example is 1 (the loss keeps its usual scale). Absent classes get 0; nothing uses it.
pub(crate) fn class_weights(labels: &[usize], train_set: &[usize], num_classes: usize) -> Vec<f32> {
    let mut counts = vec![0_usize; num_classes];
    for &i in train_set {
        counts[labels[i]] += 1;
    }
    let present = counts.iter().filter(|&&c| c > 0).count();
    counts
        .iter()
        .map(|&count| {
            if count == 0 {
                0.0
            } else {
                train_set.len() as f32 / (present * count) as f32
            }
        })
        .collect()
}

/// `weights[head][example]`: Poisson(1) draws, one generator per head seeded by `(seed, head)`.
pub(crate) fn bootstrap_weights(n: usize, members: usize, seed: u64) -> Vec<Vec<f32>> {
    (0..members)
        .map(|head| {
            let mut rng = StdRng::seed_from_u64(stream_seed(
                stream_seed(seed, BOOTSTRAP_STREAM),
                head as u64,
            ));
            (0..n).map(|_| poisson1(&mut rng) as f32).collect()
        })
        .collect()
}

/// A Poisson(1) sample (Knuth's method: count uniforms until their product drops below e^-1).
fn poisson1(rng: &mut StdRng) -> u32 {
    let limit = (-1.0_f64).exp();
    let mut k = 0;
    let mut product: f64 = rng.random();
    while product > limit {
        k += 1;
        product *= rng.random::<f64>();
    }
    k
}

/// The committee's consensus: the mean of the members' class probabilities.
pub(crate) fn mean_over_members(members: &[Vec<f32>]) -> Vec<f32> {
    let classes = members.first().map_or(0, Vec::len);
    let mut mean = vec![0.0; classes];
    for probs in members {
        for (m, p) in mean.iter_mut().zip(probs) {
            *m += p / members.len() as f32;
        }
    }
    mean
}

pub(crate) fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}
