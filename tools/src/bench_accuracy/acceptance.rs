//! The acceptance lever of #28: which score, cut at one threshold, leaves the largest share of
//! a committee's predictions at a target accuracy.
//!
//! The loop accepts by the committee's mean confidence. The alternatives use what else the
//! committee says: whether its members agree, how sure the least sure member is, the margin,
//! and a logistic acceptance model fitted on a small random sample with the truth (the random
//! checks a calibrated policy already has). Every ranking is cut by the oracle on the same
//! images (the test images less those the model was fitted on), so the figures compare the
//! rankings and nothing else; a calibrated policy reaches less than any of them.

use sieve_shared::scores::committee_scores;
use sieve_worker::model::CommitteeProbs;

use super::TARGETS;

/// What one prediction says about itself, and whether it was right.
#[derive(Clone, Debug)]
pub(super) struct Judged {
    confidence: f32,
    margin: f32,
    /// Share of members voting for the committee's class.
    agreement: f32,
    mutual_information: f32,
    entropy: f32,
    /// The least sure member's probability of the committee's class.
    least_member: f32,
    correct: bool,
}

impl Judged {
    /// Scores every item of `probs`; `truth[i]` is item `i`'s class.
    pub(super) fn all(probs: &CommitteeProbs, truth: &[usize]) -> anyhow::Result<Vec<Self>> {
        probs
            .iter()
            .zip(truth)
            .map(|(members, &label)| {
                let scored = committee_scores(members)?;
                let s = &scored.scores;
                let top = s.top_class as usize;
                Ok(Self {
                    confidence: s.confidence,
                    margin: s.margin,
                    agreement: 1.0 - s.disagreement,
                    mutual_information: s.mutual_information,
                    entropy: s.entropy,
                    least_member: members.iter().map(|p| p[top]).fold(f32::INFINITY, f32::min),
                    correct: top == label,
                })
            })
            .collect()
    }

    /// The acceptance model's inputs. Probabilities near 1 as log-odds, where their
    /// differences are.
    fn features(&self) -> [f64; FEATURES] {
        [
            log_odds(self.confidence),
            f64::from(self.margin),
            f64::from(self.agreement),
            f64::from(self.mutual_information),
            f64::from(self.entropy),
            log_odds(self.least_member),
        ]
    }
}

const FEATURES: usize = 6;

fn log_odds(p: f32) -> f64 {
    let p = f64::from(p).clamp(1e-7, 1.0 - 1e-7);
    (p / (1.0 - p)).ln()
}

/// The rankings compared, by name.
pub(super) const RANKINGS: [&str; 5] = [
    "mean confidence (the loop's)",
    "mean confidence, members agreeing first",
    "least sure member",
    "margin",
    "acceptance model on the random checks",
];

/// Per ranking of [`RANKINGS`], the oracle share at each of [`TARGETS`] over `judged` less its
/// first `evidence` items, which the acceptance model is fitted on (`judged` in random order).
pub(super) fn shares(judged: &[Judged], evidence: usize) -> Vec<Vec<f64>> {
    let (fitted_on, scored) = judged.split_at(evidence.min(judged.len()));
    let model = Logistic::fit(fitted_on);
    let rank: [&dyn Fn(&Judged) -> f64; 5] = [
        &|j| f64::from(j.confidence),
        // Agreeing items all rank above disagreeing ones, by confidence within each.
        &|j| f64::from(j.confidence) + if j.agreement >= 1.0 { 1.0 } else { 0.0 },
        &|j| f64::from(j.least_member),
        &|j| f64::from(j.margin),
        &|j| model.logit(j),
    ];
    rank.iter()
        .map(|score| {
            let mut predictions: Vec<(f32, bool)> = scored
                .iter()
                .map(|j| (score(j) as f32, j.correct))
                .collect();
            TARGETS
                .iter()
                .map(|&target| {
                    let (len, _) = crate::oracle::best_prefix(&mut predictions, target);
                    len as f64 / predictions.len().max(1) as f64
                })
                .collect()
        })
        .collect()
}

