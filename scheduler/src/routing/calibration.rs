//! Thresholds calibrated to a target accuracy (DESIGN §6).
//!
//! For each class, from examples whose true label is known from humans, the
//! threshold is the lowest confidence at which the machine labels at or above
//! it are still accurate enough — judged by the Wilson lower confidence bound
//! of their accuracy, not by the raw share, so that a handful of lucky
//! examples cannot open the gate. Until a class has enough evidence it has no
//! threshold and its items go to review.
//!
//! The evidence is a model version's holdout evaluation, restricted to the
//! items that were picked at random for review (the seed set's holdout and
//! the audit sample, which is never trained on), each with the version's
//! predicted class and confidence. Items picked by active learning are left
//! out: they were chosen for being hard, so the accuracy above a threshold
//! measured on them is far below what the same threshold gives on the items
//! it is applied to, and the gate would stay shut long after the model is
//! good enough. The evidence is computed when the version is registered, so
//! a new version routes with its own thresholds from its first prediction.

use chrono::Utc;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait,
    PaginatorTrait, QueryFilter,
};
use serde::{Deserialize, Serialize};
use sieve_shared::box_scores::BoxTally;
use sieve_shared::messages::HoldoutMetrics;
use uuid::Uuid;

use crate::entities::item::{self, ItemState};
use crate::entities::{model_version, project};
use crate::error::AppResult;
use crate::policy::{Policy, PolicyPatch};
use crate::projects::Project;

/// One holdout example as a model version saw it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub predicted: u32,
    pub confidence: f32,
    pub correct: bool,
    /// A box version's proposal for the image, box by box (the evidence of
    /// a precision target); `None` for a classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boxes: Option<BoxTally>,
}

/// The thresholds of one model version under one target.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub target_accuracy: f64,
    pub confidence_level: f64,
    /// Per class: the calibrated threshold, or `None` (not enough evidence:
    /// review everything predicted as this class).
    pub thresholds: Vec<Option<f32>>,
    /// Per class: how many holdout examples were predicted as it.
    pub evidence: Vec<u32>,
    /// Whether classes short of evidence borrowed the pooled threshold.
    #[serde(default)]
    pub pooled: bool,
    /// Per class: whether its threshold comes from the pool (the pooled
    /// threshold, or raised above it where the class's own evidence
    /// contradicted it) rather than from its own evidence alone.
    #[serde(default)]
    pub borrowed: Vec<bool>,
    /// While no class has a threshold and the evidence is short of
    /// [`EVIDENCE_WANTED`] times [`evidence_needed`]: the share of the
    /// project's unlabeled items sampled for random checks, enough to gather
    /// the rest (`None`: the policy's audit rate). See [`sample_rate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<f64>,
    /// The policy's box precision and recall targets the thresholds also
    /// hold, where it has them (see [`hold_box_targets`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_precision: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_recall: Option<f64>,
}

impl Calibration {
    /// Whether any class has a threshold: machine labels can happen.
    pub fn is_open(&self) -> bool {
        self.thresholds.iter().any(Option::is_some)
    }

    /// Whether it was made for `policy`: its target, confidence level and
    /// pooling. A calibration for another policy says nothing about this
    /// one's thresholds or sample rate.
    pub fn is_for(&self, policy: &Policy) -> bool {
        policy.target_accuracy == Some(self.target_accuracy)
            && policy.confidence_level == self.confidence_level
            && policy.pool_evidence == self.pooled
            && policy.target_precision == self.target_precision
            && policy.target_recall == self.target_recall
    }

    /// Random, human-checked examples this calibration rests on.
    pub fn random_checks(&self) -> u32 {
        self.evidence.iter().sum()
    }
}

/// The fewest random, human-checked examples that can open the gate to
/// machine labels at `target_accuracy` as a lower confidence bound at
/// `confidence_level`: even all of them right, fewer leave the Wilson lower
/// bound n / (n + z²) under the target. 125 at 0.97 and 95%, 73 at 0.95,
/// 381 at 0.99.
pub fn evidence_needed(target_accuracy: f64, confidence_level: f64) -> u32 {
    let z = z_for(confidence_level);
    let n = z * z * target_accuracy / (1.0 - target_accuracy);
    // The float can land a hair above a whole number it equals.
    (n - 1e-9).ceil().max(1.0) as u32
}

/// How many times the bare minimum of random checks ([`evidence_needed`])
/// the loop asks for while the gate is shut. The minimum opens the gate
/// only if every one of them is right; a model good enough to label most
/// items still errs on a few, and those near its threshold need company.
pub const EVIDENCE_WANTED: u32 = 3;

