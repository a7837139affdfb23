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

mod acceptance;
mod acquire;

use std::path::PathBuf;
use std::time::Instant;

use crate::fashion_idx::{self, Dataset, Split};
use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sieve_shared::messages::{LrSchedule, TrainParams};
use sieve_shared::scores::committee_scores;

use sieve_worker::backend;
use sieve_worker::images::normalize_pixel;
use sieve_worker::model::{
    ArchitectureConfig, Committee, CommitteeProbs, Embeddings, TrainData, TrainOptions, train,
};

pub use acquire::Strategy;

/// Accuracy targets the oracle share is printed for.
const TARGETS: [f64; 3] = [0.95, 0.97, 0.99];

/// Test images (in random order) the acceptance model is fitted on, as random checks with the
/// truth; the acceptance table scores the rest.
const ACCEPTANCE_EVIDENCE: usize = 1_000;

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
    /// Independent members: K networks, each with its own initialisation and its own
    /// bootstrap resample of the labels (K times the training time), instead of K heads on one
    /// shared trunk.
    #[arg(long)]
    pub independent: bool,
    /// Simulate the loop's rounds instead of random label sets: start from `--seed-labels`
    /// random labels, then each round send `--round` items of the pool to people as this
    /// strategy picks them, up to the largest of `--labels`. Several: one simulation each.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub acquire: Vec<Strategy>,
    /// The network: the loop's `small_cnn`, or `res_cnn` (two residual blocks with BatchNorm).
    #[arg(long, default_value = ArchitectureConfig::SMALL_CNN)]
    pub arch: String,
    /// Random labels before the first simulated round.
    #[arg(long, default_value_t = 1_000)]
    pub seed_labels: usize,
    /// Labels per simulated round.
    #[arg(long, default_value_t = 2_000)]
    pub round: usize,
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
    anyhow::ensure!(
        [ArchitectureConfig::SMALL_CNN, ArchitectureConfig::RES_CNN].contains(&args.arch.as_str()),
        "--arch {}: bench accuracy trains {} or {}",
        args.arch,
        ArchitectureConfig::SMALL_CNN,
        ArchitectureConfig::RES_CNN
    );
    let config = ArchitectureConfig {
        arch: args.arch.clone(),
        ..ArchitectureConfig::small_cnn(fashion_idx::CLASSES.len(), members)
    };
    let budget = args.labels.iter().copied().max().unwrap_or(0);
    anyhow::ensure!(
        budget <= train_set.len(),
        "--labels {budget}: the training split has only {} images",
        train_set.len()
    );

    println!(
        "\n## {} committee (K={members}{}) on N {} Fashion-MNIST labels, scored on {} test images",
        config.arch,
        if args.independent {
            ", independent members"
        } else {
            ", heads on one trunk"
        },
        if args.acquire.is_empty() {
            "random"
        } else {
            "acquired"
        },
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
    let test_inputs = inputs(&test_set, &(0..test_set.len()).collect::<Vec<_>>());

    if !args.acquire.is_empty() {
        println!(
            "| strategy | labels | epochs run | train s | test accuracy | test share at ≥ 95% | ≥ 97% | ≥ 99% | machine share of the split at ≥ 95% | ≥ 97% | ≥ 99% |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        let setup = acquire::Setup {
            config: &config,
            options: &options,
            independent: args.independent,
            train_set: &train_set,
            test_set: &test_set,
            test_inputs: &test_inputs,
            seed_labels: args.seed_labels,
            round: args.round,
            budget,
            seed: args.seed,
        };
        for &strategy in &args.acquire {
            acquire::simulate(strategy, &setup)
                .with_context(|| format!("simulating rounds picked by {strategy:?}"))?;
        }
        println!(
            "\nmachine share of the split at ≥ X%: the largest share of all {} training images that the model could label by machine from its pool (most confident first, cut where the labels are X% correct; their accuracy in brackets)",
            train_set.len()
        );
        return Ok(());
    }

    println!(
        "| labels | epochs run | train s | accuracy | share at ≥ 95% | share at ≥ 97% | share at ≥ 99% |"
    );
    println!("|---|---|---|---|---|---|---|");

    let mut order: Vec<usize> = (0..train_set.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(args.seed));
    // The acceptance table's order of the test images: its first ACCEPTANCE_EVIDENCE fit the
    // acceptance model.
    let mut test_order: Vec<usize> = (0..test_set.len()).collect();
    test_order.shuffle(&mut StdRng::seed_from_u64(args.seed ^ 0xACCE));
    let mut acceptance_rows = Vec::new();
    for &n in &args.labels {
        let picked = &order[..n];
        let data = TrainData {
            images: inputs(&train_set, picked),
            labels: picked
                .iter()
                .map(|&i| usize::from(train_set.labels[i]))
                .collect(),
        };
        let (model, epochs, seconds) = fit(&config, &data, &options, args.seed, args.independent)
            .with_context(|| format!("training on {n} labels"))?;
        let (probs, _) = model.predict(&test_inputs, test_set.len(), false)?;
        let row = Row {
            epochs,
            seconds,
            scored: score(&probs, &test_set.labels)?,
        };
        println!("| {n} | {row}");
        let truth: Vec<usize> = test_set.labels.iter().map(|&l| usize::from(l)).collect();
        let judged = acceptance::Judged::all(&probs, &truth)?;
        let shuffled: Vec<_> = test_order.iter().map(|&i| judged[i].clone()).collect();
        acceptance_rows.push((n, acceptance::shares(&shuffled, ACCEPTANCE_EVIDENCE)));
        if !args.pseudo_labels {
            continue;
        }
        // Self-training: the committee's most confident predictions on the unlabeled rest of
        // the training split become labels, as many as it could label at 97%.
        let pool = &order[n..];
        let (probs, _) = model.predict(&inputs(&train_set, pool), pool.len(), false)?;
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
        let (model, epochs, seconds) =
            fit(&config, &more, &options, args.seed, args.independent)
                .with_context(|| format!("training on {n} labels and {take} machine labels"))?;
        let (probs, _) = model.predict(&test_inputs, test_set.len(), false)?;
        let row = Row {
            epochs,
            seconds,
            scored: score(&probs, &test_set.labels)?,
        };
        println!(
            "| {n} + {take} machine labels ({:.2}% right) | {row}",
            right as f64 * 100.0 / take.max(1) as f64
        );
    }
    println!(
        "\nshare at ≥ X%: the largest share of the test images, most confident first, whose labels are at least X% correct (their accuracy in brackets)"
    );

    println!(
        "\n### acceptance: the share each ranking leaves at the target ({} test images; the acceptance model fitted on {} others with the truth)\n",
        test_set.len().saturating_sub(ACCEPTANCE_EVIDENCE),
        ACCEPTANCE_EVIDENCE.min(test_set.len())
    );
    println!("| labels | ranked by | share at ≥ 95% | share at ≥ 97% | share at ≥ 99% |");
    println!("|---|---|---|---|---|");
    for (n, shares) in acceptance_rows {
        for (name, shares) in acceptance::RANKINGS.iter().zip(shares) {
            let cells: Vec<String> = shares
                .iter()
                .map(|s| format!("{:.1}%", s * 100.0))
                .collect();
            println!("| {n} | {name} | {} |", cells.join(" | "));
        }
    }
    Ok(())
}

