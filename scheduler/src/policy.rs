//! Routing policy: which predictions become machine labels and which go to a
//! human (DESIGN §6).
//!
//! A project stores its policy as JSON with a version number; every routed
//! prediction records the version that routed it. The confidence threshold
//! is either fixed or, with a target accuracy, the per-class threshold the
//! active model version was calibrated to (routing's `calibration`, which
//! reads this policy; nothing here reads anything above it).
//!
//! Audits are chosen per item, not per routing, from two fixed draws of a
//! hash of (project, content hash) ([`draws`]), so a rescore neither redraws
//! them nor lets an item's chances grow with every round, and they are the
//! same whichever model version routes:
//! - the **sample** (`draws.sample` under the audit rate) always goes to a
//!   human, whatever the model says: random evidence for calibration from
//!   the first trained model on, before any machine label exists;
//! - the **audit** (`draws.audit` under the audit rate, an independent draw)
//!   goes to a human when the policy would label it by machine: these
//!   measure the accuracy of machine labels. With one draw for both, the
//!   sample was reviewed in the loop's first rounds, while no item was yet
//!   confident enough to be labeled by machine, and no audit was ever left.
//!
//! Both are random, unlike the uncertain items active learning picks, which
//! makes them the evidence calibration can trust.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sieve_shared::ids::ProjectId;
use sieve_shared::kind::TaskKind;
use sieve_shared::scores::Scores;

use crate::entities::review_task::TaskReason;
use crate::error::AppError;
use crate::patch::present;

/// Which committee disagreement the limit applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DisagreementMeasure {
    /// Share of members whose vote differs from the committee's.
    #[default]
    Vote,
    /// H(p̄) − mean H(p_k), in nats.
    MutualInformation,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Below this committee confidence an item goes to review (when no
    /// target accuracy is set).
    pub confidence_threshold: f32,
    /// When set, thresholds are calibrated per class so that machine labels
    /// reach this accuracy (as a lower confidence bound).
    pub target_accuracy: Option<f64>,
    /// Confidence level of that lower bound (Wilson interval).
    pub confidence_level: f64,
    pub disagreement_measure: DisagreementMeasure,
    /// Above this disagreement an item goes to review.
    pub disagreement_limit: f32,
    /// Share of items (a fixed random sample, chosen by content hash) that a
    /// human reviews whatever the model says: would-be machine labels among
    /// them are audits, so machine accuracy is measured rather than assumed,
    /// and all of them are unbiased calibration evidence.
    pub audit_rate: f64,
    /// With a target accuracy: a class short of evidence of its own borrows
    /// the threshold calibrated on all classes together, unless its own
    /// examples above it are significantly worse than the target. On by
    /// default: without it each class needs its own ~125 random checks
    /// (at 0.97) before any of its items is labeled by machine, which a
    /// project of a few thousand items never gathers.
    pub pool_evidence: bool,
    /// Retrain automatically once this many human labels have arrived since
    /// the last run's snapshot (`None`: only on request).
    pub retrain_every_labels: Option<u32>,
    /// Label-error check: a reviewer's label that disagrees with a model
    /// this confident (or more) gets a second review by someone else
    /// (`None`: off). See `review::submit`.
    pub second_review_confidence: Option<f32>,
    /// A box project's second target, with [`target_accuracy`]: the share
    /// of the boxes proposed in machine-accepted images that are right (a
    /// person keeps them), as a lower confidence bound at
    /// [`confidence_level`]. Thresholds are raised until it holds
    /// (routing's `calibration::hold_box_targets`). `None`: not held (a
    /// deidentify project's extra box only blurs more).
    ///
    /// [`target_accuracy`]: Self::target_accuracy
    /// [`confidence_level`]: Self::confidence_level
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_precision: Option<f64>,
    /// The same for recall: the share of the boxes people would draw in
    /// machine-accepted images that the proposal has. `None`: not held
    /// beyond what the image target implies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_recall: Option<f64>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            confidence_threshold: 0.9,
            target_accuracy: None,
            confidence_level: 0.95,
            disagreement_measure: DisagreementMeasure::Vote,
            disagreement_limit: 0.34,
            audit_rate: 0.02,
            retrain_every_labels: None,
            pool_evidence: true,
            second_review_confidence: None,
            target_precision: None,
            target_recall: None,
        }
    }
}

