//! What a project looks like right now: items by state, the review backlog,
//! labels by source, the active model, audited machine-label accuracy and
//! how second opinions on human labels came out.

use std::collections::BTreeMap;

use sea_orm::{ConnectionTrait, FromQueryResult, Statement};
use serde::Serialize;

use crate::context::Context;
use crate::error::AppResult;
use crate::kind::classification;
use crate::projects::Project;
use crate::routing::calibration;
use sieve_shared::box_scores::{self, ImageScores};
use sieve_shared::boxes::LabeledBox;

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ProjectStatus {
    pub project: Project,
    pub items: BTreeMap<String, i64>,
    pub total_items: i64,
    pub review_open: i64,
    pub review_claimed: i64,
    /// Items whose current label is by a machine / a human.
    pub machine_labeled: i64,
    pub human_labeled: i64,
    pub active_model_version: Option<i32>,
    /// Accuracy of machine labels as measured by audits (human review of a
    /// random share of would-be machine labels): overall first, then per
    /// predicted class, each with its Wilson interval.
    pub machine_label_accuracy: Vec<MeasuredAccuracy>,
    /// Second opinions on labels that disagreed with a confident model.
    pub second_opinions: SecondOpinions,
    /// Labels people reported as wrong (`items::reopen`), by the reported
    /// label's source and class, and how review decided them. Kept apart
    /// from `machine_label_accuracy`: reports are not a random sample.
    pub reported_labels: Vec<ReportedLabels>,
    /// With a target accuracy and an active model: the random evidence its
    /// thresholds rest on, and what opening the gate still needs.
    pub calibration: Option<CalibrationStatus>,
    /// A deidentify project's audits: faces the auditors found in images
    /// the machine would have accepted, and how many of them its proposal
    /// missed (each a privacy leak had the image been delivered).
    pub face_audits: Option<FaceAudits>,
}

/// What a deidentify project's audits found.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FaceAudits {
    /// Audited images (would-be machine labels checked by a person).
    pub images: i64,
    /// Faces the auditors boxed in them.
    pub faces: i64,
    /// Of those, faces the machine's proposal did not box (IoU under 0.5).
    pub missed: i64,
    /// `1 − missed / faces` (1 with no faces audited yet).
    pub recall: f64,
    /// Plates (every class but `face`) the auditors boxed.
    pub plates: i64,
    /// Of those, plates the machine's proposal did not box.
    pub missed_plates: i64,
    /// Boxes the machine proposed in the audited images, faces and plates.
    pub proposed: i64,
    /// Of those, boxes matching none the auditor kept (of the same class, IoU 0.5): blurred
    /// for nothing.
    pub false_boxes: i64,
    /// `1 − false_boxes / proposed` (1 with nothing proposed yet).
    pub precision: f64,
}

/// One audited image: what the auditor boxed against what the machine proposed.
#[derive(Debug, Default, PartialEq)]
struct AuditCounts {
    faces: usize,
    missed_faces: usize,
    plates: usize,
    missed_plates: usize,
    proposed: usize,
    false_boxes: usize,
}

#[derive(FromQueryResult)]
struct FaceAuditRow {
    human: Option<serde_json::Value>,
    detections: Option<serde_json::Value>,
}

/// [`FaceAudits`] of `project`, or `None` for a project of another kind.
/// Faces are the project's first class.
pub async fn face_audits(ctx: &Context, project: &Project) -> AppResult<Option<FaceAudits>> {
    if project.task_kind != crate::kind::TaskKind::Deidentify {
        return Ok(None);
    }
    let rows = FaceAuditRow::find_by_statement(Statement::from_sql_and_values(
        ctx.db.get_database_backend(),
        r#"
        SELECT l.boxes AS human, p.detections
        FROM review_tasks t
        JOIN labels l ON l.review_task_id = t.id
        JOIN predictions p ON p.id = t.prediction_id
        WHERE t.project_id = $1 AND t.reason = 'audit' AND t.state = 'done'
        "#,
        [project.id.as_uuid().into()],
    ))
    .all(&ctx.db)
    .await?;
    let mut audits = FaceAudits::default();
    for row in rows {
        let human = row
            .human
            .as_ref()
            .and_then(crate::kind::detection::from_json)
            .unwrap_or_default();
        let proposal = row
            .detections
            .and_then(|d| serde_json::from_value::<ImageScores>(d).ok())
            .map(|d| d.labeled_boxes())
            .unwrap_or_default();
        let counts = audit_counts(&human, &proposal);
        audits.images += 1;
        audits.faces += counts.faces as i64;
        audits.missed += counts.missed_faces as i64;
        audits.plates += counts.plates as i64;
        audits.missed_plates += counts.missed_plates as i64;
        audits.proposed += counts.proposed as i64;
        audits.false_boxes += counts.false_boxes as i64;
    }
    let share_kept = |lost: i64, of: i64| {
        if of > 0 {
            1.0 - lost as f64 / of as f64
        } else {
            1.0
        }
    };
    audits.recall = share_kept(audits.missed, audits.faces);
    audits.precision = share_kept(audits.false_boxes, audits.proposed);
    Ok(Some(audits))
}