/// A trained committee as the bench scores it.
enum Trained {
    /// The loop's: K heads on one trunk.
    Shared(Box<Committee>),
    /// K networks trained apart; member k is network k's heads averaged.
    Independent(Vec<Committee>),
}

impl Trained {
    /// `probs[item][member][class]`, and the embeddings when asked (the first network's, for
    /// independent members).
    fn predict(
        &self,
        images: &[f32],
        n: usize,
        with_embeddings: bool,
    ) -> anyhow::Result<(CommitteeProbs, Embeddings)> {
        let nets = match self {
            Trained::Shared(committee) => {
                return Ok(if with_embeddings {
                    committee.predict_with_embeddings(images, n)?
                } else {
                    (committee.predict(images, n)?, Vec::new())
                });
            }
            Trained::Independent(nets) => nets,
        };
        let mut probs: CommitteeProbs = vec![Vec::with_capacity(nets.len()); n];
        let mut embeddings = Vec::new();
        for (k, net) in nets.iter().enumerate() {
            let (heads, embedded) = if with_embeddings && k == 0 {
                net.predict_with_embeddings(images, n)?
            } else {
                (net.predict(images, n)?, Vec::new())
            };
            if k == 0 {
                embeddings = embedded;
            }
            for (item, heads) in probs.iter_mut().zip(heads) {
                let mut mean = vec![0.0_f32; heads[0].len()];
                for head in &heads {
                    for (m, p) in mean.iter_mut().zip(head) {
                        *m += p / heads.len() as f32;
                    }
                }
                item.push(mean);
            }
        }
        Ok((probs, embeddings))
    }
}

