//! The promotion gate's judgement: is a candidate worse than the champion, by more than the
//! margin and beyond what the holdout's sampling noise explains?
//!
//! A holdout of a few hundred images measures accuracy to a point or two, so comparing two
//! point estimates refuses a candidate that is as good as the champion about half the time,
//! and a refused candidate keeps the project on a version with less evidence behind it. The
//! gate therefore refuses only when the candidate is worse by more than
//! `training.promotion_margin` *and* the difference is unlikely to be chance, at one-sided
//! 95%:
//! - **on the same holdout, example by example** (the run started from the champion and scored
//!   it too): McNemar's exact test on the examples only one of the two got right;
//! - **otherwise** (two holdouts, or a worker that sent accuracies only): the two accuracies as
//!   independent proportions, their difference against 1.645 standard errors.
//!
//! Promoting a candidate that is no worse beyond chance is safe for labels: what is labeled by
//! machine is decided by the active version's calibration on its own random checks, so a
//! slightly weaker version labels less, never below the target.

use sieve_shared::messages::PairedOutcomes;

/// One-sided significance of "worse".
pub const SIGNIFICANCE: f64 = 0.05;
/// The one-sided 95% normal quantile.
const Z: f64 = 1.645;

/// How the two accuracies were measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Evidence {
    /// On the candidate's holdout, example by example.
    Paired(PairedOutcomes),
    /// Each accuracy with the number of examples it was measured on.
    Unpaired { champion: u32, candidate: u32 },
}

/// The gate's answer: refused or not, and, when refused, how sure the holdout is.
#[derive(Clone, Debug, PartialEq)]
pub struct Judgement {
    pub promote: bool,
    /// For a reason string: the test and its figure.
    pub test: String,
}

/// Whether a candidate at `candidate` accuracy replaces a champion at `champion`, with
/// `margin` tolerated and the sampling noise of `evidence` allowed for.
pub fn judge(champion: f64, candidate: f64, margin: f64, evidence: Evidence) -> Judgement {
    if candidate + margin >= champion {
        return Judgement {
            promote: true,
            test: "within the margin".into(),
        };
    }
    match evidence {
        Evidence::Paired(PairedOutcomes {
            base_only,
            candidate_only,
        }) => {
            let p = worse_by_chance(base_only, candidate_only);
            Judgement {
                promote: p >= SIGNIFICANCE,
                test: format!(
                    "McNemar p={p:.3}: {base_only} examples only the champion got right, {candidate_only} only the candidate"
                ),
            }
        }
        Evidence::Unpaired {
            champion: n_champion,
            candidate: n_candidate,
        } => {
            let variance = |p: f64, n: u32| p * (1.0 - p) / f64::from(n.max(1));
            let se = (variance(champion, n_champion) + variance(candidate, n_candidate)).sqrt();
            let gap = champion - candidate;
            Judgement {
                promote: gap <= Z * se,
                test: format!(
                    "difference {gap:.4} against {:.4} for chance on {n_candidate} and {n_champion} examples",
                    Z * se
                ),
            }
        }
    }
}

/// McNemar's exact one-sided p-value: the chance that, were the two versions equally good, the
/// champion would win at least `base_only` of the `base_only + candidate_only` examples they
/// disagree on (a fair coin per example).
pub fn worse_by_chance(base_only: u32, candidate_only: u32) -> f64 {
    let n = base_only + candidate_only;
    if n == 0 {
        return 1.0;
    }
    // ln k! for k ≤ n, then the binomial(n, ½) tail in log space (n can be thousands).
    let mut ln_fact = Vec::with_capacity(n as usize + 1);
    ln_fact.push(0.0_f64);
    for k in 1..=n {
        ln_fact.push(ln_fact[k as usize - 1] + f64::from(k).ln());
    }
    let ln_half_n = f64::from(n) * std::f64::consts::LN_2;
    (base_only..=n)
        .map(|k| {
            (ln_fact[n as usize] - ln_fact[k as usize] - ln_fact[(n - k) as usize] - ln_half_n)
                .exp()
        })
        .sum::<f64>()
        .min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paired(base_only: u32, candidate_only: u32) -> Evidence {
        Evidence::Paired(PairedOutcomes {
            base_only,
            candidate_only,
        })
    }

    #[test]
    fn mcnemar_tails_by_hand() {
        // 5 of 7 for the champion: (21 + 7 + 1) / 128.
        assert!((worse_by_chance(5, 2) - 29.0 / 128.0).abs() < 1e-12);
        // All 4 of 4: 1/16.
        assert!((worse_by_chance(4, 0) - 1.0 / 16.0).abs() < 1e-12);
        assert_eq!(worse_by_chance(0, 0), 1.0);
        assert!((worse_by_chance(0, 9) - 1.0).abs() < 1e-12);
        // Large counts stay finite: 600 against 400 is far from chance.
        let p = worse_by_chance(600, 400);
        assert!(p > 0.0 && p < 1e-9, "{p}");
        // And 1,000 against 1,000 is a coin: just over a half.
        let p = worse_by_chance(1000, 1000);
        assert!((p - 0.5).abs() < 0.01, "{p}");
    }

    #[test]
    fn a_candidate_behind_by_noise_is_promoted_and_one_behind_for_sure_is_not() {
        // The demo's refusal: 0.983 against 0.989 on ~500 images, 5 against 2 where they differ.
        assert!(judge(0.989, 0.983, 0.0, paired(5, 2)).promote);
        // Behind by as much, but on every one of 17 disagreements but two.
        let sure = judge(0.989, 0.963, 0.0, paired(15, 2));
        assert!(!sure.promote, "{sure:?}");
        assert!(sure.test.contains("McNemar p=0.001"), "{}", sure.test);
        // Within the margin needs no test.
        assert!(judge(0.95, 0.94, 0.02, paired(50, 0)).promote);
        // Ahead is ahead.
        assert!(judge(0.90, 0.95, 0.0, paired(0, 30)).promote);
    }

    #[test]
    fn unpaired_accuracies_allow_for_both_holdouts_noise() {
        // #28's refusal: 0.947 against 0.956 on about a thousand images each.
        assert!(
            judge(
                0.956,
                0.947,
                0.0,
                Evidence::Unpaired {
                    champion: 1000,
                    candidate: 1000
                }
            )
            .promote
        );
        // 0.60 against 0.80 on a hundred each is no accident.
        let refused = judge(
            0.80,
            0.60,
            0.0,
            Evidence::Unpaired {
                champion: 100,
                candidate: 100,
            },
        );
        assert!(!refused.promote, "{refused:?}");
        // The same gap on ten examples each could be.
        assert!(
            judge(
                0.80,
                0.60,
                0.0,
                Evidence::Unpaired {
                    champion: 10,
                    candidate: 10
                }
            )
            .promote
        );
    }
}