/// The share of a project's `unlabeled` items to sample for random checks
/// so that a calibration short of evidence gathers what it lacks: the
/// audit rate plus the shortfall (up to [`EVIDENCE_WANTED`] times
/// [`evidence_needed`]) spread over what is left, or `None` when the gate
/// is open or the evidence is there. Evidence is only ever random: these
/// items are chosen by their fixed draws (`policy::draws`), never by the
/// model, and they are reviewed first.
pub fn sample_rate(calibration: &Calibration, audit_rate: f64, unlabeled: u64) -> Option<f64> {
    if calibration.is_open() || unlabeled == 0 {
        return None;
    }
    let wanted = EVIDENCE_WANTED
        * evidence_needed(calibration.target_accuracy, calibration.confidence_level);
    let short = wanted.saturating_sub(calibration.random_checks());
    (short > 0).then(|| (audit_rate + f64::from(short) / unlabeled as f64).min(1.0))
}

/// The confidence a prediction of `class` needs to become a machine label
/// under `policy`; `None` means it never does (no threshold calibrated for
/// this policy's target yet).
pub fn threshold_for(
    policy: &Policy,
    class: u32,
    calibration: Option<&Calibration>,
) -> Option<f32> {
    match policy.target_accuracy {
        None => Some(policy.confidence_threshold),
        Some(_) => calibration
            .filter(|c| c.is_for(policy))
            .and_then(|c| c.thresholds.get(class as usize).copied().flatten()),
    }
}

/// The z value of a two-sided normal interval at `level` (0.90, 0.95, 0.99...).
#[allow(clippy::excessive_precision)] // the published coefficients, verbatim
pub fn z_for(level: f64) -> f64 {
    // Acklam's rational approximation of the normal quantile; accurate to
    // ~1e-9, plenty for a confidence bound.
    let p = 1.0 - (1.0 - level.clamp(0.5, 0.999_999)) / 2.0;
    let a = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383577518672690e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    let b = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    let c = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    let d = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let p_high = 1.0 - 0.02425;
    if p > p_high {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5])
            / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0)
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q
            / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0)
    }
}

/// Wilson score interval of `k` successes in `n` trials at normal quantile `z`.
pub fn wilson(k: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = k as f64 / n;
    let z2 = z * z;
    let center = p + z2 / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    let denom = 1.0 + z2 / n;
    (
        ((center - spread) / denom).max(0.0),
        ((center + spread) / denom).min(1.0),
    )
}

/// The lowest threshold at which the examples at or above it reach
/// `target_accuracy` as a Wilson lower bound; `examples` most confident
/// first.
fn lowest_threshold(examples: &[&Evidence], target_accuracy: f64, z: f64) -> Option<f32> {
    let mut threshold = None;
    let mut correct = 0u64;
    for (i, e) in examples.iter().enumerate() {
        correct += u64::from(e.correct);
        // Only cut between distinct confidences: a threshold admits all
        // examples with that confidence or more.
        if examples
            .get(i + 1)
            .is_some_and(|next| next.confidence == e.confidence)
        {
            continue;
        }
        let (lower, _) = wilson(correct, i as u64 + 1, z);
        if lower >= target_accuracy {
            threshold = Some(e.confidence);
        }
    }
    threshold
}

/// The lowest threshold, at or above `pooled`, at which a class's own
/// examples (`mine`, most confident first) are not significantly less
/// accurate than the target: those at or above it have a Wilson upper bound
/// of at least `target_accuracy`, or there are none. Above `pooled` the
/// candidates are the class's own confidences, so a class whose most
/// confident examples are wrong gets `None` and goes to review.
///
/// Raising the threshold rather than shutting the class keeps a class that
/// is worse than the pool at the pooled threshold, but fine where the model
/// is surer, from losing every machine label: one such class is a tenth of
/// Fashion-MNIST.
fn uncontradicted_threshold(
    mine: &[&Evidence],
    pooled: f32,
    target_accuracy: f64,
    z: f64,
) -> Option<f32> {
    let above: Vec<&Evidence> = mine
        .iter()
        .copied()
        .filter(|e| e.confidence >= pooled)
        .collect();
    let mut correct = above.iter().filter(|e| e.correct).count() as u64;
    let mut n = above.len();
    if n == 0 || wilson(correct, n as u64, z).1 >= target_accuracy {
        return Some(pooled);
    }
    // Drop the least confident examples, a tie at a time; the candidate is
    // then the lowest confidence left.
    while n > 0 {
        let lowest = above[n - 1].confidence;
        while n > 0 && above[n - 1].confidence == lowest {
            correct -= u64::from(above[n - 1].correct);
            n -= 1;
        }
        if n > 0 && wilson(correct, n as u64, z).1 >= target_accuracy {
            return Some(above[n - 1].confidence);
        }
    }
    None
}