/// Logistic regression of "the committee is right" on [`Judged::features`], standardised, fitted
/// by gradient descent with a little L2 (a few hundred examples, six features: no library
/// needed).
struct Logistic {
    mean: [f64; FEATURES],
    scale: [f64; FEATURES],
    weights: [f64; FEATURES],
    bias: f64,
}

impl Logistic {
    const STEPS: usize = 2_000;
    const RATE: f64 = 0.5;
    const L2: f64 = 1e-3;

    fn fit(examples: &[Judged]) -> Self {
        let n = examples.len().max(1) as f64;
        let rows: Vec<[f64; FEATURES]> = examples.iter().map(Judged::features).collect();
        let mut mean = [0.0; FEATURES];
        let mut scale = [1.0; FEATURES];
        for f in 0..FEATURES {
            mean[f] = rows.iter().map(|r| r[f]).sum::<f64>() / n;
            let var = rows.iter().map(|r| (r[f] - mean[f]).powi(2)).sum::<f64>() / n;
            scale[f] = if var > 1e-12 { var.sqrt() } else { 1.0 };
        }
        let mut model = Self {
            mean,
            scale,
            weights: [0.0; FEATURES],
            bias: 0.0,
        };
        let standardised: Vec<[f64; FEATURES]> =
            rows.iter().map(|r| model.standardise(r)).collect();
        for _ in 0..Self::STEPS {
            let mut grad = [0.0; FEATURES];
            let mut grad_bias = 0.0;
            for (x, example) in standardised.iter().zip(examples) {
                let p = sigmoid(model.linear(x));
                let err = p - f64::from(u8::from(example.correct));
                for (g, x) in grad.iter_mut().zip(x) {
                    *g += err * x / n;
                }
                grad_bias += err / n;
            }
            for (w, g) in model.weights.iter_mut().zip(grad) {
                *w -= Self::RATE * (g + Self::L2 * *w);
            }
            model.bias -= Self::RATE * grad_bias;
        }
        model
    }

    fn standardise(&self, row: &[f64; FEATURES]) -> [f64; FEATURES] {
        std::array::from_fn(|f| (row[f] - self.mean[f]) / self.scale[f])
    }

    fn linear(&self, x: &[f64; FEATURES]) -> f64 {
        self.bias + x.iter().zip(&self.weights).map(|(x, w)| x * w).sum::<f64>()
    }

    /// The model's log-odds that `judged` is right (monotone in its probability).
    fn logit(&self, judged: &Judged) -> f64 {
        self.linear(&self.standardise(&judged.features()))
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(confidence: f32, agreement: f32, correct: bool) -> Judged {
        Judged {
            confidence,
            margin: confidence,
            agreement,
            mutual_information: 0.0,
            entropy: 0.0,
            least_member: confidence,
            correct,
        }
    }

    #[test]
    fn the_acceptance_model_learns_what_confidence_misses() {
        // Right exactly when the members agree, whatever the confidence: confidence ranks
        // mistakes among the right ones, the fitted model puts every agreeing item first.
        let items: Vec<Judged> = (0..400)
            .map(|i| {
                let agree = i % 3 != 0;
                judged(
                    0.5 + (i % 50) as f32 / 100.0,
                    if agree { 1.0 } else { 0.5 },
                    agree,
                )
            })
            .collect();
        let shares = shares(&items, 200);
        let (by_confidence, fitted) = (&shares[0], &shares[4]);
        // The fitted model finds every agreeing scored item at 99%.
        let agreeing = items[200..].iter().filter(|j| j.correct).count() as f64 / 200.0;
        assert!(
            (fitted[2] - agreeing).abs() < 1e-9,
            "{fitted:?} against {agreeing}"
        );
        assert!(by_confidence[2] < 0.1, "{by_confidence:?}");
        // "Members agreeing first" finds them too.
        assert!((shares[1][2] - fitted[2]).abs() < 1e-9, "{shares:?}");
    }
}
