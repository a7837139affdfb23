//! `sieve-tools bench accuracy`: how good a committee the loop's training recipe makes from a
//! given number of human labels, on real data (Fashion-MNIST).
//!
//! For each label count N: the small-CNN committee, freshly initialised, is trained with
//! [`model::train`](sieve_worker::model::train) on N training images drawn at random (nested: the
//! first N of one seeded permutation, so a larger N only adds labels), with the loop's own
//! hyper-parameters ([`TrainParams`]'s defaults) unless overridden. It then scores the test
//! split and prints the committee's accuracy and its **oracle share** at 95, 97 and 99%: the
//! largest share of the test images, most confident first, whose labels are at least that
//! accurate. That share is the ceiling for what calibration can open at the target, so it says
//! how much of a data set a recipe could label by machine, independently of the sampler and the
//! calibration evidence. Random labels rather than the loop's uncertainty-picked ones: the
//! figure is the recipe's, not the sampler's.

use std::path::PathBuf;
use std::time::Instant;

use crate::fashion_idx::{self, Dataset, Split};
use anyhow::Context as _;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use sieve_shared::messages::{LrSchedule, TrainParams};
use sieve_shared::scores::committee_scores;

use sieve_worker::backend;
use sieve_worker::images::normalize_pixel;
use sieve_worker::model::{ArchitectureConfig, Committee, TrainData, TrainOptions, train};

/// Accuracy targets the oracle share is printed for.
const TARGETS: [f64; 3] = [0.95, 0.97, 0.99];

#[derive(Debug, clap::Args)]
pub struct AccuracyArgs {
    /// Human-label counts to train on, each a fresh committee.
    #[arg(long, value_delimiter = ',', default_value = "3000,6000,13000")]
    pub labels: Vec<usize>,
    /// Test images scored (the first of the test split; at most 10,000).
    #[arg(long, default_value_t = 10_000)]
    pub test_images: usize,
    /// Where the Fashion-MNIST IDX files are.
    #[arg(long, default_value = fashion_idx::DEFAULT_DIR)]
    pub data_dir: PathBuf,
    /// Epochs at most (default: the loop's).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// AdamW learning rate (default: the loop's).
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Mini-batch size (default: the loop's).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Keep the learning rate constant (the loop decays it along a half cosine).
    #[arg(long)]
    pub constant_lr: bool,
    /// Dropout on the embedding while training (default: the loop's).
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Seeds the label draw, the initialisation and training.
    #[arg(long, default_value_t = 17)]
    pub seed: u64,
    /// Then train a second, fresh committee on the N labels plus the first one's most
    /// confident predictions for the rest of the training split, as machine labels
    /// (self-training): as many as the first one's share at >= 97% on the test images, the
    /// share a calibrated policy would label by machine. Scored the same way.
    #[arg(long)]
    pub pseudo_labels: bool,
}

/// The figures of one trained committee on the test images.
#[derive(Clone, Debug, PartialEq)]
struct Scored {
    accuracy: f64,
    /// Per target of [`TARGETS`]: (oracle share, accuracy of that share).
    shares: Vec<(f64, f64)>,
}

pub fn run(args: &AccuracyArgs, members: usize) -> anyhow::Result<()> {
    let loop_params = TrainParams::default();
    let options = TrainOptions {
        epochs: args.epochs.unwrap_or(loop_params.epochs as usize),
        batch_size: args.batch_size.unwrap_or(loop_params.batch_size as usize),
        learning_rate: args.learning_rate.unwrap_or(loop_params.learning_rate),
        cosine: !args.constant_lr && loop_params.schedule == LrSchedule::Cosine,
        dropout: args.dropout.unwrap_or(0.0),
        seed: args.seed,
        ..TrainOptions::default()
    };
    let train_set = fashion_idx::load(&args.data_dir, Split::Train, None)?;
    let test_set = fashion_idx::load(&args.data_dir, Split::Test, Some(args.test_images))?;
    let config = ArchitectureConfig::small_cnn(fashion_idx::CLASSES.len(), members);

    println!(
        "\n## small-CNN committee (K={members}) on N random Fashion-MNIST labels, scored on {} test images",
        test_set.len()
    );
    println!(
        "recipe: at most {} epochs (early stopping, patience {}, {:.0}% validation split), batch {}, AdamW lr {}{}, dropout {}, seed {}\n",
        options.epochs,
        options.patience,
        options.validation_share * 100.0,
        options.batch_size,
        options.learning_rate,
        if options.cosine {
            " (cosine decay)"
        } else {
            ""
        },
        options.dropout,
        options.seed
    );
    println!(
        "| labels | epochs run | train s | accuracy | share at ≥ 95% | share at ≥ 97% | share at ≥ 99% |"
    );
    println!("|---|---|---|---|---|---|---|");

    let mut order: Vec<usize> = (0..train_set.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(args.seed));
    let test_inputs = inputs(&test_set, &(0..test_set.len()).collect::<Vec<_>>());
    for &n in &args.labels {
        anyhow::ensure!(
            n <= train_set.len(),
            "--labels {n}: the training split has only {} images",
            train_set.len()
        );
        let picked = &order[..n];
        let data = TrainData {
            images: inputs(&train_set, picked),
            labels: picked
                .iter()
                .map(|&i| usize::from(train_set.labels[i]))
                .collect(),
        };
        let (committee, row) =
            train_and_score(&config, &data, &options, args.seed, &test_set, &test_inputs)
                .with_context(|| format!("training on {n} labels"))?;
        println!("| {n} | {row}");
        if !args.pseudo_labels {
            continue;
        }
        // Self-training: the committee's most confident predictions on the unlabeled rest of
        // the training split become labels, as many as it could label at 97%.
        let pool = &order[n..];
        let probs = committee.predict(&inputs(&train_set, pool), pool.len())?;
        let mut guesses = Vec::with_capacity(pool.len());
        for (members, &i) in probs.iter().zip(pool) {
            let scores = committee_scores(members)?.scores;
            guesses.push((scores.confidence, i, scores.top_class as usize));
        }
        guesses.sort_by(|a, b| b.0.total_cmp(&a.0));
        let take = (row.scored.shares[1].0 * guesses.len() as f64) as usize;
        let taken = &guesses[..take];
        let right = taken
            .iter()
            .filter(|(_, i, class)| usize::from(train_set.labels[*i]) == *class)
            .count();
        let mut more = data.clone();
        more.images.extend(inputs(
            &train_set,
            &taken.iter().map(|g| g.1).collect::<Vec<_>>(),
        ));
        more.labels.extend(taken.iter().map(|g| g.2));
        let (_, row) =
            train_and_score(&config, &more, &options, args.seed, &test_set, &test_inputs)
                .with_context(|| format!("training on {n} labels and {take} machine labels"))?;
        println!(
            "| {n} + {take} machine labels ({:.2}% right) | {row}",
            right as f64 * 100.0 / take.max(1) as f64
        );
    }
    println!(
        "\nshare at ≥ X%: the largest share of the test images, most confident first, whose labels are at least X% correct (their accuracy in brackets)"
    );
    Ok(())
}

/// One trained committee's row of the table, after the label count.
struct Row {
    epochs: usize,
    seconds: f64,
    scored: Scored,
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let share = |i: usize| {
            let (share, accuracy) = self.scored.shares[i];
            format!("{:.1}% ({:.2}%)", share * 100.0, accuracy * 100.0)
        };
        write!(
            f,
            "{} | {:.0} | {:.2}% | {} | {} | {} |",
            self.epochs,
            self.seconds,
            self.scored.accuracy * 100.0,
            share(0),
            share(1),
            share(2)
        )
    }
}