/// Per-class thresholds for `target_accuracy` from `evidence`.
///
/// With `pool`, a class without enough evidence of its own borrows the
/// threshold calibrated on every class's evidence together. Where its own
/// examples at or above that threshold are significantly less accurate than
/// the target (their Wilson upper bound falls short of it), it gets the
/// lowest higher threshold where they no longer are, or none if even its most
/// confident examples are (see [`uncontradicted_threshold`]). Active learning
/// labels the items the model was unsure of, so few labeled examples sit in
/// any one class's confident region; pooling them is what lets machine
/// labeling start before thousands of labels per class exist.
pub fn calibrate(
    evidence: &[Evidence],
    classes: usize,
    target_accuracy: f64,
    confidence_level: f64,
    pool: bool,
) -> Calibration {
    let z = z_for(confidence_level);
    fn most_confident_first(mut examples: Vec<&Evidence>) -> Vec<&Evidence> {
        examples.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
        examples
    }
    let pooled_threshold = pool
        .then(|| {
            lowest_threshold(
                &most_confident_first(evidence.iter().collect()),
                target_accuracy,
                z,
            )
        })
        .flatten();
    let mut thresholds = vec![None; classes];
    let mut borrowed = vec![false; classes];
    let mut counts = vec![0u32; classes];
    for class in 0..classes {
        let mine = most_confident_first(
            evidence
                .iter()
                .filter(|e| e.predicted as usize == class)
                .collect(),
        );
        counts[class] = mine.len() as u32;
        thresholds[class] = lowest_threshold(&mine, target_accuracy, z);
        if let (None, Some(pooled)) = (thresholds[class], pooled_threshold)
            && let Some(threshold) = uncontradicted_threshold(&mine, pooled, target_accuracy, z)
        {
            thresholds[class] = Some(threshold);
            borrowed[class] = true;
        }
    }
    Calibration {
        target_accuracy,
        confidence_level,
        thresholds,
        evidence: counts,
        pooled: pool,
        borrowed,
        sample_rate: None,
        target_precision: None,
        target_recall: None,
    }
}

/// What a box project asks of the boxes in the images it accepts by machine,
/// beside its image target: each a Wilson lower bound at the calibration's
/// confidence level.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BoxTargets {
    /// Right boxes over proposed boxes.
    pub precision: Option<f64>,
    /// Right boxes over the boxes people drew.
    pub recall: Option<f64>,
}

impl BoxTargets {
    pub fn of(policy: &Policy) -> Self {
        Self {
            precision: policy.target_precision,
            recall: policy.target_recall,
        }
    }

    fn any(&self) -> bool {
        self.precision.is_some() || self.recall.is_some()
    }

    /// Whether boxes tallied together meet every target (a target with
    /// nothing to count, no box proposed or none drawn, is met).
    fn held(&self, tally: BoxTally, z: f64) -> bool {
        let meets = |target: Option<f64>, right: u32, of: u32| {
            target.is_none_or(|t| of == 0 || wilson(right.into(), of.into(), z).0 >= t)
        };
        meets(self.precision, tally.right, tally.proposed)
            && meets(self.recall, tally.right, tally.truth)
    }
}

