//! The demo's figures at the end of a run: every current label against the
//! ground truth, per-class true vs audited accuracy, model versions and
//! their calibration, and the effort-vs-accuracy curve.

use std::time::Instant;

use sea_orm::{EntityTrait, FromQueryResult, Statement};
use sieve_shared::messages::HoldoutMetrics;
use sieve_shared::scores::Scores;

use super::{ClassFigures, CurvePoint, DemoArgs, DemoReport, ReliabilityBin, VersionFigures};
use crate::fashion_mnist::Truth;
use sieve_scheduler::context::Context;
use sieve_scheduler::entities::model_version;
use sieve_scheduler::operate::status;
use sieve_scheduler::policy::{self, Decision, Policy};
use sieve_scheduler::projects::{self, Project};
use sieve_scheduler::routing::calibration;

/// The targets of the effort-vs-accuracy curve.
pub const CURVE_TARGETS: [f64; 3] = [0.95, 0.97, 0.99];

#[derive(FromQueryResult)]
struct FinalLabel {
    source: String,
    class_index: i32,
    label_source: String,
}

/// Right and total, as a share.
fn share(right: u64, total: u64) -> Option<f64> {
    (total > 0).then(|| right as f64 / total as f64)
}

/// Score every labeled item's current label against the ground truth (items
/// back in review after a rescore have no current label).
pub(super) async fn score(
    ctx: &Context,
    project: &Project,
    truth: &Truth,
    args: &DemoArgs,
    started: Instant,
) -> anyhow::Result<DemoReport> {
    let rows = FinalLabel::find_by_statement(Statement::from_sql_and_values(
        ctx.db.get_database_backend(),
        r#"
        SELECT DISTINCT ON (i.id) i.source, l.class_index, l.source AS label_source
        FROM items i JOIN labels l ON l.item_id = i.id
        WHERE i.project_id = $1 AND i.state IN ('auto_labeled', 'human_labeled')
        ORDER BY i.id, (l.source = 'human') DESC, l.created_at DESC
        "#,
        [project.id.as_uuid().into()],
    ))
    .all(&ctx.db)
    .await?;
    let classes = project.class_names.len();
    // (labels, right) for humans, and for machines per class.
    let mut human = (0u64, 0u64);
    let mut machine = vec![(0u64, 0u64); classes];
    for row in &rows {
        let Some(true_class) = truth.class_of(&row.source) else {
            continue;
        };
        let right = u64::from(usize::try_from(row.class_index).ok() == Some(true_class));
        let tally = if row.label_source == "human" {
            &mut human
        } else {
            match usize::try_from(row.class_index)
                .ok()
                .and_then(|c| machine.get_mut(c))
            {
                Some(tally) => tally,
                None => continue,
            }
        };
        tally.0 += 1;
        tally.1 += right;
    }
    let machine_total = machine
        .iter()
        .fold((0, 0), |acc, t| (acc.0 + t.0, acc.1 + t.1));
    let status = status::project_status(ctx, project).await?;
    let versions = sieve_scheduler::training::registry::list(ctx, project)
        .await?
        .len();
    let total = status.total_items.max(1) as f64;
    let labeled = status.machine_labeled + status.human_labeled;
    let seconds = started.elapsed().as_secs_f64();
    Ok(DemoReport {
        project: project.name.clone(),
        images: status.total_items as usize,
        rounds: args.rounds,
        human_labels: status.human_labeled,
        machine_labels: status.machine_labeled,
        still_in_review: status.items.get("in_review").copied().unwrap_or(0),
        failed: status.items.get("failed").copied().unwrap_or(0),
        // Only machine labels are effort saved: items still in review will
        // be seen by a human yet.
        effort_saved: status.machine_labeled as f64 / total,
        machine_label_accuracy: share(machine_total.1, machine_total.0),
        human_label_accuracy: share(human.1, human.0),
        target_accuracy: args.target_accuracy,
        trained_on_machine_labels: args.machine_labels,
        model_versions: versions,
        seconds,
        throughput: labeled as f64 / seconds.max(1e-9),
        per_class: project
            .class_names
            .iter()
            .zip(&machine)
            .map(|(class, &(n, right))| ClassFigures {
                class: class.clone(),
                machine_labels: n,
                true_accuracy: share(right, n),
                ..ClassFigures::default()
            })
            .collect(),
        ..DemoReport::default()
    })
}

