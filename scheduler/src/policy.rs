//! Routing policy: which predictions become machine labels and which go to a
//! human (DESIGN §6).
//!
//! A project stores its policy as JSON with a version number; every routed
//! prediction records the version that routed it. For now the threshold is
//! fixed; calibration to a target accuracy builds on the same [`decide`].

use serde::{Deserialize, Serialize};
use sieve_shared::scores::Scores;

use crate::entities::review_task::TaskReason;
use crate::error::AppError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Below this committee confidence an item goes to review.
    pub confidence_threshold: f32,
    /// Above this vote disagreement an item goes to review.
    pub disagreement_limit: f32,
    /// Share of would-be machine labels sent to review anyway, so machine
    /// accuracy is measured rather than assumed.
    pub audit_rate: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            confidence_threshold: 0.9,
            disagreement_limit: 0.34,
            audit_rate: 0.02,
        }
    }
}

impl Policy {
    pub fn validate(&self) -> Result<(), AppError> {
        let unit = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(AppError::Invalid(format!(
                    "{name} must be within 0..=1, got {v}"
                )))
            }
        };
        unit("confidence_threshold", f64::from(self.confidence_threshold))?;
        unit("disagreement_limit", f64::from(self.disagreement_limit))?;
        unit("audit_rate", self.audit_rate)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    MachineLabel { class_index: u32 },
    Review { reason: TaskReason, priority: f32 },
}

/// Route one prediction. `audit_draw` is a uniform draw in [0, 1), passed in
/// so that tests can decide it.
pub fn decide(policy: &Policy, scores: &Scores, audit_draw: f64) -> Decision {
    // Most uncertain first: priority is the committee's doubt.
    let priority = (1.0 - scores.confidence) + scores.disagreement;
    if scores.disagreement > policy.disagreement_limit {
        return Decision::Review {
            reason: TaskReason::Disagreement,
            priority,
        };
    }
    if scores.confidence < policy.confidence_threshold {
        return Decision::Review {
            reason: TaskReason::LowConfidence,
            priority,
        };
    }
    if audit_draw < policy.audit_rate {
        return Decision::Review {
            reason: TaskReason::Audit,
            priority,
        };
    }
    Decision::MachineLabel {
        class_index: scores.top_class,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn routes_by_threshold_disagreement_and_audit() {
        let policy = Policy::default();
        assert_eq!(
            decide(&policy, &scores(0.95, 0.0), 0.5),
            Decision::MachineLabel { class_index: 3 }
        );
        assert!(matches!(
            decide(&policy, &scores(0.5, 0.0), 0.5),
            Decision::Review {
                reason: TaskReason::LowConfidence,
                ..
            }
        ));
        assert!(matches!(
            decide(&policy, &scores(0.95, 0.5), 0.5),
            Decision::Review {
                reason: TaskReason::Disagreement,
                ..
            }
        ));
        assert!(matches!(
            decide(&policy, &scores(0.95, 0.0), 0.01),
            Decision::Review {
                reason: TaskReason::Audit,
                ..
            }
        ));
    }

    #[test]
    fn less_confident_items_come_first() {
        let policy = Policy::default();
        let priority = |c| match decide(&policy, &scores(c, 0.0), 0.5) {
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
        assert!(Policy::default().validate().is_ok());
        let typo = serde_json::from_str::<Policy>(r#"{"confidence_treshold":0.5}"#);
        assert!(typo.is_err(), "unknown policy fields are refused");
    }
}