/// `calibration` with every threshold raised, where it must be, so that the
/// boxes in the images at or above it meet `targets`: the lowest confidence
/// at or above the threshold at which the boxes tallied over the class's
/// examples at or above it do. An example without a tally (from a worker
/// that predates it) cannot show a box target met: a class with one above
/// its threshold loses the threshold until a retrain brings tallies. So
/// does a class whose most confident examples fall short.
///
/// The accuracy target of a box project is the share of accepted images
/// whose proposal is right (for deidentify: misses no box); these are what
/// a team states about boxes: how many of those it is handed are real
/// (precision), how many of those there are it is handed (recall). The
/// boxes of one image are not independent draws, so the bounds are looser
/// than they look where images hold many boxes; the image target beside
/// them is not.
pub fn hold_box_targets(
    mut calibration: Calibration,
    evidence: &[Evidence],
    targets: BoxTargets,
) -> Calibration {
    let z = z_for(calibration.confidence_level);
    for (class, threshold) in calibration.thresholds.iter_mut().enumerate() {
        let Some(from) = *threshold else { continue };
        let mut mine: Vec<&Evidence> = evidence
            .iter()
            .filter(|e| e.predicted as usize == class && e.confidence >= from)
            .collect();
        mine.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
        // Cut points from the most confident down, each with whether the
        // boxes at or above it meet the targets; the lowest that does is
        // the threshold.
        let mut sum = Some(BoxTally::default());
        let mut holds = Vec::with_capacity(mine.len());
        for (i, e) in mine.iter().enumerate() {
            sum = sum.zip(e.boxes).map(|(s, t)| BoxTally {
                proposed: s.proposed + t.proposed,
                right: s.right + t.right.min(t.proposed).min(t.truth),
                truth: s.truth + t.truth,
            });
            let cut = mine
                .get(i + 1)
                .is_none_or(|next| next.confidence != e.confidence);
            if cut {
                let held = sum.is_some_and(|s| targets.held(s, z));
                holds.push((e.confidence, held));
            }
        }
        *threshold = if holds.last().is_none_or(|&(_, held)| held) {
            Some(from)
        } else {
            holds
                .iter()
                .rev()
                .skip(1)
                .find(|(_, held)| *held)
                .map(|&(confidence, _)| confidence)
        };
    }
    calibration.target_precision = targets.precision;
    calibration.target_recall = targets.recall;
    calibration
}

/// The calibration `policy` gives a version with `evidence` over `classes`
/// classes: `None` without a target accuracy.
pub fn calibrate_for(
    policy: &Policy,
    evidence: &[Evidence],
    classes: usize,
) -> Option<Calibration> {
    let target = policy.target_accuracy?;
    let calibration = calibrate(
        evidence,
        classes,
        target,
        policy.confidence_level,
        policy.pool_evidence,
    );
    let targets = BoxTargets::of(policy);
    Some(if targets.any() {
        hold_box_targets(calibration, evidence, targets)
    } else {
        calibration
    })
}

/// A version's holdout evaluation as calibration evidence: the examples
/// picked at random (and, from workers that do not report the flag, all).
pub fn evidence(metrics: &HoldoutMetrics) -> Vec<Evidence> {
    metrics
        .evaluations
        .iter()
        .filter(|e| e.random != Some(false))
        .map(|e| Evidence {
            predicted: e.predicted,
            confidence: e.confidence,
            correct: e.is_correct(),
            boxes: e.boxes,
        })
        .collect()
}

/// Replace a project's policy: a new policy version, and the active model's
/// thresholds recalibrated for it. Returns the updated project.
pub async fn set_policy(
    db: &DatabaseConnection,
    project: &Project,
    policy: Policy,
) -> AppResult<Project> {
    policy.validate_for(project.task_kind)?;
    let updated = project::Entity::update(project::ActiveModel {
        id: Set(project.id.as_uuid()),
        policy: Set(serde_json::to_value(&policy).map_err(anyhow::Error::from)?),
        policy_version: Set(project.policy_version + 1),
        updated_at: Set(Utc::now().fixed_offset()),
        ..Default::default()
    })
    .exec(db)
    .await?;
    if let Some(active) = project.active_model_version_id {
        refresh(db, &policy, active, project.class_names.len()).await?;
    }
    tracing::info!(project = %project.name, version = updated.policy_version, "policy updated");
    Project::from_model(updated)
}

/// Apply `patch` to a project's policy (`PUT /policy`, `sieve project
/// policy`): a new policy version, recalibrated, unless the patch leaves the
/// policy as it was.
pub async fn patch_policy(
    db: &DatabaseConnection,
    project: &Project,
    patch: &PolicyPatch,
) -> AppResult<Project> {
    let next = patch.apply(&project.policy);
    if next == project.policy {
        return Ok(project.clone());
    }
    set_policy(db, project, next).await
}

/// Recompute and store the calibration of a model version for `policy`
/// (cleared when the policy has no target accuracy).
pub async fn refresh(
    db: &impl ConnectionTrait,
    policy: &Policy,
    version_id: Uuid,
    classes: usize,
) -> anyhow::Result<Option<Calibration>> {
    let Some(version) = model_version::Entity::find_by_id(version_id)
        .one(db)
        .await?
    else {
        anyhow::bail!("no model version {version_id}");
    };
    let project_id = version.project_id;
    let metrics: HoldoutMetrics = version
        .metrics
        .and_then(|m| serde_json::from_value(m).ok())
        .unwrap_or_default();
    let mut calibration = calibrate_for(policy, &evidence(&metrics), classes);
    if let Some(calibration) = calibration.as_mut().filter(|c| !c.is_open()) {
        let unlabeled = item::Entity::find()
            .filter(item::Column::ProjectId.eq(project_id))
            .filter(item::Column::State.ne(ItemState::HumanLabeled))
            .count(db)
            .await?;
        calibration.sample_rate = sample_rate(calibration, policy.audit_rate, unlabeled);
    }
    model_version::Entity::update(model_version::ActiveModel {
        id: Set(version_id),
        calibration: Set(calibration.as_ref().map(|c| serde_json::json!(c))),
        ..Default::default()
    })
    .exec(db)
    .await?;
    Ok(calibration)
}