/// Fill in what the model versions tell: holdout accuracy per version, the
/// active version's reliability bins, the audited accuracy per class, and
/// the effort-vs-accuracy curve.
pub(super) async fn model_figures(
    ctx: &Context,
    project: &Project,
    truth: &Truth,
    report: &mut DemoReport,
) -> anyhow::Result<()> {
    report.versions = sieve_scheduler::training::registry::list(ctx, project)
        .await?
        .into_iter()
        .map(|v| VersionFigures {
            version: v.version,
            holdout_accuracy: v.holdout_accuracy,
            holdout_size: v.holdout_size,
        })
        .collect();
    for measured in status::measured_accuracy(ctx, project).await? {
        let Some(figures) = report
            .per_class
            .iter_mut()
            .find(|f| measured.class.as_deref() == Some(f.class.as_str()))
        else {
            continue;
        };
        figures.audited = measured.audited;
        if measured.audited > 0 {
            figures.measured_accuracy = Some(measured.accuracy);
            figures.measured_lower = Some(measured.lower);
            figures.measured_upper = Some(measured.upper);
        }
    }
    let project = projects::get(&ctx.db, &project.id.to_string()).await?;
    let Some(active) = project.active_model_version_id else {
        return Ok(());
    };
    let metrics: HoldoutMetrics = model_version::Entity::find_by_id(active)
        .one(&ctx.db)
        .await?
        .and_then(|v| v.metrics)
        .and_then(|m| serde_json::from_value(m).ok())
        .unwrap_or_default();
    report.reliability = reliability(&metrics);
    report.curve = curve(ctx, &project, active, &metrics, truth).await?;
    Ok(())
}

/// Holdout examples in ten confidence bins: mean confidence and accuracy.
fn reliability(metrics: &HoldoutMetrics) -> Vec<ReliabilityBin> {
    let mut bins = vec![(0.0f64, 0usize, 0usize); 10];
    for e in &metrics.evaluations {
        let bin = ((e.confidence * 10.0) as usize).min(9);
        bins[bin].0 += f64::from(e.confidence);
        bins[bin].1 += 1;
        bins[bin].2 += usize::from(e.label == e.predicted);
    }
    bins.into_iter()
        .filter(|b| b.1 > 0)
        .map(|(sum, n, right)| ReliabilityBin {
            mean_confidence: sum / n as f64,
            accuracy: right as f64 / n as f64,
            count: n,
        })
        .collect()
}

#[derive(FromQueryResult)]
struct PredictionRow {
    source: String,
    top_class: i32,
    confidence: f32,
    margin: f32,
    entropy: f32,
    disagreement: f32,
    mutual_information: f32,
}

/// `version`'s predictions of the project's items without a human label.
async fn unlabeled_predictions(
    ctx: &Context,
    project: &Project,
    version: uuid::Uuid,
) -> anyhow::Result<Vec<PredictionRow>> {
    Ok(
        PredictionRow::find_by_statement(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            r#"
        SELECT i.source, p.top_class, p.confidence, p.margin, p.entropy,
               p.disagreement, p.mutual_information
        FROM items i JOIN predictions p ON p.item_id = i.id AND p.model_version_id = $2
        WHERE i.project_id = $1 AND i.state <> 'human_labeled'
        "#,
            [project.id.as_uuid().into(), version.into()],
        ))
        .all(&ctx.db)
        .await?,
    )
}

