//! Committee uncertainty scores (DESIGN §6).
//!
//! Pure functions over the members' class probabilities, shared so that the
//! worker that computes them and the scheduler that routes on them agree on
//! one definition. Entropies are in nats.

use serde::{Deserialize, Serialize};

/// How sure a committee is about one item.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Argmax of the mean probabilities: the proposed label.
    pub top_class: u32,
    /// max p̄.
    pub confidence: f32,
    /// top1 − top2 of p̄.
    pub margin: f32,
    /// H(p̄) = −Σ p̄ log p̄.
    pub entropy: f32,
    /// Share of members whose top class differs from `top_class`.
    pub disagreement: f32,
    /// H(p̄) − mean_k H(p_k): the committee's epistemic uncertainty.
    pub mutual_information: f32,
}

/// Mean probabilities, member votes and scores of one item.
#[derive(Clone, Debug, PartialEq)]
pub struct CommitteeScores {
    pub mean: Vec<f32>,
    pub member_votes: Vec<u32>,
    pub scores: Scores,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScoreError {
    #[error("a committee needs at least one member")]
    NoMembers,
    #[error("member {member} has {found} classes, expected {expected}")]
    RaggedMembers {
        member: usize,
        found: usize,
        expected: usize,
    },
    #[error("a prediction needs at least one class")]
    NoClasses,
}

fn entropy(p: &[f32]) -> f32 {
    -p.iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| x * x.ln())
        .sum::<f32>()
}

fn argmax(p: &[f32]) -> usize {
    // Ties go to the lowest index, so the result is deterministic.
    p.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 { (i, x) } else { best }
        })
        .0
}

/// Scores of one item from its members' probabilities, `members[k][class]`.
pub fn committee_scores(members: &[Vec<f32>]) -> Result<CommitteeScores, ScoreError> {
    let first = members.first().ok_or(ScoreError::NoMembers)?;
    let classes = first.len();
    if classes == 0 {
        return Err(ScoreError::NoClasses);
    }
    if let Some((member, p)) = members.iter().enumerate().find(|(_, p)| p.len() != classes) {
        return Err(ScoreError::RaggedMembers {
            member,
            found: p.len(),
            expected: classes,
        });
    }

    let k = members.len() as f32;
    let mut mean = vec![0.0f32; classes];
    for p in members {
        for (m, x) in mean.iter_mut().zip(p) {
            *m += x / k;
        }
    }

    let top = argmax(&mean);
    let mut sorted = mean.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let margin = sorted[0] - sorted.get(1).copied().unwrap_or(0.0);

    let member_votes: Vec<u32> = members.iter().map(|p| argmax(p) as u32).collect();
    let dissenters = member_votes.iter().filter(|&&v| v as usize != top).count();

    let mean_entropy = entropy(&mean);
    let member_entropy = members.iter().map(|p| entropy(p)).sum::<f32>() / k;

    Ok(CommitteeScores {
        scores: Scores {
            top_class: top as u32,
            confidence: mean[top],
            margin,
            entropy: mean_entropy,
            disagreement: dissenters as f32 / k,
            // Clamp rounding noise: MI is non-negative by Jensen's inequality.
            mutual_information: (mean_entropy - member_entropy).max(0.0),
        },
        member_votes,
        mean,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn agreeing_certain_members_have_no_uncertainty() {
        let s = committee_scores(&[vec![1.0, 0.0, 0.0], vec![1.0, 0.0, 0.0]]).expect("scores");
        assert_eq!(s.scores.top_class, 0);
        assert!(close(s.scores.confidence, 1.0));
        assert!(close(s.scores.margin, 1.0));
        assert!(close(s.scores.entropy, 0.0));
        assert!(close(s.scores.disagreement, 0.0));
        assert!(close(s.scores.mutual_information, 0.0));
        assert_eq!(s.member_votes, vec![0, 0]);
    }

    #[test]
    fn confident_members_that_disagree_show_epistemic_uncertainty() {
        // Two members each certain, of different classes: mean is 50/50.
        let s = committee_scores(&[vec![1.0, 0.0], vec![0.0, 1.0]]).expect("scores");
        assert_eq!(s.scores.top_class, 0, "ties go to the lowest class");
        assert!(close(s.scores.confidence, 0.5));
        assert!(close(s.scores.margin, 0.0));
        assert!(close(s.scores.entropy, std::f32::consts::LN_2));
        assert!(close(s.scores.disagreement, 0.5));
        // All of the entropy is disagreement: members are individually sure.
        assert!(close(s.scores.mutual_information, std::f32::consts::LN_2));
    }

    #[test]
    fn worked_example_of_three_members() {
        let members = [
            vec![0.7, 0.2, 0.1],
            vec![0.6, 0.3, 0.1],
            vec![0.2, 0.7, 0.1],
        ];
        let s = committee_scores(&members).expect("scores");
        // p̄ = (0.5, 0.4, 0.1)
        assert!(close(s.mean[0], 0.5) && close(s.mean[1], 0.4) && close(s.mean[2], 0.1));
        assert_eq!(s.scores.top_class, 0);
        assert!(close(s.scores.confidence, 0.5));
        assert!(close(s.scores.margin, 0.1));
        let h_mean = -(0.5f32 * 0.5f32.ln() + 0.4 * 0.4f32.ln() + 0.1 * 0.1f32.ln());
        assert!(close(s.scores.entropy, h_mean));
        assert!(close(s.scores.disagreement, 1.0 / 3.0));
        let h = |p: &[f32]| -p.iter().map(|x| x * x.ln()).sum::<f32>();
        let mi = h_mean - (h(&members[0]) + h(&members[1]) + h(&members[2])) / 3.0;
        assert!(close(s.scores.mutual_information, mi));
        assert_eq!(s.member_votes, vec![0, 0, 1]);
    }

    #[test]
    fn malformed_committees_are_errors() {
        assert_eq!(committee_scores(&[]), Err(ScoreError::NoMembers));
        assert_eq!(committee_scores(&[vec![]]), Err(ScoreError::NoClasses));
        assert_eq!(
            committee_scores(&[vec![0.5, 0.5], vec![1.0]]),
            Err(ScoreError::RaggedMembers {
                member: 1,
                found: 1,
                expected: 2
            })
        );
    }
}
