//! The demo's `report.html`: the figures of `report.json` as SVG charts.

use super::{DemoReport, RoundFigures};
use crate::report::{Link, Series, html, line_chart};

pub(super) fn render(report: &DemoReport) -> anyhow::Result<String> {
    let pct = |x: f64| format!("{:.1}%", x * 100.0);
    let headline = vec![
        ("images".to_owned(), report.images.to_string()),
        (
            "human effort saved (labeled by machine)".to_owned(),
            pct(report.effort_saved),
        ),
        (
            "machine-label accuracy vs ground truth".to_owned(),
            report.machine_label_accuracy.map_or("n/a".into(), pct),
        ),
        (
            "target accuracy of the routing policy".to_owned(),
            report
                .target_accuracy
                .map_or("none (fixed threshold)".into(), pct),
        ),
        (
            "retrains learned from".to_owned(),
            if report.trained_on_machine_labels {
                "human and machine labels (self-training; holdout human only)".to_owned()
            } else {
                "human labels only".to_owned()
            },
        ),
        (
            "labeled by humans".to_owned(),
            report.human_labels.to_string(),
        ),
        (
            "still in review".to_owned(),
            report.still_in_review.to_string(),
        ),
        (
            "model versions".to_owned(),
            report.model_versions.to_string(),
        ),
        ("run time".to_owned(), format!("{:.0} s", report.seconds)),
        (
            "throughput (items labeled per second)".to_owned(),
            format!("{:.1}", report.throughput),
        ),
    ];
    let round = |f: fn(&RoundFigures) -> i64| -> Vec<(f64, f64)> {
        report
            .history
            .iter()
            .map(|r| (r.round as f64, f(r) as f64))
            .collect()
    };
    let mut captions =
        vec!["After each review round, before its retrain; the last point is the end of the run."];
    let mut charts = vec![line_chart(
        "Items by who labeled them, per round",
        "round",
        "items",
        &[
            Series {
                name: "by machine",
                points: round(|r| r.machine_labels),
            },
            Series {
                name: "by humans",
                points: round(|r| r.human_labels),
            },
            Series {
                name: "in review",
                points: round(|r| r.in_review),
            },
        ],
    )?];
    let share = |f: fn(&RoundFigures) -> Option<f64>| -> Vec<(f64, f64)> {
        report
            .history
            .iter()
            .filter_map(|r| f(r).map(|s| (r.round as f64, s)))
            .collect()
    };
    captions.push(
        "Per round: the share of items the policy labeled by machine, and the share the active model could have labeled at the same accuracy had its confidence been cut at the best place, knowing the truth (the oracle). The gap is what calibration, and the evidence it waits for, leave on the table.",
    );
    charts.push(line_chart(
        &format!(
            "Labeled by machine vs what the model allowed at {:.0}%",
            report.oracle_target * 100.0
        ),
        "round",
        "share of items",
        &[
            Series {
                name: "by the policy",
                points: share(|r| Some(r.machine_share)),
            },
            Series {
                name: "oracle (the model's ranking, cut knowing the truth)",
                points: share(|r| r.oracle_share),
            },
        ],
    )?);
    let accuracy: Vec<(f64, f64)> = report
        .versions
        .iter()
        .filter_map(|v| v.holdout_accuracy.map(|a| (f64::from(v.version), a)))
        .collect();
    if !accuracy.is_empty() {
        captions.push(
            "Each version on the holdout of its own snapshot, which grows as reviewers label the items \
             the model found hardest: later holdouts are harder, so compare versions pairwise \
             (promotion measures the champion on the candidate's holdout).",
        );
        charts.push(line_chart(
            "Holdout accuracy per model version",
            "version",
            "accuracy",
            &[Series {
                name: "holdout accuracy",
                points: accuracy,
            }],
        )?);
    }
    if !report.reliability.is_empty() {
        captions.push(
            "Holdout examples binned by the committee's confidence: points under the diagonal \
             are over-confident.",
        );
        charts.push(line_chart(
            "Reliability of the active model (holdout)",
            "mean confidence",
            "accuracy",
            &[
                Series {
                    name: "model",
                    points: report
                        .reliability
                        .iter()
                        .map(|b| (b.mean_confidence, b.accuracy))
                        .collect(),
                },
                Series {
                    name: "perfect calibration",
                    points: vec![(0.0, 0.0), (1.0, 1.0)],
                },
            ],
        )?);
    }
    let classes: Vec<(f64, &super::ClassFigures)> = report
        .per_class
        .iter()
        .enumerate()
        .map(|(i, c)| (i as f64, c))
        .collect();
    if classes.iter().any(|(_, c)| c.true_accuracy.is_some()) {
        captions.push(
            "Per class (x = class index, in the order of the project's classes): the accuracy of \
             its machine labels against the ground truth, and the accuracy sieve measured from \
             audits alone, with the lower end of its interval.",
        );
        let points = |f: fn(&super::ClassFigures) -> Option<f64>| -> Vec<(f64, f64)> {
            classes
                .iter()
                .filter_map(|(x, c)| f(c).map(|y| (*x, y)))
                .collect()
        };
        charts.push(line_chart(
            "Machine-label accuracy per class: measured (audits) vs true",
            "class",
            "accuracy",
            &[
                Series {
                    name: "true (ground truth)",
                    points: points(|c| c.true_accuracy),
                },
                Series {
                    name: "measured by audits",
                    points: points(|c| c.measured_accuracy),
                },
                Series {
                    name: "measured, lower bound",
                    points: points(|c| c.measured_lower),
                },
            ],
        )?);
    }
    if !report.curve.is_empty() {
        captions.push(
            "What the final model labels by machine at each target accuracy (calibrated on the \
             same human labels), against the ground truth; public reference points: about 53% \
             of effort saved (a labeling vendor's production figure) and up to 70% at 95% \
             accuracy or more (a cloud auto-labeling service).",
        );
        charts.push(line_chart(
            "Human effort saved vs machine-label accuracy",
            "machine-label accuracy (ground truth)",
            "share labeled by machine",
            &[
                Series {
                    name: "sieve, targets 0.95 / 0.97 / 0.99",
                    points: report
                        .curve
                        .iter()
                        .filter_map(|p| p.machine_label_accuracy.map(|a| (a, p.machine_share)))
                        .collect(),
                },
                Series {
                    name: "reference: cloud service, up to 70% at >= 95%",
                    points: vec![(0.95, 0.70)],
                },
            ],
        )?);
    }
    let throughput: Vec<(f64, f64)> = report
        .history
        .iter()
        .map(|r| (r.seconds, (r.machine_labels + r.human_labels) as f64))
        .collect();
    captions.push("Items with a label (machine or human) over the run's wall time.");
    charts.push(line_chart(
        "Throughput: labeled items over time",
        "seconds",
        "items labeled",
        &[Series {
            name: "labeled items",
            points: throughput,
        }],
    )?);
    let captioned: Vec<(String, String)> = charts
        .into_iter()
        .zip(captions)
        .map(|(svg, caption)| (svg, caption.to_owned()))
        .collect();
    let mut links = Vec::new();
    if let Some(export) = &report.export {
        links.push(Link {
            what: format!(
                "the labeled dataset: {} items, CSV, each with its label's source, labeler, confidence and audited accuracy ({})",
                export.rows, export.file
            ),
            href: export.file.clone(),
        });
    }
    links.push(Link {
        what: "these figures as JSON (report.json)".into(),
        href: "report.json".into(),
    });
    Ok(html(
        &format!("sieve-tools demo: {}", report.project),
        &headline,
        &links,
        &captioned,
    ))
}
