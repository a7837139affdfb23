//! The acquisition lever of #28: which items each round sends to people.
//!
//! A simulated loop on the training split: a random seed set is labeled, a committee trains on
//! what is labeled, and each round the strategy picks the next items from the rest (the pool),
//! whose true labels come in as the reviewers' answers, until the label budget is spent. After
//! every round it prints, beside the test figures of the plain bench, the **machine share of
//! the split**: the largest share of the whole training split that the model could label by
//! machine from its pool at each target (the oracle prefix of the pool's predictions), which is
//! what the loop's report counts. A strategy that sends the hard items to people leaves an
//! easier pool, so that share can rise even where the test figures do not.

use burn::tensor::{Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use sieve_shared::scores::committee_scores;
use sieve_worker::backend;
use sieve_worker::model::{ArchitectureConfig, TrainData, TrainOptions};

use super::{Row, TARGETS, fit, inputs, score};
use crate::fashion_idx::Dataset;

/// How a round picks its items from the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// At random (the plain bench's draw, continued).
    Random,
    /// The loop's review order: (1 − confidence) + disagreement, highest first.
    Loop,
    /// Smallest margin between the two most likely classes first.
    Margin,
    /// BALD: largest mutual information between the prediction and the members first.
    Bald,
    /// Smallest margin first within each predicted class, an equal quota per class.
    Balanced,
    /// Diversity: greedy k-center on the embeddings among the 4 × round smallest margins.
    Kcenter,
}

/// The fixed parts of a simulation.
pub(super) struct Setup<'a> {
    pub config: &'a ArchitectureConfig,
    pub options: &'a TrainOptions,
    pub independent: bool,
    pub train_set: &'a Dataset,
    pub test_set: &'a Dataset,
    pub test_inputs: &'a [f32],
    /// Random labels before the first round.
    pub seed_labels: usize,
    /// Labels per round.
    pub round: usize,
    /// The budget: the simulation stops once this many are labeled.
    pub budget: usize,
    pub seed: u64,
}

/// One pool item's prediction as a round sees it.
struct Pooled {
    index: usize,
    class: usize,
    confidence: f32,
    margin: f32,
    priority: f32,
    mutual_information: f32,
    correct: bool,
}

pub(super) fn simulate(strategy: Strategy, setup: &Setup<'_>) -> anyhow::Result<()> {
    let split = setup.train_set.len();
    let mut order: Vec<usize> = (0..split).collect();
    order.shuffle(&mut StdRng::seed_from_u64(setup.seed));
    let mut labeled: Vec<usize> = order[..setup.seed_labels.min(split)].to_vec();
    let mut in_pool = vec![true; split];
    for &i in &labeled {
        in_pool[i] = false;
    }
    loop {
        let data = TrainData {
            images: inputs(setup.train_set, &labeled),
            labels: labeled
                .iter()
                .map(|&i| usize::from(setup.train_set.labels[i]))
                .collect(),
        };
        let (model, epochs, seconds) = fit(
            setup.config,
            &data,
            setup.options,
            setup.seed,
            setup.independent,
        )?;
        let (test_probs, _) = model.predict(setup.test_inputs, setup.test_set.len(), false)?;
        let row = Row {
            epochs,
            seconds,
            scored: score(&test_probs, &setup.test_set.labels)?,
        };

        let pool: Vec<usize> = order.iter().copied().filter(|&i| in_pool[i]).collect();
        let (probs, embeddings) = model.predict(
            &inputs(setup.train_set, &pool),
            pool.len(),
            strategy == Strategy::Kcenter,
        )?;
        let mut pooled = Vec::with_capacity(pool.len());
        for (members, &index) in probs.iter().zip(&pool) {
            let s = committee_scores(members)?.scores;
            pooled.push(Pooled {
                index,
                class: s.top_class as usize,
                confidence: s.confidence,
                margin: s.margin,
                priority: (1.0 - s.confidence) + s.disagreement,
                mutual_information: s.mutual_information,
                correct: s.top_class == u32::from(setup.train_set.labels[index]),
            });
        }
        let machine = machine_shares(&pooled, split);
        println!(
            "| {strategy:?} | {} | {row} {} |",
            labeled.len(),
            machine.join(" | ")
        );

        let want = setup
            .round
            .min(setup.budget.saturating_sub(labeled.len()))
            .min(pooled.len());
        if want == 0 {
            return Ok(());
        }
        let picked = pick(strategy, &pooled, &embeddings, want, setup.config)?;
        for &i in &picked {
            in_pool[i] = false;
        }
        labeled.extend(picked);
    }
}

/// Per target: the pool's oracle prefix as a share of the whole split, with its accuracy.
fn machine_shares(pooled: &[Pooled], split: usize) -> Vec<String> {
    let mut predictions: Vec<(f32, bool)> =
        pooled.iter().map(|p| (p.confidence, p.correct)).collect();
    TARGETS
        .iter()
        .map(|&target| {
            let (len, hits) = crate::oracle::best_prefix(&mut predictions, target);
            format!(
                "{:.1}% ({:.2}%)",
                len as f64 * 100.0 / split as f64,
                if len == 0 {
                    0.0
                } else {
                    hits as f64 * 100.0 / len as f64
                }
            )
        })
        .collect()
}