impl Policy {
    /// Recall first: a `deidentify` project's own default targets, a stated
    /// [`target_accuracy`](Self::target_accuracy) of 0.99 (at least 99% of
    /// the images it accepts by machine miss no face or plate) and a
    /// [`target_recall`](Self::target_recall) of 0.99 (at least 99% of the
    /// faces and plates in them are boxed), each a lower confidence bound
    /// on random checks, not a confidence threshold a leak could slip under.
    pub const DEIDENTIFY_TARGET: f64 = 0.99;

    /// The policy a project of `kind` gets when its creator states none.
    pub fn default_for(kind: TaskKind) -> Self {
        match kind {
            TaskKind::Deidentify => Self {
                target_accuracy: Some(Self::DEIDENTIFY_TARGET),
                target_recall: Some(Self::DEIDENTIFY_TARGET),
                ..Self::default()
            },
            TaskKind::Classification | TaskKind::Detection => Self::default(),
        }
    }

    pub fn validate(&self) -> Result<(), AppError> {
        let within = |name: &str, v: f64, lo: f64, hi: f64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(AppError::Invalid(format!(
                    "{name} must be within {lo}..={hi}, got {v}"
                )))
            }
        };
        within(
            "confidence_threshold",
            f64::from(self.confidence_threshold),
            0.0,
            1.0,
        )?;
        if let Some(target) = self.target_accuracy {
            within("target_accuracy", target, 0.5, 0.9999)?;
        }
        within("confidence_level", self.confidence_level, 0.5, 0.9999)?;
        within(
            "disagreement_limit",
            f64::from(self.disagreement_limit),
            0.0,
            10.0,
        )?;
        within("audit_rate", self.audit_rate, 0.0, 1.0)?;
        if let Some(confidence) = self.second_review_confidence {
            within("second_review_confidence", f64::from(confidence), 0.0, 1.0)?;
        }
        if self.retrain_every_labels == Some(0) {
            return Err(AppError::Invalid(
                "retrain_every_labels must be at least 1 (or unset)".into(),
            ));
        }
        for (name, target) in [
            ("target_precision", self.target_precision),
            ("target_recall", self.target_recall),
        ] {
            let Some(target) = target else { continue };
            within(name, target, 0.5, 0.9999)?;
            if self.target_accuracy.is_none() {
                return Err(AppError::Invalid(format!(
                    "{name} is held beside a target_accuracy: set one too \
                     (a fixed confidence threshold has no calibration to hold it)"
                )));
            }
        }
        Ok(())
    }

    /// [`validate`](Self::validate), and what only a project of `kind` may
    /// state: a precision target needs boxes.
    pub fn validate_for(&self, kind: TaskKind) -> Result<(), AppError> {
        self.validate()?;
        if (self.target_precision.is_some() || self.target_recall.is_some()) && !kind.draws_boxes()
        {
            return Err(AppError::Invalid(format!(
                "target_precision and target_recall are about boxes; a {kind} project has none \
                 (its target_accuracy is the share of right labels)"
            )));
        }
        Ok(())
    }
}

/// A change to a policy, as `PUT /api/v1/projects/{p}/policy` and
/// `sieve project policy` take it: a field left out stays as it is, an
/// explicit `null` clears an optional one (back to the fixed threshold, no
/// automatic retrains, no second opinions). The result is validated as a
/// whole by [`Policy::validate`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyPatch {
    pub confidence_threshold: Option<f32>,
    #[serde(default, deserialize_with = "present")]
    pub target_accuracy: Option<Option<f64>>,
    pub confidence_level: Option<f64>,
    pub disagreement_measure: Option<DisagreementMeasure>,
    pub disagreement_limit: Option<f32>,
    pub audit_rate: Option<f64>,
    pub pool_evidence: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    pub retrain_every_labels: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    pub second_review_confidence: Option<Option<f32>>,
    #[serde(default, deserialize_with = "present")]
    pub target_precision: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    pub target_recall: Option<Option<f64>>,
}

