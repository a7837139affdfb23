//! What a model version's holdout evaluation says beyond its accuracy:
//! per-class precision and recall, expected calibration error, and the share
//! of items the project's routing policy would label by machine.
//!
//! Everything is computed from the evaluations a version stores with its
//! metrics (every holdout example: human label, predicted class,
//! confidence), so it needs no images and no worker, and the figures of two
//! versions compare fairly when their holdouts are the same.

use serde::Serialize;
use sieve_shared::messages::{HoldoutEvaluation, HoldoutMetrics};

use crate::policy::Policy;
use crate::routing::calibration;

/// Bins of the expected calibration error (equal-width confidence bins).
const ECE_BINS: usize = 10;

#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ClassQuality {
    pub class: String,
    /// Holdout examples whose human label is this class.
    pub support: u32,
    /// Of the examples predicted as this class, the share that are.
    pub precision: Option<f64>,
    /// Of the examples that are this class, the share predicted as it.
    pub recall: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Quality {
    pub holdout_size: u32,
    pub accuracy: Option<f64>,
    pub per_class: Vec<ClassQuality>,
    /// Expected calibration error: the example-weighted mean gap between
    /// confidence and accuracy over ten confidence bins (0 is perfect).
    pub expected_calibration_error: Option<f64>,
    /// The target the machine share below is for (the project's, else a
    /// fixed threshold applies).
    pub target_accuracy: Option<f64>,
    /// Share of holdout examples the project's policy would label by
    /// machine with this version (no audits), and their accuracy.
    pub machine_share: Option<f64>,
    pub machine_accuracy: Option<f64>,
}

/// Evaluate `metrics` for a project with `classes` under `policy`.
pub fn quality(metrics: &HoldoutMetrics, classes: &[String], policy: &Policy) -> Quality {
    let evaluations = &metrics.evaluations;
    let n = evaluations.len();
    let share = |k: usize, n: usize| (n > 0).then(|| k as f64 / n as f64);
    let per_class = classes
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let c = c as u32;
            let predicted = evaluations.iter().filter(|e| e.predicted == c).count();
            let actual = evaluations.iter().filter(|e| e.label == c).count();
            let right = evaluations
                .iter()
                .filter(|e| e.predicted == c && e.label == c)
                .count();
            ClassQuality {
                class: name.clone(),
                support: actual as u32,
                precision: share(right, predicted),
                recall: share(right, actual),
            }
        })
        .collect();
    let calibration =
        calibration::calibrate_for(policy, &calibration::evidence(metrics), classes.len());
    let machine: Vec<&HoldoutEvaluation> = evaluations
        .iter()
        .filter(|e| {
            calibration::threshold_for(policy, e.predicted, calibration.as_ref())
                .is_some_and(|t| e.confidence >= t)
        })
        .collect();
    let machine_right = machine.iter().filter(|e| e.is_correct()).count();
    Quality {
        holdout_size: n as u32,
        accuracy: share(evaluations.iter().filter(|e| e.is_correct()).count(), n),
        per_class,
        expected_calibration_error: expected_calibration_error(evaluations),
        target_accuracy: policy.target_accuracy,
        machine_share: share(machine.len(), n),
        machine_accuracy: share(machine_right, machine.len()),
    }
}