/// The share of all the project's items its active version could label by
/// machine at `target`, cut at the best place knowing the truth: its
/// predictions of the items without a human label, most confident first
/// (`crate::oracle::best_prefix`). `None` without an active version.
pub(super) async fn oracle_share(
    ctx: &Context,
    project: &Project,
    truth: &Truth,
    target: f64,
) -> anyhow::Result<Option<f64>> {
    let project = projects::get(&ctx.db, &project.name).await?;
    let Some(active) = project.active_model_version_id else {
        return Ok(None);
    };
    let rows = unlabeled_predictions(ctx, &project, active).await?;
    let total = status::project_status(ctx, &project)
        .await?
        .total_items
        .max(1) as f64;
    let mut ranked: Vec<(f32, bool)> = rows
        .iter()
        .map(|r| {
            let right = truth.class_of(&r.source) == usize::try_from(r.top_class).ok();
            (r.confidence, right)
        })
        .collect();
    let (len, _) = crate::oracle::best_prefix(&mut ranked, target);
    Ok(Some(len as f64 / total))
}

/// For each target of [`CURVE_TARGETS`]: calibrate the active version's
/// thresholds on its holdout (the same human labels the run ended with),
/// route its predictions of every item without a human label through the
/// project's policy at that target (no audits), and score the machine
/// labels it would give against the ground truth.
async fn curve(
    ctx: &Context,
    project: &Project,
    active: uuid::Uuid,
    metrics: &HoldoutMetrics,
    truth: &Truth,
) -> anyhow::Result<Vec<CurvePoint>> {
    let rows = unlabeled_predictions(ctx, project, active).await?;
    let total = status::project_status(ctx, project)
        .await?
        .total_items
        .max(1) as f64;
    let evidence = calibration::evidence(metrics);
    let classes = project.class_names.len();
    Ok(CURVE_TARGETS
        .iter()
        .map(|&target| {
            let policy = Policy {
                target_accuracy: Some(target),
                ..project.policy.clone()
            };
            let calibration = calibration::calibrate(
                &evidence,
                classes,
                target,
                policy.confidence_level,
                policy.pool_evidence,
            );
            let (mut labels, mut right) = (0u64, 0u64);
            for row in &rows {
                let scores = Scores {
                    top_class: u32::try_from(row.top_class).unwrap_or(u32::MAX),
                    confidence: row.confidence,
                    margin: row.margin,
                    entropy: row.entropy,
                    disagreement: row.disagreement,
                    mutual_information: row.mutual_information,
                };
                let threshold =
                    calibration::threshold_for(&policy, scores.top_class, Some(&calibration));
                // What the policy labels by machine, leaving out audits.
                if let Decision::MachineLabel { class_index } =
                    policy::decide(&policy, &scores, threshold, policy::Draws::NONE, 0.0)
                {
                    labels += 1;
                    right +=
                        u64::from(truth.class_of(&row.source) == usize::try_from(class_index).ok());
                }
            }
            CurvePoint {
                target_accuracy: target,
                machine_share: labels as f64 / total,
                machine_labels: labels,
                machine_label_accuracy: share(right, labels),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sieve_shared::messages::HoldoutEvaluation;

    #[test]
    fn reliability_bins_by_confidence() {
        let eval = |confidence: f32, right: bool| HoldoutEvaluation {
            label: 1,
            predicted: if right { 1 } else { 2 },
            confidence,
            random: None,
            correct: None,
            boxes: None,
        };
        let metrics = HoldoutMetrics {
            evaluations: vec![eval(0.95, true), eval(0.97, false), eval(0.35, true)],
            ..HoldoutMetrics::default()
        };
        let bins = reliability(&metrics);
        assert_eq!(bins.len(), 2);
        assert_eq!((bins[0].count, bins[0].accuracy), (1, 1.0));
        assert_eq!((bins[1].count, bins[1].accuracy), (2, 0.5));
        assert!((bins[1].mean_confidence - 0.96).abs() < 1e-6);
    }

    #[test]
    fn share_of_nothing_is_none() {
        assert_eq!(share(0, 0), None);
        assert_eq!(share(3, 4), Some(0.75));
    }
}