/// One audited image's counts: the faces (class 0) and plates (the other classes) in
/// `human` and how many of each no box of `proposal` of the same class matches at IoU ≥ 0.5;
/// the boxes of `proposal` and how many of them match none of `human`.
fn audit_counts(human: &[LabeledBox], proposal: &[LabeledBox]) -> AuditCounts {
    let (faces, plates): (Vec<LabeledBox>, Vec<LabeledBox>) =
        human.iter().partition(|b| b.class == 0);
    let found_faces = box_scores::matched(proposal, &faces, 0.5);
    let found_plates = box_scores::matched(proposal, &plates, 0.5);
    AuditCounts {
        faces: faces.len(),
        missed_faces: faces.len() - found_faces,
        plates: plates.len(),
        missed_plates: plates.len() - found_plates,
        proposed: proposal.len(),
        false_boxes: proposal.len() - (found_faces + found_plates),
    }
}

/// Export every deidentify project's audits as the gauges
/// `sieve_deidentify_audited_faces{project}` and
/// `sieve_deidentify_missed_faces{project}`. Called at each `/metrics`
/// scrape.
pub async fn record_face_audit_metrics(ctx: &Context) -> AppResult<()> {
    for project in crate::projects::list(&ctx.db).await? {
        if let Some(audits) = face_audits(ctx, &project).await? {
            metrics::gauge!("sieve_deidentify_audited_faces", "project" => project.name.clone())
                .set(audits.faces as f64);
            metrics::gauge!("sieve_deidentify_missed_faces", "project" => project.name.clone())
                .set(audits.missed as f64);
            metrics::gauge!("sieve_deidentify_audited_plates", "project" => project.name.clone())
                .set(audits.plates as f64);
            metrics::gauge!("sieve_deidentify_missed_plates", "project" => project.name.clone())
                .set(audits.missed_plates as f64);
            metrics::gauge!("sieve_deidentify_false_boxes", "project" => project.name.clone())
                .set(audits.false_boxes as f64);
        }
    }
    Ok(())
}

/// Where the gate to machine labels stands for the active version.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct CalibrationStatus {
    pub target_accuracy: f64,
    /// Whether some class has a threshold: machine labels can happen.
    pub open: bool,
    /// Random, human-checked examples the active version was calibrated on.
    pub random_checks: u32,
    /// The fewest random checks that can open the gate at the target (all
    /// of them right); more are needed where the model errs.
    pub needed: u32,
    /// Random checks waiting in the review queue: asked first.
    pub waiting: i64,
    /// Random checks answered since the active version was trained: the
    /// next version is calibrated on them too.
    pub answered_since: i64,
    /// The share of items routed to random checks: the audit rate, or more
    /// while the gate is shut for want of evidence.
    pub sample_rate: f64,
}

/// Random-check tasks of a project's active version: open or claimed, and
/// answered since the version's snapshot was taken. `$1` project, `$2` the
/// version.
const RANDOM_CHECKS: &str = r#"
SELECT CASE WHEN t.state IN ('open', 'claimed') THEN 'waiting' ELSE 'answered' END AS key,
       count(*) AS n
FROM review_tasks t
WHERE t.project_id = $1 AND t.reason = 'sample'
  AND (t.state IN ('open', 'claimed')
       OR (t.state = 'done' AND t.closed_at > (SELECT r.created_at FROM training_runs r
                                               WHERE r.model_version_id = $2)))
GROUP BY 1
"#;