/// The `want` pool items (their split indices) `strategy` sends to people next. `pooled` is in
/// the run's random order, which `Random` keeps.
fn pick(
    strategy: Strategy,
    pooled: &[Pooled],
    embeddings: &[Vec<f32>],
    want: usize,
    config: &ArchitectureConfig,
) -> anyhow::Result<Vec<usize>> {
    let mut ranked: Vec<usize> = (0..pooled.len()).collect();
    match strategy {
        Strategy::Random => {}
        Strategy::Loop => {
            ranked.sort_by(|&a, &b| pooled[b].priority.total_cmp(&pooled[a].priority))
        }
        Strategy::Margin | Strategy::Balanced | Strategy::Kcenter => {
            ranked.sort_by(|&a, &b| pooled[a].margin.total_cmp(&pooled[b].margin));
        }
        Strategy::Bald => ranked.sort_by(|&a, &b| {
            pooled[b]
                .mutual_information
                .total_cmp(&pooled[a].mutual_information)
        }),
    }
    let chosen: Vec<usize> = match strategy {
        Strategy::Balanced => balanced(pooled, &ranked, want, config.num_classes),
        Strategy::Kcenter => {
            let candidates = &ranked[..(4 * want).min(ranked.len())];
            k_center(candidates, embeddings, want)?
        }
        _ => ranked[..want].to_vec(),
    };
    Ok(chosen.into_iter().map(|p| pooled[p].index).collect())
}

/// An equal quota per predicted class, each filled from `ranked`'s order; what a class cannot
/// fill goes to the next in `ranked` of any class.
fn balanced(pooled: &[Pooled], ranked: &[usize], want: usize, classes: usize) -> Vec<usize> {
    let quota = want.div_ceil(classes.max(1));
    let mut taken = vec![0_usize; classes];
    let mut chosen = Vec::with_capacity(want);
    let mut rest = Vec::new();
    for &p in ranked {
        let class = pooled[p].class;
        if taken[class] < quota && chosen.len() < want {
            taken[class] += 1;
            chosen.push(p);
        } else {
            rest.push(p);
        }
    }
    let missing = want - chosen.len();
    chosen.extend(rest.into_iter().take(missing));
    chosen
}

/// Greedy k-center: the first candidate (the most uncertain), then again and again the
/// candidate farthest from everything chosen, by squared distance between embeddings.
fn k_center(
    candidates: &[usize],
    embeddings: &[Vec<f32>],
    want: usize,
) -> anyhow::Result<Vec<usize>> {
    let Some(&first) = candidates.first() else {
        return Ok(Vec::new());
    };
    let dim = embeddings[first].len();
    let device = backend::device();
    let flat: Vec<f32> = candidates
        .iter()
        .flat_map(|&p| embeddings[p].iter().copied())
        .collect();
    let points = Tensor::<2>::from_data(TensorData::new(flat, [candidates.len(), dim]), &device);
    let distance_to = |c: usize| -> Tensor<2> {
        let centre = points.clone().slice([c..c + 1, 0..dim]);
        let diff = points.clone() - centre;
        (diff.clone() * diff).sum_dim(1)
    };
    let mut nearest = distance_to(0);
    let mut chosen = vec![0_usize];
    while chosen.len() < want.min(candidates.len()) {
        let distances = nearest
            .clone()
            .try_into_vec_as::<f32>()
            .map_err(|err| anyhow::anyhow!("reading distances: {err}"))?;
        let farthest = distances
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        chosen.push(farthest);
        nearest = nearest.min_pair(distance_to(farthest));
    }
    Ok(chosen.into_iter().map(|c| candidates[c]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pooled(class: usize, margin: f32) -> Pooled {
        Pooled {
            index: 0,
            class,
            confidence: 0.5,
            margin,
            priority: 0.0,
            mutual_information: 0.0,
            correct: true,
        }
    }

    #[test]
    fn balanced_rounds_give_each_class_its_quota_and_fill_the_rest() {
        // Class 0 holds the four most uncertain items, class 1 two, class 2 none.
        let items = vec![
            pooled(0, 0.1),
            pooled(0, 0.2),
            pooled(0, 0.3),
            pooled(0, 0.4),
            pooled(1, 0.5),
            pooled(1, 0.6),
        ];
        let ranked: Vec<usize> = (0..items.len()).collect();
        // Quota 2 per class: two of class 0, two of class 1, then class 2's share from the rest.
        assert_eq!(balanced(&items, &ranked, 6, 3), vec![0, 1, 4, 5, 2, 3]);
        // Quota 1: one of class 0, one of class 1, the third from the rest.
        assert_eq!(balanced(&items, &ranked, 3, 3), vec![0, 4, 1]);
    }

    #[test]
    fn k_center_spreads_its_picks() {
        // Three tight clusters; candidates listed cluster by cluster.
        let embeddings: Vec<Vec<f32>> = [0.0_f32, 0.1, 0.2, 10.0, 10.1, 20.0]
            .iter()
            .map(|&x| vec![x, 0.0])
            .collect();
        let candidates: Vec<usize> = (0..embeddings.len()).collect();
        let mut chosen = k_center(&candidates, &embeddings, 3).expect("k-center");
        chosen.sort_unstable();
        assert_eq!(chosen, vec![0, 3, 5]);
    }
}