impl PolicyPatch {
    /// `policy` with this change applied (not yet validated).
    pub fn apply(&self, policy: &Policy) -> Policy {
        let mut next = policy.clone();
        let Self {
            confidence_threshold,
            target_accuracy,
            confidence_level,
            disagreement_measure,
            disagreement_limit,
            audit_rate,
            pool_evidence,
            retrain_every_labels,
            second_review_confidence,
            target_precision,
            target_recall,
        } = self.clone();
        if let Some(v) = confidence_threshold {
            next.confidence_threshold = v;
        }
        if let Some(v) = target_accuracy {
            next.target_accuracy = v;
        }
        if let Some(v) = confidence_level {
            next.confidence_level = v;
        }
        if let Some(v) = disagreement_measure {
            next.disagreement_measure = v;
        }
        if let Some(v) = disagreement_limit {
            next.disagreement_limit = v;
        }
        if let Some(v) = audit_rate {
            next.audit_rate = v;
        }
        if let Some(v) = pool_evidence {
            next.pool_evidence = v;
        }
        if let Some(v) = retrain_every_labels {
            next.retrain_every_labels = v;
        }
        if let Some(v) = second_review_confidence {
            next.second_review_confidence = v;
        }
        if let Some(v) = target_precision {
            next.target_precision = v;
        }
        if let Some(v) = target_recall {
            next.target_recall = v;
        }
        // Box targets rest on the calibration a target accuracy makes:
        // going back to a fixed threshold drops those the change does not
        // set itself.
        if next.target_accuracy.is_none() {
            if target_precision.is_none() {
                next.target_precision = None;
            }
            if target_recall.is_none() {
                next.target_recall = None;
            }
        }
        next
    }
}

impl DisagreementMeasure {
    pub fn parse(raw: &str) -> Result<Self, AppError> {
        match raw {
            "vote" => Ok(Self::Vote),
            "mutual_information" => Ok(Self::MutualInformation),
            other => Err(AppError::Invalid(format!(
                "disagreement measure {other:?}: use vote or mutual_information"
            ))),
        }
    }
}

/// Priority of audit and sample tasks: ahead of every uncertain item
/// (uncertainty priorities are at most 2). They are few — the audit rate —
/// and calibration cannot open the gate to machine labels without them.
pub const AUDIT_PRIORITY: f32 = 3.0;

/// An item's two fixed draws in [0, 1), compared with the audit rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draws {
    /// Under the rate: in the calibration sample (always reviewed).
    pub sample: f64,
    /// Under the rate: audited when the policy would label it by machine.
    pub audit: f64,
}

impl Draws {
    /// Draws that are never under any rate: no sample, no audit.
    pub const NONE: Draws = Draws {
        sample: 1.0,
        audit: 1.0,
    };
}