/// Train a fresh committee on `data` and score it on the test images.
fn train_and_score(
    config: &ArchitectureConfig,
    data: &TrainData,
    options: &TrainOptions,
    seed: u64,
    test_set: &Dataset,
    test_inputs: &[f32],
) -> anyhow::Result<(Committee, Row)> {
    let device = backend::device();
    let n = data.labels.len();
    let started = Instant::now();
    let mut epochs = 0;
    let committee = train(
        Committee::init(config, seed, &device)?,
        data,
        options,
        |epoch| {
            epochs = epoch.epoch;
            eprintln!(
                "  {n} labels, epoch {}: loss {:.4}, validation accuracy {:.3}",
                epoch.epoch,
                epoch.loss,
                epoch.val_accuracy.unwrap_or(f64::NAN)
            );
            true
        },
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let probs = committee.predict(test_inputs, test_set.len())?;
    let mut predictions = Vec::with_capacity(probs.len());
    for (members, &label) in probs.iter().zip(&test_set.labels) {
        let scores = committee_scores(members)?.scores;
        predictions.push((scores.confidence, scores.top_class == u32::from(label)));
    }
    let row = Row {
        epochs,
        seconds,
        scored: score(predictions),
    };
    Ok((committee, row))
}

/// The images at `indices`, normalized as the worker normalizes a decoded grayscale image.
fn inputs(data: &Dataset, indices: &[usize]) -> Vec<f32> {
    indices
        .iter()
        .flat_map(|&i| data.image(i).iter().copied().map(normalize_pixel))
        .collect()
}

/// Accuracy and oracle shares of `(confidence, correct)` predictions.
fn score(mut predictions: Vec<(f32, bool)>) -> Scored {
    let n = predictions.len();
    let correct = predictions.iter().filter(|p| p.1).count();
    let shares = TARGETS
        .iter()
        .map(|&target| {
            let (len, hits) = crate::oracle::best_prefix(&mut predictions, target);
            (
                len as f64 / n.max(1) as f64,
                if len == 0 {
                    0.0
                } else {
                    hits as f64 / len as f64
                },
            )
        })
        .collect();
    Scored {
        accuracy: correct as f64 / n.max(1) as f64,
        shares,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oracle_shares_as_counted_by_hand() {
        // 100 predictions, most confident first: 90 right, then 10 wrong; then 100 more, every
        // other one wrong.
        let mut predictions = Vec::new();
        for i in 0..200 {
            let confidence = 1.0 - i as f32 / 1000.0;
            let correct = if i < 100 { i < 90 } else { i % 2 == 0 };
            predictions.push((confidence, correct));
        }
        let scored = score(predictions);
        assert!((scored.accuracy - 140.0 / 200.0).abs() < 1e-12);
        // >= 95%: the first 90 are all right; 94 gives 90/94 = 95.7%, 95 gives 90/95 = 94.7%.
        assert_eq!(scored.shares[0], (94.0 / 200.0, 90.0 / 94.0));
        // >= 97%: 92 gives 90/92 = 97.8%, 93 gives 96.8%.
        assert_eq!(scored.shares[1], (92.0 / 200.0, 90.0 / 92.0));
        // >= 99%: 90 gives 100%, 91 gives 98.9%.
        assert_eq!(scored.shares[2], (90.0 / 200.0, 1.0));
    }
}
