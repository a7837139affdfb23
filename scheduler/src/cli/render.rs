//! How the CLI shows things to a person: the status screens, a version's
//! figures, and JSON for scripts.

use chrono::SecondsFormat;

use crate::operate::{failed, reviewers, status};

pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn project(status: &status::ProjectStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "project {} ({} items, {})",
        status.project.name, status.total_items, status.project.arch
    );
    for (state, n) in &status.items {
        let _ = writeln!(out, "  {state:<14} {n}");
    }
    let _ = writeln!(
        out,
        "  review: {} open, {} claimed; active model: {}; policy v{}",
        status.review_open,
        status.review_claimed,
        status
            .active_model_version
            .map_or("none".into(), |v| format!("v{v}")),
        status.project.policy_version
    );
    if let Ok(boxes) = status.project.box_settings() {
        let _ = writeln!(
            out,
            "  boxes: tiles of {} px, proposed from {} (the next training run's; `sieve project boxes`)",
            boxes.tile_size, boxes.proposal_threshold
        );
    }
    for m in &status.machine_label_accuracy {
        let _ = writeln!(
            out,
            "  machine-label accuracy {:<12} {:.3} [{:.3}, {:.3}] from {} audits",
            m.class.as_deref().unwrap_or("(overall)"),
            m.accuracy,
            m.lower,
            m.upper,
            m.audited
        );
    }
    if let Some(a) = &status.face_audits {
        let _ = writeln!(
            out,
            "  face audits: {} images the machine would have accepted, {} faces boxed by auditors, \
             {} missed by the machine (recall {:.3}); {} plates, {} missed; {} boxes proposed, \
             {} false (precision {:.3})",
            a.images,
            a.faces,
            a.missed,
            a.recall,
            a.plates,
            a.missed_plates,
            a.proposed,
            a.false_boxes,
            a.precision
        );
    }
    let second = &status.second_opinions;
    if status.project.policy.second_review_confidence.is_some()
        || *second != status::SecondOpinions::default()
    {
        let _ = writeln!(
            out,
            "  second opinions: {} open; the second reviewer agreed with the first {}, \
             with the model {}, with neither {}",
            second.open, second.agreed_with_first, second.agreed_with_model, second.neither
        );
    }
    if let Some(c) = &status.calibration {
        let state = if c.open {
            "open".to_owned()
        } else if c.random_checks < c.needed {
            format!(
                "shut: at least {} more random checks needed (asked first in review: {} waiting, {} answered for the next version)",
                c.needed - c.random_checks,
                c.waiting,
                c.answered_since
            )
        } else if c.sample_rate > status.project.policy.audit_rate {
            format!(
                "shut: the model errs on some random checks, so more are asked first in review ({} waiting, {} answered for the next version)",
                c.waiting, c.answered_since
            )
        } else {
            "shut: the random checks show the model short of the target; more labels and a retrain should open it".to_owned()
        };
        let policy = &status.project.policy;
        let boxes: Vec<String> = [
            ("precision", policy.target_precision),
            ("recall", policy.target_recall),
        ]
        .iter()
        .filter_map(|(name, target)| target.map(|t| format!("box {name} ≥ {t}")))
        .collect();
        let boxes = if boxes.is_empty() {
            String::new()
        } else {
            format!(" and {}", boxes.join(", "))
        };
        let _ = writeln!(
            out,
            "  calibration to {:.3}{boxes}: {} random checks (at least {} needed); sampling {:.1}% of items; gate {state}",
            c.target_accuracy,
            c.random_checks,
            c.needed,
            c.sample_rate * 100.0
        );
    }
    for r in &status.reported_labels {
        let _ = writeln!(
            out,
            "  reported {} labels {:<12} {} corrected, {} confirmed, {} in review \
             (not audits: not in the accuracy above)",
            r.source, r.class, r.corrected, r.confirmed, r.open
        );
    }
    out
}

/// ` — after 6 attempts: <error>` for a job a worker gave up retrying.
pub fn last_error(d: &failed::DeadLetter) -> String {
    match (&d.error, d.attempts) {
        (Some(error), Some(n)) => format!(" — after {n} attempts: {error}"),
        (Some(error), None) => format!(" — {error}"),
        _ => String::new(),
    }
}

pub fn fleet(fleet: &status::FleetStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "queues ({}):", fleet.queue_source);
    for q in &fleet.queues {
        let _ = writeln!(
            out,
            "  {:<28} ready {:>8}  unacked {:>8}  consumers {:>3}  publish/s {:>8}  deliver/s {:>8}",
            q.name,
            q.ready,
            q.unacked.map_or("-".into(), |n| n.to_string()),
            q.consumers,
            q.publish_rate.map_or("-".into(), |r| format!("{r:.1}")),
            q.deliver_rate.map_or("-".into(), |r| format!("{r:.1}")),
        );
    }
    match &fleet.workers_error {
        Some(err) => {
            let _ = writeln!(out, "workers: unknown ({err})");
        }
        None => {
            let _ = writeln!(
                out,
                "workers: {} alive, {} lost",
                fleet.workers_alive, fleet.workers_lost
            );
        }
    }
    for p in &fleet.projects {
        let machine_share = if p.machine_labeled + p.human_labeled > 0 {
            format!(
                "{:.1}%",
                100.0 * p.machine_labeled as f64 / (p.machine_labeled + p.human_labeled) as f64
            )
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "project {:<20} items {:>8}  queued {:>6}  review {:>6}  machine {:>6}  human {:>6}  failed {:>5}  machine share {}  model {}",
            p.project.name,
            p.total_items,
            p.items.get("queued").copied().unwrap_or(0),
            p.review_open + p.review_claimed,
            p.machine_labeled,
            p.human_labeled,
            p.items.get("failed").copied().unwrap_or(0),
            machine_share,
            p.active_model_version
                .map_or("none".into(), |v| format!("v{v}")),
        );
    }
    out
}