/// The item's draws: the first eight bytes of SHA-256(project id, content
/// hash) for the sample, and of SHA-256(project id, content hash, "audit")
/// for the audit. Salted by the project so that two projects sharing images
/// sample independently, and independent of the holdout split (which reads
/// the content hash itself).
pub fn draws(project: ProjectId, content_hash: &str) -> Draws {
    let draw = |salt: &[u8]| {
        let mut hasher = Sha256::new();
        hasher.update(project.as_uuid().as_bytes());
        hasher.update(content_hash.as_bytes());
        hasher.update(salt);
        let digest = hasher.finalize();
        let mut head = [0u8; 8];
        head.copy_from_slice(&digest[..8]);
        // 53 bits: exactly representable in an f64 in [0, 1).
        (u64::from_be_bytes(head) >> 11) as f64 / (1u64 << 53) as f64
    };
    Draws {
        sample: draw(b""),
        audit: draw(b"audit"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    MachineLabel { class_index: u32 },
    Review { reason: TaskReason, priority: f32 },
}

/// Route one prediction. `threshold` comes from routing's
/// `calibration::threshold_for`;
/// `draws` are the item's [`draws`], passed in so tests decide them;
/// `sample_rate` is the share of items sampled for random checks: the
/// audit rate, or more while the active version's gate is shut for want of
/// evidence (routing's `calibration::sample_rate`).
pub fn decide(
    policy: &Policy,
    scores: &Scores,
    threshold: Option<f32>,
    draws: Draws,
    sample_rate: f64,
) -> Decision {
    // Most uncertain first: priority is the committee's doubt.
    let priority = (1.0 - scores.confidence) + scores.disagreement;
    let disagreement = match policy.disagreement_measure {
        DisagreementMeasure::Vote => scores.disagreement,
        DisagreementMeasure::MutualInformation => scores.mutual_information,
    };
    let review = if disagreement > policy.disagreement_limit {
        Some(TaskReason::Disagreement)
    } else {
        match threshold {
            Some(t) if scores.confidence >= t => None,
            _ => Some(TaskReason::LowConfidence),
        }
    };
    let sampled = draws.sample < sample_rate.max(policy.audit_rate);
    let audited = draws.audit < policy.audit_rate;
    match (review, audited, sampled) {
        (None, true, _) => Decision::Review {
            reason: TaskReason::Audit,
            priority: AUDIT_PRIORITY,
        },
        (None, false, false) => Decision::MachineLabel {
            class_index: scores.top_class,
        },
        (_, _, true) => Decision::Review {
            reason: TaskReason::Sample,
            priority: AUDIT_PRIORITY,
        },
        (Some(reason), _, false) => Decision::Review { reason, priority },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deidentify_project_defaults_to_a_stated_target() {
        let street = Policy::default_for(TaskKind::Deidentify);
        assert_eq!(
            (street.target_accuracy, street.target_recall),
            (
                Some(Policy::DEIDENTIFY_TARGET),
                Some(Policy::DEIDENTIFY_TARGET)
            )
        );
        // Back to a fixed threshold: the box targets resting on the
        // calibration go with it, unless the change sets them itself.
        let fixed = PolicyPatch {
            target_accuracy: Some(None),
            ..PolicyPatch::default()
        }
        .apply(&street);
        assert_eq!((fixed.target_accuracy, fixed.target_recall), (None, None));
        assert!(fixed.validate_for(TaskKind::Deidentify).is_ok());
        let contradictory = PolicyPatch {
            target_accuracy: Some(None),
            target_recall: Some(Some(0.9)),
            ..PolicyPatch::default()
        }
        .apply(&street);
        assert!(contradictory.validate_for(TaskKind::Deidentify).is_err());
        for kind in [TaskKind::Classification, TaskKind::Detection] {
            assert_eq!(Policy::default_for(kind), Policy::default());
        }
        assert!(Policy::default_for(TaskKind::Deidentify).validate().is_ok());
    }

    fn scores(confidence: f32, disagreement: f32) -> Scores {
        Scores {
            top_class: 3,
            confidence,
            margin: 0.0,
            entropy: 0.0,
            disagreement,
            mutual_information: 0.0,
        }
    }

    fn fixed(policy: &Policy, s: &Scores, draws: Draws) -> Decision {
        // Without a target the threshold is the fixed one.
        let threshold = policy
            .target_accuracy
            .is_none()
            .then_some(policy.confidence_threshold);
        decide(policy, s, threshold, draws, policy.audit_rate)
    }

    const AUDIT: Draws = Draws {
        sample: 0.5,
        audit: 0.01,
    };
    const SAMPLE: Draws = Draws {
        sample: 0.01,
        audit: 0.5,
    };

    #[test]
    fn routes_by_threshold_disagreement_and_audit() {
        let policy = Policy::default();
        assert_eq!(
            fixed(&policy, &scores(0.95, 0.0), Draws::NONE),
            Decision::MachineLabel { class_index: 3 }
        );
        assert!(matches!(
            fixed(&policy, &scores(0.5, 0.0), Draws::NONE),
            Decision::Review {
                reason: TaskReason::LowConfidence,
                ..
            }
        ));
        assert!(matches!(
            fixed(&policy, &scores(0.95, 0.5), Draws::NONE),
            Decision::Review {
                reason: TaskReason::Disagreement,
                ..
            }
        ));
        assert!(matches!(
            fixed(&policy, &scores(0.95, 0.0), AUDIT),
            Decision::Review {
                reason: TaskReason::Audit,
                ..
            }
        ));
    }

    #[test]
    fn sampled_items_always_reach_a_human_and_audits_only_confident_ones() {
        let policy = Policy::default();
        // Under the rate: sampled items are reviewed whatever the model says,
        // audited ones when the model would label them; both first.
        for (confidence, disagreement, draws, reason) in [
            (0.95, 0.0, AUDIT, Some(TaskReason::Audit)),
            (0.95, 0.0, SAMPLE, Some(TaskReason::Sample)),
            (0.5, 0.0, SAMPLE, Some(TaskReason::Sample)),
            (0.95, 0.5, SAMPLE, Some(TaskReason::Sample)),
            (
                0.95,
                0.0,
                Draws {
                    sample: 0.01,
                    audit: 0.01,
                },
                Some(TaskReason::Audit),
            ),
            // An audit draw on an uncertain item: reviewed for its doubt.
            (0.5, 0.0, AUDIT, None),
        ] {
            let decision = fixed(&policy, &scores(confidence, disagreement), draws);
            match reason {
                Some(reason) => assert_eq!(
                    decision,
                    Decision::Review {
                        reason,
                        priority: AUDIT_PRIORITY
                    },
                    "{confidence} {disagreement} {draws:?}"
                ),
                None => assert!(
                    matches!(
                        decision,
                        Decision::Review { reason: TaskReason::LowConfidence, priority }
                            if priority < AUDIT_PRIORITY
                    ),
                    "{decision:?}"
                ),
            }
        }
        // Uncertainty priorities stay below the audits'.
        match fixed(&policy, &scores(0.0, 1.0), Draws::NONE) {
            Decision::Review { priority, .. } => assert!(priority < AUDIT_PRIORITY),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_draws_are_stable_uniform_independent_and_per_project() {
        let project = ProjectId::new();
        let hash = |i: u32| format!("{i:064x}");
        assert_eq!(draws(project, &hash(7)), draws(project, &hash(7)));
        let other = ProjectId::new();
        assert_ne!(draws(project, &hash(7)), draws(other, &hash(7)));
        // Sequential (non-random) hashes still give uniform draws: 10,000
        // draws under 0.02 is Binomial(10000, 0.02), mean 200, sd 14.
        let all: Vec<Draws> = (0..10_000).map(|i| draws(project, &hash(i))).collect();
        for pick in [|d: &Draws| d.sample, |d: &Draws| d.audit] {
            let values: Vec<f64> = all.iter().map(pick).collect();
            assert!(values.iter().all(|d| (0.0..1.0).contains(d)));
            let under = values.iter().filter(|&&d| d < 0.02).count();
            assert!((144..=256).contains(&under), "{under}");
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            assert!((mean - 0.5).abs() < 0.02, "{mean}");
        }
        // Independent: both under 0.2 is Binomial(10000, 0.04), mean 400, sd 20.
        let both = all
            .iter()
            .filter(|d| d.sample < 0.2 && d.audit < 0.2)
            .count();
        assert!((320..=480).contains(&both), "{both}");
    }

    #[test]
    fn a_raised_sample_rate_sends_more_items_to_random_checks() {
        let policy = Policy::default();
        // Confident, not audited; its sample draw 0.10 is above the audit
        // rate (0.02) but under a raised sample rate (0.15).
        let draws = Draws {
            sample: 0.10,
            audit: 0.5,
        };
        let s = scores(0.5, 0.0);
        assert!(matches!(
            decide(&policy, &s, Some(0.9), draws, policy.audit_rate),
            Decision::Review {
                reason: TaskReason::LowConfidence,
                ..
            }
        ));
        assert_eq!(
            decide(&policy, &s, Some(0.9), draws, 0.15),
            Decision::Review {
                reason: TaskReason::Sample,
                priority: AUDIT_PRIORITY
            }
        );
        // A rate under the audit rate never lowers it.
        assert!(matches!(
            decide(&policy, &s, Some(0.9), SAMPLE, 0.0),
            Decision::Review {
                reason: TaskReason::Sample,
                ..
            }
        ));
    }

    #[test]
    fn mutual_information_can_be_the_disagreement_measure() {
        let policy = Policy {
            disagreement_measure: DisagreementMeasure::MutualInformation,
            disagreement_limit: 0.1,
            ..Policy::default()
        };
        let mut s = scores(0.95, 0.9);
        s.mutual_information = 0.05;
        assert!(matches!(
            fixed(&policy, &s, Draws::NONE),
            Decision::MachineLabel { .. }
        ));
        s.mutual_information = 0.2;
        assert!(matches!(
            fixed(&policy, &s, Draws::NONE),
            Decision::Review {
                reason: TaskReason::Disagreement,
                ..
            }
        ));
    }

    #[test]
    fn less_confident_items_come_first() {
        let policy = Policy::default();
        let priority = |c| match fixed(&policy, &scores(c, 0.0), Draws::NONE) {
            Decision::Review { priority, .. } => priority,
            Decision::MachineLabel { .. } => panic!("expected review"),
        };
        assert!(priority(0.3) > priority(0.6));
    }

    #[test]
    fn rejects_out_of_range_settings() {
        let bad = Policy {
            confidence_threshold: 1.5,
            ..Policy::default()
        };
        assert!(bad.validate().is_err());
        let bad = Policy {
            target_accuracy: Some(1.0),
            ..Policy::default()
        };
        assert!(bad.validate().is_err());
        assert!(Policy::default().validate().is_ok());
        let typo = serde_json::from_str::<Policy>(r#"{"confidence_treshold":0.5}"#);
        assert!(typo.is_err(), "unknown policy fields are refused");
        let bad = Policy {
            second_review_confidence: Some(1.5),
            ..Policy::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn box_targets_need_a_target_accuracy_and_boxes() {
        let message = |policy: &Policy, kind| match policy.validate_for(kind) {
            Err(AppError::Invalid(message)) => message,
            other => panic!("{policy:?} for {kind} was not refused: {other:?}"),
        };
        let alone = Policy {
            target_precision: Some(0.95),
            ..Policy::default()
        };
        assert!(message(&alone, TaskKind::Detection).contains("set one too"));
        let both = Policy {
            target_accuracy: Some(0.97),
            ..alone
        };
        assert!(both.validate_for(TaskKind::Detection).is_ok());
        assert!(both.validate_for(TaskKind::Deidentify).is_ok());
        assert!(
            message(&both, TaskKind::Classification).contains("a classification project has none")
        );
        let out_of_range = Policy {
            target_precision: Some(1.0),
            ..both.clone()
        };
        assert!(
            message(&out_of_range, TaskKind::Detection).contains("target_precision must be within")
        );
        let recall = Policy {
            target_recall: Some(0.99),
            target_precision: None,
            ..both
        };
        assert!(recall.validate_for(TaskKind::Deidentify).is_ok());
        assert!(message(&recall, TaskKind::Classification).contains("target_recall"));
        let recall_alone = Policy {
            target_accuracy: None,
            ..recall
        };
        assert!(
            message(&recall_alone, TaskKind::Detection).contains("target_recall is held beside")
        );
    }

    #[test]
    fn policies_stored_before_a_field_existed_still_parse() {
        // As stored before second reviews: the field takes its default (off).
        let stored = r#"{"confidence_threshold":0.8,"target_accuracy":null,"confidence_level":0.95,
            "disagreement_measure":"vote","disagreement_limit":0.34,"audit_rate":0.02,
            "pool_evidence":false,"retrain_every_labels":null}"#;
        let policy: Policy = serde_json::from_str(stored).unwrap_or_default();
        assert_eq!(policy.confidence_threshold, 0.8);
        assert_eq!(policy.second_review_confidence, None);
    }

    #[test]
    fn a_patch_changes_what_it_names_and_null_clears() {
        let policy = Policy {
            target_accuracy: Some(0.97),
            retrain_every_labels: Some(500),
            ..Policy::default()
        };
        let patch: PolicyPatch =
            serde_json::from_str(r#"{"audit_rate": 0.05, "target_accuracy": null}"#)
                .expect("a valid patch");
        let next = patch.apply(&policy);
        assert_eq!(next.audit_rate, 0.05);
        assert_eq!(next.target_accuracy, None);
        // Left out: unchanged, not reset to the default.
        assert_eq!(next.retrain_every_labels, Some(500));
        assert_eq!(PolicyPatch::default().apply(&policy), policy);
        assert!(serde_json::from_str::<PolicyPatch>(r#"{"treshold": 0.5}"#).is_err());
    }
}