async fn calibration_status(
    ctx: &Context,
    project: &Project,
) -> anyhow::Result<Option<CalibrationStatus>> {
    let (Some(target), Some(active)) = (
        project.policy.target_accuracy,
        project.active_model_version_id,
    ) else {
        return Ok(None);
    };
    let Some(calibration) = calibration::load(&ctx.db, active).await? else {
        return Ok(None);
    };
    let checks = counts_of(
        ctx,
        Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            RANDOM_CHECKS,
            [project.id.as_uuid().into(), active.into()],
        ),
    )
    .await?;
    Ok(Some(CalibrationStatus {
        target_accuracy: target,
        open: calibration.is_open(),
        random_checks: calibration.random_checks(),
        needed: calibration::evidence_needed(target, project.policy.confidence_level),
        waiting: checks.get("waiting").copied().unwrap_or(0),
        answered_since: checks.get("answered").copied().unwrap_or(0),
        sample_rate: calibration
            .sample_rate
            .unwrap_or(project.policy.audit_rate)
            .max(project.policy.audit_rate),
    }))
}

/// Reported labels of one source and class: still in review, confirmed by
/// the reviewer, or corrected (a different class).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, FromQueryResult, utoipa::ToSchema)]
pub struct ReportedLabels {
    /// `machine` or `import` (`human` when forced).
    pub source: String,
    #[sea_orm(skip)]
    pub class: String,
    pub class_index: i32,
    pub open: i64,
    pub confirmed: i64,
    pub corrected: i64,
}

const REPORTED_LABELS: &str = r#"
SELECT reported_source AS source, reported_class AS class_index,
       count(*) FILTER (WHERE outcome IS NULL) AS open,
       count(*) FILTER (WHERE outcome = 'confirmed') AS confirmed,
       count(*) FILTER (WHERE outcome = 'corrected') AS corrected
FROM reports WHERE project_id = $1
GROUP BY reported_source, reported_class ORDER BY reported_source, reported_class
"#;

/// [`ReportedLabels`] of `project`.
pub async fn reported_labels(
    db: &impl ConnectionTrait,
    project: &Project,
) -> AppResult<Vec<ReportedLabels>> {
    let mut rows = ReportedLabels::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        REPORTED_LABELS,
        [project.id.as_uuid().into()],
    ))
    .all(db)
    .await?;
    for r in &mut rows {
        r.class = classification::class_name(&project.class_names, r.class_index)
            .unwrap_or_default()
            .to_owned();
    }
    Ok(rows)
}

/// Second opinions (label-error checks, `review::submit`): still open, and
/// decided by whom the second reviewer agreed with. The first reviewer and
/// the model always disagree, so the second can side with one of them at
/// most.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SecondOpinions {
    pub open: i64,
    pub agreed_with_first: i64,
    pub agreed_with_model: i64,
    pub neither: i64,
}

impl SecondOpinions {
    /// The outcome names, as stored and as the `outcome` label of
    /// `sieve_review_second_opinions`; `open` for the undecided.
    pub const OUTCOMES: [&str; 4] = ["open", "agreed_with_first", "agreed_with_model", "neither"];

    fn from_counts(counts: &BTreeMap<String, i64>) -> Self {
        let n = |key: &str| counts.get(key).copied().unwrap_or(0);
        Self {
            open: n("open"),
            agreed_with_first: n("agreed_with_first"),
            agreed_with_model: n("agreed_with_model"),
            neither: n("neither"),
        }
    }

    fn get(&self, outcome: &str) -> i64 {
        match outcome {
            "open" => self.open,
            "agreed_with_first" => self.agreed_with_first,
            "agreed_with_model" => self.agreed_with_model,
            _ => self.neither,
        }
    }
}

/// Counted from the `second_opinions` table, so every scheduler process
/// reports the same figures.
const SECOND_OPINION_COUNTS: &str = "SELECT COALESCE(outcome, 'open') AS key, count(*) AS n \
     FROM second_opinions WHERE project_id = $1 GROUP BY 1";