/// Whether a version was trained on no labels at all (a project's first
/// model): its confidence means nothing, so its items form the random seed
/// set for review. A pretrained face detector learned from no labels here
/// but is not untrained.
pub async fn is_untrained(db: &impl ConnectionTrait, version_id: Uuid) -> anyhow::Result<bool> {
    Ok(model_version::Entity::find_by_id(version_id)
        .one(db)
        .await?
        .filter(|v| {
            v.architecture.as_ref().and_then(|a| a["arch"].as_str())
                != Some(sieve_shared::messages::ModelArch::Faces.as_str())
        })
        .and_then(|v| v.metrics)
        .and_then(|m| serde_json::from_value::<HoldoutMetrics>(m).ok())
        .is_some_and(|m| m.train_size == 0 && m.holdout_size == 0))
}

/// The stored calibration of a version, if any.
pub async fn load(
    db: &impl ConnectionTrait,
    version_id: Uuid,
) -> anyhow::Result<Option<Calibration>> {
    Ok(model_version::Entity::find_by_id(version_id)
        .one(db)
        .await?
        .and_then(|v| v.calibration)
        .and_then(|c| serde_json::from_value(c).ok()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::{Decision, Draws, decide};
    use sieve_shared::scores::Scores;

    #[test]
    fn normal_quantiles() {
        assert!((z_for(0.95) - 1.959_964).abs() < 1e-5);
        assert!((z_for(0.90) - 1.644_854).abs() < 1e-5);
        assert!((z_for(0.99) - 2.575_829).abs() < 1e-5);
    }

    #[test]
    fn wilson_matches_the_textbook() {
        // 8 of 10 at 95%: (0.4902, 0.9433).
        let (lo, hi) = wilson(8, 10, 1.959_964);
        assert!(
            (lo - 0.4902).abs() < 1e-4 && (hi - 0.9433).abs() < 1e-4,
            "{lo} {hi}"
        );
        // All correct: the lower bound is n / (n + z²).
        let (lo, _) = wilson(100, 100, 1.959_964);
        assert!((lo - 100.0 / (100.0 + 1.959_964f64.powi(2))).abs() < 1e-9);
    }

    fn ev(predicted: u32, confidence: f32, correct: bool) -> Evidence {
        Evidence {
            predicted,
            confidence,
            correct,
            boxes: None,
        }
    }

    #[test]
    fn thresholds_as_computed_by_hand() {
        // Class 0: 200 examples at confidences 0.999, 0.998, ... ; the 150
        // most confident are all right, the rest alternate wrong/right.
        let mut evidence = Vec::new();
        for i in 0..200u32 {
            let confidence = 1.0 - (i + 1) as f32 / 1000.0;
            let correct = i < 150 || i % 2 == 1;
            evidence.push(ev(0, confidence, correct));
        }
        // Class 1: only 20 examples, all right: not enough for 0.97 at 95%
        // (20 / (20 + 3.84) = 0.839).
        for i in 0..20u32 {
            evidence.push(ev(1, 0.99 - i as f32 / 100.0, true));
        }
        let c = calibrate(&evidence, 3, 0.97, 0.95, false);
        // By hand: with the first 150 all correct, LCB = 150/(150+3.8415) =
        // 0.97503 >= 0.97. Adding example 151 (wrong): 150/151, LCB 0.9635 < 0.97;
        // 152 (right): 151/152, LCB ≈ 0.9637; from there on the share only falls.
        // So the lowest threshold that meets the target is example 150's
        // confidence, 1 - 150/1000 = 0.850.
        let t0 = c.thresholds[0].expect("class 0 has enough evidence");
        assert!((t0 - 0.850).abs() < 1e-6, "{t0}");
        assert_eq!(
            c.thresholds[1], None,
            "twenty examples are not enough evidence"
        );
        assert_eq!(c.thresholds[2], None, "no evidence at all");
        assert_eq!(c.evidence, vec![200, 20, 0]);
    }

    #[test]
    fn a_lower_target_opens_the_gate_wider() {
        // 300 right, then 90% right: 0.97 stops near the 300th, 0.90 admits all.
        let evidence: Vec<Evidence> = (0..1000u32)
            .map(|i| ev(0, 1.0 - i as f32 / 2000.0, i % 10 != 9 || i < 300))
            .collect();
        let strict = calibrate(&evidence, 1, 0.97, 0.95, false).thresholds[0];
        let loose = calibrate(&evidence, 1, 0.90, 0.95, false).thresholds[0];
        assert!(loose.expect("loose") < strict.expect("strict"));
    }

    #[test]
    fn pooling_lends_the_shared_threshold_unless_a_class_contradicts_it() {
        // Classes 0-3: 75 examples each at 0.99, all right — 75/75 has a
        // Wilson lower bound of 0.951, short of 0.97 alone; the 300 together
        // reach it. Class 4: 2 examples at 0.99, both wrong. Class 5: none.
        let mut evidence = Vec::new();
        for class in 0..4 {
            evidence.extend((0..75).map(|_| ev(class, 0.99, true)));
        }
        evidence.extend((0..2).map(|_| ev(4, 0.99, false)));

        let strict = calibrate(&evidence, 6, 0.97, 0.95, false);
        assert_eq!(
            strict.thresholds,
            vec![None; 6],
            "no class has enough alone"
        );
        assert!(!strict.pooled);

        // Pooled: 300 of 302 right, lower bound 0.976.
        let pooled = calibrate(&evidence, 6, 0.97, 0.95, true);
        assert!(pooled.pooled);
        assert_eq!(pooled.thresholds[..4], [Some(0.99); 4]);
        assert_eq!(pooled.borrowed[..4], [true; 4]);
        // Class 4's own 0 of 2 at that threshold: upper bound far below 0.97.
        assert_eq!(pooled.thresholds[4], None, "contrary evidence keeps it out");
        assert_eq!(
            pooled.thresholds[5],
            Some(0.99),
            "no evidence, nothing against"
        );

        // A pool that misses the target lends nothing: 170 of 180 right.
        let mut weak: Vec<Evidence> = (0..170).map(|i| ev(i % 4, 0.99, true)).collect();
        weak.extend((0..10).map(|i| ev(i % 4, 0.99, false)));
        assert_eq!(
            calibrate(&weak, 6, 0.97, 0.95, true).thresholds,
            vec![None; 6]
        );
    }

    #[test]
    fn a_class_contradicting_the_pool_is_raised_not_shut() {
        // Classes 0-3: 1,000 right each, confidences spread over [0.80, 1.0).
        // Class 4: 8 wrong at 0.95 and 40 right at 0.99.
        let mut evidence = Vec::new();
        for class in 0..4 {
            evidence.extend((0..1000).map(|i| ev(class, 0.80 + i as f32 / 5000.0, true)));
        }
        evidence.extend((0..8).map(|_| ev(4, 0.95, false)));
        evidence.extend((0..40).map(|_| ev(4, 0.99, true)));

        let c = calibrate(&evidence, 5, 0.97, 0.95, true);
        // The pool (4,040 of 4,048 right) opens at its lowest confidence.
        assert_eq!(c.thresholds[..4], [Some(0.80); 4]);
        // Class 4 is 40 of 48 right there (Wilson upper bound ~0.92): it
        // gets the lowest threshold above its mistakes instead of none.
        assert_eq!(c.thresholds[4], Some(0.99));
        assert!(c.borrowed[4]);

        // Mistakes at the top of a class leave nothing to raise to.
        let mut top_wrong = evidence[..4000].to_vec();
        top_wrong.extend((0..40).map(|_| ev(4, 0.95, true)));
        top_wrong.extend((0..8).map(|_| ev(4, 0.99, false)));
        assert_eq!(
            calibrate(&top_wrong, 5, 0.97, 0.95, true).thresholds[4],
            None
        );
    }

    #[test]
    fn evidence_needed_is_where_all_right_first_meets_the_target() {
        for (target, level, expected) in [(0.97, 0.95, 125), (0.95, 0.95, 73), (0.99, 0.95, 381)] {
            let n = evidence_needed(target, level);
            assert_eq!(n, expected, "{target} at {level}");
            let z = z_for(level);
            let n = u64::from(n);
            assert!(wilson(n, n, z).0 >= target, "{n} all right opens {target}");
            assert!(wilson(n - 1, n - 1, z).0 < target, "{} do not", n - 1);
        }
    }

    #[test]
    fn a_shut_gate_asks_for_the_random_checks_it_lacks() {
        // 100 random checks, all at 0.99 and right: short of the 125 that
        // 0.97 needs, so nothing opens.
        let evidence: Vec<Evidence> = (0..100).map(|i| ev(i % 4, 0.99, true)).collect();
        let shut = calibrate(&evidence, 4, 0.97, 0.95, true);
        assert!(!shut.is_open());
        assert_eq!(shut.random_checks(), 100);
        // It wants 3 × 125 = 375: 275 more over 5,500 unlabeled items is a
        // share of 0.05 on top of the audit rate.
        let rate = sample_rate(&shut, 0.02, 5_500).expect("the gate is shut");
        assert!((rate - 0.07).abs() < 1e-9, "{rate}");
        // Never more than every item.
        assert_eq!(sample_rate(&shut, 0.02, 100), Some(1.0));
        // Nothing left to sample, or an open gate: the audit rate.
        assert_eq!(sample_rate(&shut, 0.02, 0), None);
        let more: Vec<Evidence> = (0..130).map(|i| ev(i % 4, 0.99, true)).collect();
        let open = calibrate(&more, 4, 0.97, 0.95, true);
        assert!(open.is_open());
        assert_eq!(sample_rate(&open, 0.02, 5_500), None);
        // Shut with evidence enough (the model errs at the top): asking for
        // more random checks would not open it.
        let wrong: Vec<Evidence> = (0..400).map(|i| ev(i % 4, 0.99, i % 5 != 0)).collect();
        let refused = calibrate(&wrong, 4, 0.97, 0.95, true);
        assert!(!refused.is_open());
        assert_eq!(sample_rate(&refused, 0.02, 5_500), None);
    }

    /// An image's random check, right by the image target, with its tally.
    fn boxed(confidence: f32, proposed: u32, right: u32, truth: u32) -> Evidence {
        Evidence {
            predicted: 0,
            confidence,
            correct: true,
            boxes: Some(BoxTally {
                proposed,
                right,
                truth,
            }),
        }
    }

    /// The Wilson lower bound of the precision (or recall) of the boxes of
    /// the images at or above `threshold`.
    fn bound(evidence: &[Evidence], threshold: f32, recall: bool) -> f64 {
        let (mut of, mut right) = (0, 0);
        for e in evidence.iter().filter(|e| e.confidence >= threshold) {
            let tally = e.boxes.unwrap();
            of += u64::from(if recall { tally.truth } else { tally.proposed });
            right += u64::from(tally.right);
        }
        wilson(right, of, z_for(0.95)).0
    }

    fn precision(target: f64) -> BoxTargets {
        BoxTargets {
            precision: Some(target),
            recall: None,
        }
    }

    #[test]
    fn a_precision_target_raises_the_threshold_above_the_false_boxes() {
        // 200 images: the 120 surest propose 3 boxes, all right; the 80
        // below a false fourth each.
        let evidence: Vec<Evidence> = (0..200)
            .map(|i| {
                let confidence = 1.0 - (i + 1) as f32 / 1000.0;
                if i < 120 {
                    boxed(confidence, 3, 3, 3)
                } else {
                    boxed(confidence, 4, 3, 3)
                }
            })
            .collect();
        let lowest = evidence[199].confidence;
        let images = calibrate(&evidence, 1, 0.97, 0.95, false);
        assert_eq!(images.thresholds[0], Some(lowest), "every image is right");

        let held = hold_box_targets(images.clone(), &evidence, precision(0.95));
        let t = held.thresholds[0].expect("the surest images' boxes are right");
        assert!(t > lowest && t < evidence[119].confidence, "{t}");
        assert!(bound(&evidence, t, false) >= 0.95);
        let next_lower = evidence.iter().find(|e| e.confidence < t).unwrap();
        assert!(bound(&evidence, next_lower.confidence, false) < 0.95);
        assert_eq!(
            (held.target_precision, held.target_recall),
            (Some(0.95), None)
        );

        // A target met where the image target already cuts changes nothing;
        // one not even the surest boxes meet shuts the gate.
        let loose = hold_box_targets(images.clone(), &evidence, precision(0.8));
        assert_eq!(loose.thresholds[0], Some(lowest));
        let strict = hold_box_targets(images.clone(), &evidence, precision(0.999));
        assert_eq!(strict.thresholds[0], None);

        // Images proposing no box add no box evidence either way.
        let empty: Vec<Evidence> = (0..200)
            .map(|i| boxed(1.0 - (i + 1) as f32 / 1000.0, 0, 0, 0))
            .collect();
        let none_proposed = calibrate(&empty, 1, 0.97, 0.95, false);
        assert_eq!(
            hold_box_targets(none_proposed.clone(), &empty, precision(0.95)).thresholds,
            none_proposed.thresholds
        );
    }

    #[test]
    fn a_recall_target_raises_the_threshold_above_the_missed_boxes() {
        // Recall first, as a deidentify image target has it: every image
        // "right" by the caller's rule, but the 60 least sure miss one of
        // their 4 boxes.
        let evidence: Vec<Evidence> = (0..200)
            .map(|i| {
                let confidence = 1.0 - (i + 1) as f32 / 1000.0;
                let right = if i < 140 { 4 } else { 3 };
                boxed(confidence, right, right, 4)
            })
            .collect();
        let images = calibrate(&evidence, 1, 0.95, 0.95, false);
        let recall = BoxTargets {
            precision: Some(0.95),
            recall: Some(0.97),
        };
        let held = hold_box_targets(images, &evidence, recall);
        let t = held.thresholds[0].expect("the surest images miss nothing");
        assert!(bound(&evidence, t, true) >= 0.97);
        assert!(t > evidence[199].confidence, "{t}");
        let next_lower = evidence.iter().find(|e| e.confidence < t).unwrap();
        assert!(bound(&evidence, next_lower.confidence, true) < 0.97);
        assert_eq!(held.target_recall, Some(0.97));
    }

    #[test]
    fn evidence_without_a_tally_cannot_show_a_box_target_met() {
        // A version from a worker that predates tallies: the image target
        // opens the gate, a box target shuts it until a retrain.
        let evidence: Vec<Evidence> = (0..200)
            .map(|i| ev(0, 1.0 - (i + 1) as f32 / 1000.0, true))
            .collect();
        let images = calibrate(&evidence, 1, 0.97, 0.95, false);
        assert!(images.is_open());
        let held = hold_box_targets(images, &evidence, precision(0.9));
        assert_eq!(held.thresholds[0], None);
    }

    #[test]
    fn a_calibration_is_for_the_box_targets_it_held() {
        let policy = Policy {
            target_accuracy: Some(0.97),
            target_precision: Some(0.95),
            ..Policy::default()
        };
        let evidence: Vec<Evidence> = (0..200)
            .map(|i| boxed(1.0 - (i + 1) as f32 / 1000.0, 2, 2, 2))
            .collect();
        let held = calibrate_for(&policy, &evidence, 1).unwrap();
        assert!(held.is_for(&policy));
        let without = Policy {
            target_precision: None,
            ..policy.clone()
        };
        assert!(!held.is_for(&without), "a threshold held to no target");
        let recall = Policy {
            target_recall: Some(0.95),
            ..policy.clone()
        };
        assert!(!held.is_for(&recall), "a threshold held to fewer targets");
        assert!(
            calibrate_for(&recall, &evidence, 1)
                .unwrap()
                .is_for(&recall)
        );
        assert!(
            calibrate_for(&without, &evidence, 1)
                .unwrap()
                .is_for(&without)
        );
        let fixed = Policy {
            target_accuracy: None,
            ..without
        };
        assert_eq!(calibrate_for(&fixed, &evidence, 1), None);
    }

    #[test]
    fn target_accuracy_uses_the_calibrated_class_threshold() {
        let policy = Policy {
            target_accuracy: Some(0.97),
            ..Policy::default()
        };
        let calibration = Calibration {
            target_accuracy: 0.97,
            confidence_level: 0.95,
            thresholds: vec![None, None, None, Some(0.8)],
            evidence: vec![0, 0, 0, 500],
            pooled: policy.pool_evidence,
            ..Calibration::default()
        };
        let s = Scores {
            top_class: 3,
            confidence: 0.85,
            margin: 0.0,
            entropy: 0.0,
            disagreement: 0.0,
            mutual_information: 0.0,
        };
        let t = threshold_for(&policy, 3, Some(&calibration));
        assert_eq!(t, Some(0.8));
        assert_eq!(
            decide(&policy, &s, t, Draws::NONE, 0.0),
            Decision::MachineLabel { class_index: 3 }
        );
        // A class without enough evidence never gets a machine label.
        assert_eq!(threshold_for(&policy, 0, Some(&calibration)), None);
        // Nor does anything before the version was calibrated for this target.
        assert_eq!(threshold_for(&policy, 3, None), None);
        let other_target = Policy {
            target_accuracy: Some(0.99),
            ..policy.clone()
        };
        assert_eq!(threshold_for(&other_target, 3, Some(&calibration)), None);
    }
}