/// Train a fresh committee on `data`: (it, epochs run, seconds). Independent members: one
/// network of two heads per member, each from its own seed on its own bootstrap resample.
fn fit(
    config: &ArchitectureConfig,
    data: &TrainData,
    options: &TrainOptions,
    seed: u64,
    independent: bool,
) -> anyhow::Result<(Trained, usize, f64)> {
    let started = Instant::now();
    if !independent {
        let (committee, epochs) = train_one(config, data, options, seed)?;
        return Ok((
            Trained::Shared(Box::new(committee)),
            epochs,
            started.elapsed().as_secs_f64(),
        ));
    }
    let one = ArchitectureConfig {
        members: 2,
        ..config.clone()
    };
    let mut nets = Vec::with_capacity(config.members);
    let mut epochs = 0;
    for k in 0..config.members {
        let member_seed = seed.wrapping_add(1_000 * (k as u64 + 1));
        let mut rng = StdRng::seed_from_u64(member_seed);
        let n = data.labels.len();
        let len = data.images.len() / n.max(1);
        let mut resample = TrainData::default();
        for _ in 0..n {
            let i = rng.random_range(0..n);
            resample
                .images
                .extend_from_slice(&data.images[i * len..(i + 1) * len]);
            resample.labels.push(data.labels[i]);
        }
        let options = TrainOptions {
            seed: member_seed,
            ..options.clone()
        };
        let (net, ran) = train_one(&one, &resample, &options, member_seed)
            .with_context(|| format!("member {k}"))?;
        epochs += ran;
        nets.push(net);
    }
    Ok((
        Trained::Independent(nets),
        epochs,
        started.elapsed().as_secs_f64(),
    ))
}

/// One committee trained by the loop's `train`, and the epochs it ran.
fn train_one(
    config: &ArchitectureConfig,
    data: &TrainData,
    options: &TrainOptions,
    seed: u64,
) -> anyhow::Result<(Committee, usize)> {
    let n = data.labels.len();
    let mut epochs = 0;
    let committee = train(
        Committee::init(config, seed, &backend::device())?,
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
    Ok((committee, epochs))
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

/// The images at `indices`, normalized as the worker normalizes a decoded grayscale image.
fn inputs(data: &Dataset, indices: &[usize]) -> Vec<f32> {
    indices
        .iter()
        .flat_map(|&i| data.image(i).iter().copied().map(normalize_pixel))
        .collect()
}

/// Accuracy and oracle shares of a committee's predictions against `labels`.
fn score(probs: &CommitteeProbs, labels: &[u8]) -> anyhow::Result<Scored> {
    let mut predictions = Vec::with_capacity(probs.len());
    for (members, &label) in probs.iter().zip(labels) {
        let scores = committee_scores(members)?.scores;
        predictions.push((scores.confidence, scores.top_class == u32::from(label)));
    }
    Ok(score_predictions(predictions))
}

/// Accuracy and oracle shares of `(confidence, correct)` predictions.
fn score_predictions(mut predictions: Vec<(f32, bool)>) -> Scored {
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
        let scored = score_predictions(predictions);
        assert!((scored.accuracy - 140.0 / 200.0).abs() < 1e-12);
        // >= 95%: the first 90 are all right; 94 gives 90/94 = 95.7%, 95 gives 90/95 = 94.7%.
        assert_eq!(scored.shares[0], (94.0 / 200.0, 90.0 / 94.0));
        // >= 97%: 92 gives 90/92 = 97.8%, 93 gives 96.8%.
        assert_eq!(scored.shares[1], (92.0 / 200.0, 90.0 / 92.0));
        // >= 99%: 90 gives 100%, 91 gives 98.9%.
        assert_eq!(scored.shares[2], (90.0 / 200.0, 1.0));
    }
}