/// Export every project's second-opinion counts as the gauge
/// `sieve_review_second_opinions{project,outcome}` (`outcome`: one of
/// [`SecondOpinions::OUTCOMES`]). Called at each `/metrics` scrape.
pub async fn record_second_opinion_metrics(ctx: &Context) -> AppResult<()> {
    for project in crate::projects::list(&ctx.db).await? {
        let counted =
            SecondOpinions::from_counts(&counts(ctx, SECOND_OPINION_COUNTS, &project).await?);
        for outcome in SecondOpinions::OUTCOMES {
            metrics::gauge!(
                "sieve_review_second_opinions",
                "project" => project.name.clone(),
                "outcome" => outcome
            )
            .set(counted.get(outcome) as f64);
        }
    }
    Ok(())
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct MeasuredAccuracy {
    /// `None` for the overall figure.
    pub class: Option<String>,
    pub audited: i64,
    pub correct: i64,
    pub accuracy: f64,
    pub lower: f64,
    pub upper: f64,
}

#[derive(FromQueryResult)]
struct AuditRow {
    class: i32,
    n: i64,
    k: i64,
}

/// Machine-label accuracy from completed audits.
pub async fn measured_accuracy(
    ctx: &Context,
    project: &Project,
) -> AppResult<Vec<MeasuredAccuracy>> {
    measured_accuracy_on(&ctx.db, project).await
}

/// [`measured_accuracy`] read through `db`: a transaction's snapshot (an
/// export's) as well as the pool.
pub async fn measured_accuracy_on(
    db: &impl ConnectionTrait,
    project: &Project,
) -> AppResult<Vec<MeasuredAccuracy>> {
    let rows = AuditRow::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        r#"
        SELECT p.top_class AS class, count(*) AS n,
               sum(CASE WHEN l.class_index = p.top_class THEN 1 ELSE 0 END)::bigint AS k
        FROM review_tasks t
        JOIN labels l ON l.review_task_id = t.id
        JOIN predictions p ON p.id = t.prediction_id
        WHERE t.project_id = $1 AND t.reason = 'audit' AND t.state = 'done'
        GROUP BY p.top_class ORDER BY p.top_class
        "#,
        [project.id.as_uuid().into()],
    ))
    .all(db)
    .await?;
    let z = calibration::z_for(project.policy.confidence_level);
    let measure = |class: Option<String>, n: i64, k: i64| {
        let (lower, upper) = calibration::wilson(k as u64, n as u64, z);
        MeasuredAccuracy {
            class,
            audited: n,
            correct: k,
            accuracy: if n > 0 { k as f64 / n as f64 } else { 0.0 },
            lower,
            upper,
        }
    };
    let (n, k) = rows.iter().fold((0, 0), |(n, k), r| (n + r.n, k + r.k));
    let mut out = Vec::with_capacity(rows.len() + 1);
    if n > 0 {
        out.push(measure(None, n, k));
    }
    for r in rows {
        let name = classification::class_name(&project.class_names, r.class).map(str::to_owned);
        out.push(measure(name, r.n, r.k));
    }
    Ok(out)
}

/// Export every project's audited machine-label accuracy as gauges:
/// `sieve_machine_label_accuracy{project,class}` with `_lower` / `_upper`
/// (the Wilson interval at the policy's confidence level) and
/// `sieve_machine_label_audits{project,class}`; the overall figures as
/// `sieve_machine_label_accuracy_overall` (`_lower`, `_upper`) and
/// `sieve_machine_label_audits_overall`, with no class label (so a sum over
/// classes never counts them twice). Called at each `/metrics` scrape.
pub async fn record_accuracy_metrics(ctx: &Context) -> AppResult<()> {
    for project in crate::projects::list(&ctx.db).await? {
        for m in measured_accuracy(ctx, &project).await? {
            let (suffix, mut labels) = match m.class {
                None => ("_overall", Vec::new()),
                Some(class) => ("", vec![("class", class)]),
            };
            labels.push(("project", project.name.clone()));
            let set = |name: &str, bound: &str, value: f64| {
                let labels: Vec<metrics::Label> = labels
                    .iter()
                    .map(|(k, v)| metrics::Label::new(*k, v.clone()))
                    .collect();
                metrics::gauge!(format!("sieve_machine_label_{name}{suffix}{bound}"), labels)
                    .set(value);
            };
            set("accuracy", "", m.accuracy);
            set("accuracy", "_lower", m.lower);
            set("accuracy", "_upper", m.upper);
            set("audits", "", m.audited as f64);
        }
    }
    Ok(())
}

#[derive(FromQueryResult)]
struct Count {
    key: String,
    n: i64,
}

async fn counts(ctx: &Context, sql: &str, project: &Project) -> AppResult<BTreeMap<String, i64>> {
    Ok(counts_of(
        ctx,
        Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            sql,
            [project.id.as_uuid().into()],
        ),
    )
    .await?)
}

/// `key`, `n` rows of `statement` as a map.
async fn counts_of(ctx: &Context, statement: Statement) -> anyhow::Result<BTreeMap<String, i64>> {
    let rows = Count::find_by_statement(statement).all(&ctx.db).await?;
    Ok(rows.into_iter().map(|c| (c.key, c.n)).collect())
}