/// ECE over [`ECE_BINS`] equal-width confidence bins; `None` without data.
pub fn expected_calibration_error(evaluations: &[HoldoutEvaluation]) -> Option<f64> {
    if evaluations.is_empty() {
        return None;
    }
    // Per bin: (sum of confidence, right, count).
    let mut bins = [(0.0f64, 0usize, 0usize); ECE_BINS];
    for e in evaluations {
        let bin = ((f64::from(e.confidence) * ECE_BINS as f64) as usize).min(ECE_BINS - 1);
        bins[bin].0 += f64::from(e.confidence);
        bins[bin].1 += usize::from(e.is_correct());
        bins[bin].2 += 1;
    }
    let total = evaluations.len() as f64;
    Some(
        bins.iter()
            .filter(|b| b.2 > 0)
            .map(|&(confidence, right, count)| {
                let count_f = count as f64;
                (count_f / total) * (confidence / count_f - right as f64 / count_f).abs()
            })
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(label: u32, predicted: u32, confidence: f32) -> HoldoutEvaluation {
        HoldoutEvaluation {
            label,
            predicted,
            confidence,
            random: None,
            correct: None,
            boxes: None,
        }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn precision_and_recall_per_class_by_hand() {
        // Class 0: 3 true, predicted 0 for 2 of them and for one class-1 item.
        let metrics = HoldoutMetrics {
            evaluations: vec![
                eval(0, 0, 0.9),
                eval(0, 0, 0.8),
                eval(0, 1, 0.6),
                eval(1, 0, 0.7),
                eval(1, 1, 0.95),
            ],
            ..HoldoutMetrics::default()
        };
        let q = quality(&metrics, &names(3), &Policy::default());
        assert_eq!(q.holdout_size, 5);
        assert_eq!(q.accuracy, Some(3.0 / 5.0));
        assert_eq!(q.per_class[0].support, 3);
        assert_eq!(q.per_class[0].precision, Some(2.0 / 3.0));
        assert_eq!(q.per_class[0].recall, Some(2.0 / 3.0));
        assert_eq!(q.per_class[1].precision, Some(1.0 / 2.0));
        assert_eq!(q.per_class[1].recall, Some(1.0 / 2.0));
        assert_eq!(q.per_class[2].support, 0);
        assert_eq!(
            (q.per_class[2].precision, q.per_class[2].recall),
            (None, None)
        );
        // The default policy: a fixed threshold of 0.9 admits two examples, both right.
        assert_eq!(q.target_accuracy, None);
        assert_eq!(q.machine_share, Some(2.0 / 5.0));
        assert_eq!(q.machine_accuracy, Some(1.0));
    }

    #[test]
    fn ece_is_zero_when_confidence_matches_accuracy() {
        // Bin 0.7-0.8: confidence 0.75 and 3 of 4 right.
        let evaluations = vec![
            eval(0, 0, 0.75),
            eval(0, 0, 0.75),
            eval(0, 0, 0.75),
            eval(0, 1, 0.75),
        ];
        let ece = expected_calibration_error(&evaluations).expect("data");
        assert!(ece.abs() < 1e-6, "{ece}");
    }

    #[test]
    fn ece_weighs_the_gap_of_each_bin() {
        // Bin 0.9-1.0: mean confidence 0.95, accuracy 0.5 → gap 0.45, weight 1/2.
        // Bin 0.5-0.6: mean confidence 0.55, accuracy 1.0 → gap 0.45, weight 1/2.
        let evaluations = vec![
            eval(0, 0, 0.95),
            eval(0, 1, 0.95),
            eval(0, 0, 0.55),
            eval(1, 1, 0.55),
        ];
        let ece = expected_calibration_error(&evaluations).expect("data");
        assert!((ece - 0.45).abs() < 1e-6, "{ece}");
        assert_eq!(expected_calibration_error(&[]), None);
    }

    #[test]
    fn machine_share_at_a_target_uses_the_calibrated_thresholds() {
        // 300 examples of class 0 at confidence 0.99, all right: enough
        // evidence for a 0.97 target; class 1 has 5 examples, too few.
        let mut evaluations: Vec<_> = (0..300).map(|_| eval(0, 0, 0.99)).collect();
        evaluations.extend((0..5).map(|_| eval(1, 1, 0.99)));
        let metrics = HoldoutMetrics {
            evaluations,
            ..HoldoutMetrics::default()
        };
        let policy = Policy {
            target_accuracy: Some(0.97),
            // Each class on its own evidence.
            pool_evidence: false,
            ..Policy::default()
        };
        let q = quality(&metrics, &names(2), &policy);
        assert_eq!(q.target_accuracy, Some(0.97));
        assert_eq!(q.machine_share, Some(300.0 / 305.0));
        assert_eq!(q.machine_accuracy, Some(1.0));
    }
}