/// A share with its interval and sample size: `0.750 [0.301, 0.954] of 4`,
/// or `-` when nothing was compared.
fn agreement(a: &reviewers::Agreement) -> String {
    match (a.ratio, a.lower, a.upper) {
        (Some(ratio), Some(lower), Some(upper)) => {
            format!("{ratio:.3} [{lower:.3}, {upper:.3}] of {}", a.compared)
        }
        _ => "-".into(),
    }
}

pub fn reviewers(report: &reviewers::ReviewerFiguresReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let at = |t: &chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
    let window = report
        .since
        .map_or_else(|| "all time".to_owned(), |s| format!("since {}", at(&s)));
    let _ = writeln!(
        out,
        "reviewers of {}, {window} (as of {})",
        report.project,
        at(&report.as_of)
    );
    if report.reviewers.is_empty() {
        let _ = writeln!(out, "  nobody has labeled, skipped or undone anything");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>6} {:>6} {:>8} {:>8} {:>8} {:>6} {:>6}  {:<30} {:<30} token",
        "reviewer",
        "labels",
        "1h",
        "24h",
        "sessions",
        "active h",
        "labels/h",
        "skips",
        "undos",
        "agreement",
        "audits: agreed with model",
    );
    for r in &report.reviewers {
        let _ = writeln!(
            out,
            "{:<16} {:>7} {:>6} {:>6} {:>8} {:>8.2} {:>8} {:>6} {:>6}  {:<30} {:<30} {}",
            r.name,
            r.labels,
            r.labels_last_hour,
            r.labels_last_day,
            r.sessions,
            r.active_hours,
            r.labels_per_hour.map_or("-".into(), |p| format!("{p:.1}")),
            r.skips,
            r.undos,
            agreement(&r.agreement),
            agreement(&r.audits),
            r.token_id
                .map_or("(cli, no token)".into(), |t| t.to_string()),
        );
    }
    let gap = report.session_gap_seconds / 60;
    let _ = write!(
        out,
        "1h, 24h: labels in the last hour and day, whatever the window.\n\
         sessions: runs of labels with no pause over {gap} min; active h: the time between \
         labels within them; labels/h: the labels that continued a session per active hour.\n\
         agreement: second opinions on their labels and given by them, and reports of their \
         labels, where the other person chose the same class (neither is a random sample).\n\
         audits: their labels of audit tasks (random would-be machine labels) that chose the \
         confident model's class.\n\
         intervals: Wilson at {}.\n",
        report.confidence_level
    );
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use sieve_shared::ids::ProjectId;
    use sieve_shared::kind::TaskKind;
    use sieve_shared::messages::ModelArch;

    use super::*;
    use crate::box_settings::BoxSettings;
    use crate::policy::Policy;
    use crate::projects::Project;

    fn status_of(arch: ModelArch, kind: TaskKind, policy: Policy) -> status::ProjectStatus {
        status::ProjectStatus {
            project: Project {
                id: ProjectId::new(),
                name: "p".into(),
                class_names: vec!["tree".into()],
                policy,
                policy_version: 1,
                active_model_version_id: None,
                arch,
                task_kind: kind,
                boxes: BoxSettings {
                    tile_size: Some(256),
                    proposal_threshold: None,
                },
            },
            items: Default::default(),
            total_items: 0,
            review_open: 0,
            review_claimed: 0,
            machine_labeled: 0,
            human_labeled: 0,
            active_model_version: None,
            machine_label_accuracy: Vec::new(),
            second_opinions: Default::default(),
            reported_labels: Vec::new(),
            calibration: Some(status::CalibrationStatus {
                target_accuracy: 0.95,
                open: true,
                random_checks: 300,
                needed: 73,
                waiting: 0,
                answered_since: 0,
                sample_rate: 0.02,
            }),
            face_audits: None,
        }
    }

    #[test]
    fn a_box_project_shows_its_settings_and_box_targets() {
        let policy = Policy {
            target_accuracy: Some(0.95),
            target_recall: Some(0.99),
            ..Policy::default()
        };
        let shown = project(&status_of(ModelArch::Detector, TaskKind::Detection, policy));
        assert!(
            shown.contains("boxes: tiles of 256 px, proposed from 0.5"),
            "{shown}"
        );
        assert!(
            shown.contains("calibration to 0.950 and box recall ≥ 0.99:"),
            "{shown}"
        );
        let plain = project(&status_of(
            ModelArch::SmallCnn,
            TaskKind::Classification,
            Policy {
                target_accuracy: Some(0.95),
                ..Policy::default()
            },
        ));
        assert!(!plain.contains("boxes:"), "{plain}");
        assert!(
            plain.contains("calibration to 0.950: 300 random checks"),
            "{plain}"
        );
    }
}