pub async fn project_status(ctx: &Context, project: &Project) -> AppResult<ProjectStatus> {
    let items = counts(
        ctx,
        "SELECT state AS key, count(*) AS n FROM items WHERE project_id = $1 GROUP BY state",
        project,
    )
    .await?;
    let tasks = counts(
        ctx,
        "SELECT state AS key, count(*) AS n FROM review_tasks WHERE project_id = $1 GROUP BY state",
        project,
    )
    .await?;
    let versions = counts(
        ctx,
        "SELECT 'active' AS key, version::bigint AS n FROM model_versions WHERE project_id = $1 AND status = 'active'",
        project,
    )
    .await?;
    Ok(ProjectStatus {
        project: project.clone(),
        total_items: items.values().sum(),
        machine_labeled: items.get("auto_labeled").copied().unwrap_or(0),
        human_labeled: items.get("human_labeled").copied().unwrap_or(0),
        items,
        review_open: tasks.get("open").copied().unwrap_or(0),
        review_claimed: tasks.get("claimed").copied().unwrap_or(0),
        active_model_version: versions.get("active").map(|&v| v as i32),
        machine_label_accuracy: measured_accuracy(ctx, project).await?,
        second_opinions: SecondOpinions::from_counts(
            &counts(ctx, SECOND_OPINION_COUNTS, project).await?,
        ),
        reported_labels: reported_labels(&ctx.db, project).await?,
        calibration: calibration_status(ctx, project).await?,
        face_audits: face_audits(ctx, project).await?,
    })
}

/// One queue as operators see it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct QueueStatus {
    pub name: String,
    pub ready: u64,
    /// Delivered, not yet acknowledged (management API only).
    pub unacked: Option<u64>,
    pub consumers: u64,
    /// Messages per second (management API only).
    pub publish_rate: Option<f64>,
    pub deliver_rate: Option<f64>,
}

/// The whole deployment at a glance.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct FleetStatus {
    pub queues: Vec<QueueStatus>,
    /// Where queue figures came from: `management` or `passive declare`.
    pub queue_source: String,
    pub workers_alive: usize,
    pub workers_lost: usize,
    /// Why workers could not be counted (Redis unreachable), if so.
    pub workers_error: Option<String>,
    pub projects: Vec<ProjectStatus>,
}

async fn queue_via_management(
    http: &reqwest::Client,
    base: &str,
    name: &str,
) -> anyhow::Result<QueueStatus> {
    let mut url = reqwest::Url::parse(&format!(
        "{}/api/queues/%2f/{name}",
        base.trim_end_matches('/')
    ))?;
    // Credentials in the URL become a basic-auth header, not part of the path.
    let user = url.username().to_owned();
    let password = url.password().map(str::to_owned);
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let mut request = http.get(url).timeout(std::time::Duration::from_secs(5));
    if !user.is_empty() {
        request = request.basic_auth(user, password);
    }
    let body: serde_json::Value = request.send().await?.error_for_status()?.json().await?;
    let rate = |path: &str| body.pointer(path).and_then(serde_json::Value::as_f64);
    Ok(QueueStatus {
        name: name.to_owned(),
        ready: body["messages_ready"].as_u64().unwrap_or(0),
        unacked: body["messages_unacknowledged"].as_u64(),
        consumers: body["consumers"].as_u64().unwrap_or(0),
        publish_rate: rate("/message_stats/publish_details/rate"),
        deliver_rate: rate("/message_stats/deliver_get_details/rate"),
    })
}

/// The work queues and the dead-letter queue one by one, then the delay
/// queues (jobs waiting to be retried) summed into one line.
async fn queues(ctx: &Context) -> anyhow::Result<(Vec<QueueStatus>, String)> {
    let topology = ctx.topology();
    let mut names = topology.work_queues().to_vec();
    names.push(topology.dead_queue());
    let retry_queues = topology.retry_queues();
    let retry_name = format!("{}.*", topology.retry_queue_prefix());
    if let Some(base) = &ctx.settings.broker.management_url {
        let http = reqwest::Client::new();
        let mut out = Vec::new();
        let mut failed = false;
        for name in names.iter().chain(&retry_queues) {
            match queue_via_management(&http, base, name).await {
                Ok(q) => out.push(q),
                Err(err) => {
                    tracing::warn!(error = %err, "management API unavailable; falling back to passive declares");
                    failed = true;
                    break;
                }
            }
        }
        if !failed {
            for q in &out {
                metrics::gauge!("sieve_queue_ready_messages", "queue" => q.name.clone())
                    .set(q.ready as f64);
            }
            let retries = out.split_off(names.len());
            if !retries.is_empty() {
                out.push(sum_queues(retry_name, &retries));
            }
            return Ok((out, "management".into()));
        }
    }
    let mut out = Vec::new();
    for name in names.into_iter().chain(retry_queues.iter().cloned()) {
        let (ready, consumers) = sieve_shared::broker::queue_counts(&ctx.connection, &name).await?;
        metrics::gauge!("sieve_queue_ready_messages", "queue" => name.clone())
            .set(f64::from(ready));
        out.push(QueueStatus {
            name,
            ready: u64::from(ready),
            unacked: None,
            consumers: u64::from(consumers),
            publish_rate: None,
            deliver_rate: None,
        });
    }
    let retries = out.split_off(out.len() - retry_queues.len());
    if !retries.is_empty() {
        out.push(sum_queues(retry_name, &retries));
    }
    let source = if ctx.settings.broker.management_url.is_some() {
        "passive declare (the management API did not answer; ready counts only)"
    } else {
        "passive declare (set broker.management_url for unacked counts and rates)"
    };
    Ok((out, source.into()))
}

/// Several queues as one line (the delay queues: what waits to be retried).
fn sum_queues(name: String, queues: &[QueueStatus]) -> QueueStatus {
    // A queue without traffic has no rates yet: sum what is known.
    let sum = |f: fn(&QueueStatus) -> Option<f64>| -> Option<f64> {
        let known: Vec<f64> = queues.iter().filter_map(f).collect();
        (!known.is_empty()).then(|| known.iter().sum())
    };
    QueueStatus {
        name,
        ready: queues.iter().map(|q| q.ready).sum(),
        unacked: sum(|q| q.unacked.map(|n| n as f64)).map(|n| n as u64),
        consumers: queues.iter().map(|q| q.consumers).sum(),
        publish_rate: sum(|q| q.publish_rate),
        deliver_rate: sum(|q| q.deliver_rate),
    }
}

pub async fn fleet_status(ctx: &Context) -> anyhow::Result<FleetStatus> {
    let (queues, queue_source) = queues(ctx).await?;
    let (workers_alive, workers_lost, workers_error) =
        match crate::operate::workers::list(&ctx.settings.redis).await {
            Ok(w) => (
                w.iter().filter(|w| !w.lost).count(),
                w.iter().filter(|w| w.lost).count(),
                None,
            ),
            Err(err) => (0, 0, Some(format!("{err:#}"))),
        };
    let mut projects = Vec::new();
    for project in crate::projects::list(&ctx.db).await? {
        projects.push(project_status(ctx, &project).await?);
    }
    Ok(FleetStatus {
        queues,
        queue_source,
        workers_alive,
        workers_lost,
        workers_error,
        projects,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn b(class: u32, x: f32) -> LabeledBox {
        LabeledBox {
            class,
            x_min: x,
            y_min: 0.0,
            x_max: x + 10.0,
            y_max: 10.0,
        }
    }

    #[test]
    fn a_face_the_auditor_boxed_and_the_proposal_did_not_is_a_miss() {
        // Two faces and a plate boxed; the proposal has one face, nearly in place, and a
        // face where there is none.
        let human = [b(0, 0.0), b(0, 50.0), b(1, 100.0)];
        let proposal = [b(0, 1.0), b(0, 200.0)];
        assert_eq!(
            audit_counts(&human, &proposal),
            AuditCounts {
                faces: 2,
                missed_faces: 1,
                plates: 1,
                missed_plates: 1,
                proposed: 2,
                false_boxes: 1,
            }
        );
        // A plate boxed as a plate is found; boxed as a face, it is a false face and a
        // missed plate.
        let plate = [b(1, 100.0)];
        assert_eq!(
            audit_counts(&human, &plate),
            AuditCounts {
                faces: 2,
                missed_faces: 2,
                plates: 1,
                missed_plates: 0,
                proposed: 1,
                false_boxes: 0,
            }
        );
        let as_face = [b(0, 100.0)];
        let counts = audit_counts(&plate, &as_face);
        assert_eq!((counts.missed_plates, counts.false_boxes), (1, 1));
        let nothing = audit_counts(&human, &[]);
        assert_eq!((nothing.missed_faces, nothing.missed_plates), (2, 1));
        assert_eq!(audit_counts(&[], &proposal).false_boxes, 2);
    }
}
