//! Per-reviewer figures of a project: how much each person labeled, at what
//! pace, how often they skipped or undid, and how often their labels agreed
//! when something else judged the same item (`sieve reviewers -p P`,
//! `GET /api/v1/projects/{p}/reviewers`, the `sieve_reviewer_*` gauges).
//!
//! A reviewer is an API token, told apart by its id (two tokens may share a
//! name), shown by the name labels record. Labels given from the CLI have no
//! token: they are grouped by the name they were given under.
//!
//! Everything is read from the database (labels, their review tasks,
//! `second_opinions`, `reports`, `review_events`) in one read-only snapshot,
//! so every scheduler process reports the same figures and `/metrics` can
//! recompute them at each scrape. What each figure means:
//!
//! - **labels**: human labels the reviewer submitted that still stand (an
//!   undone submit is not a label; it counts as an undo).
//! - **pace**: a label that came less than [`SESSION_GAP`] after the same
//!   reviewer's previous label continues a session and adds that gap to
//!   their *active time*; a longer gap is a break and the label starts a new
//!   session. `labels_per_hour` is the labels that continued a session
//!   divided by the active time: labels per hour while working, breaks left
//!   out. The first label of each session has no measured time, so it is
//!   not in the rate (a lone label gives no rate at all).
//! - **skips, undos**: rows of `review_events`, kept since that table
//!   exists (migration `m20261208_000021_review_events`).
//! - **agreement**: every decided comparison of one of the reviewer's labels
//!   with another person's label of the same item: second opinions where
//!   they gave the checked label (agreed: the second reviewer chose the
//!   same class) or the second opinion (agreed: they chose the first
//!   reviewer's class), and labels of theirs that were reported as wrong
//!   (`items::reopen`) and decided by a review (agreed: confirmed). Neither
//!   is a random sample (a second opinion is only asked where a label went
//!   against a confident model, a report where someone saw a mistake), so
//!   read it beside its sample size, `compared`.
//! - **audits**: the reviewer's labels of audit tasks (a random share of
//!   would-be machine labels), and how many chose the confident model's
//!   class: random items, so reviewers can be compared on it, but the model
//!   is not the truth.
//!
//! Rates come with a Wilson interval at the project's confidence level
//! (`calibration::wilson`, as for audited machine-label accuracy).

use std::collections::BTreeMap;

use chrono::{DateTime, FixedOffset, Utc};
use sea_orm::{
    AccessMode, DatabaseConnection, DbBackend, FromQueryResult, IsolationLevel, Statement,
    TransactionTrait, Value,
};
use serde::Serialize;
use uuid::Uuid;

use crate::context::Context;
use crate::error::{AppError, AppResult};
use crate::projects::Project;
use crate::routing::calibration;

/// The longest pause between two labels that still counts as working: a
/// longer one is a break, and the next label starts a new session.
pub const SESSION_GAP: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Per-reviewer figures of one project (the answer of
/// `GET /api/v1/projects/{p}/reviewers` and `sieve reviewers --json`).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ReviewerFiguresReport {
    pub project: String,
    /// Figures count what happened from this instant on (`None`: all
    /// time). `labels_last_hour` and `labels_last_day` always count back
    /// from `as_of`, whatever the window.
    pub since: Option<DateTime<Utc>>,
    /// When the figures were read.
    pub as_of: DateTime<Utc>,
    /// The pause that ends a session (see `labels_per_hour`).
    pub session_gap_seconds: u64,
    /// The confidence level of every Wilson interval (the project's policy).
    pub confidence_level: f64,
    /// Most labels first.
    pub reviewers: Vec<ReviewerFigures>,
}

/// One reviewer's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ReviewerFigures {
    /// The reviewer's API token; `None` for what was done from the CLI
    /// (no token: grouped by `name`).
    pub token_id: Option<Uuid>,
    pub name: String,
    /// Human labels submitted in the window that still stand.
    pub labels: i64,
    pub labels_last_hour: i64,
    pub labels_last_day: i64,
    pub first_label_at: Option<DateTime<Utc>>,
    pub last_label_at: Option<DateTime<Utc>>,
    /// Runs of labels with no pause longer than the session gap.
    pub sessions: i64,
    /// The time between labels within sessions, in hours.
    pub active_hours: f64,
    /// Labels that continued a session per active hour; `None` without
    /// any (every label alone in its session).
    pub labels_per_hour: Option<f64>,
    pub skips: i64,
    pub undos: i64,
    /// Decided comparisons with another person's label of the same item.
    pub agreement: Agreement,
    /// Audit tasks labeled, and how many agreed with the confident model.
    pub audits: Agreement,
    pub second_opinions: SecondOpinionFigures,
    /// This reviewer's labels reported as wrong (`items::reopen`, forced).
    pub reports: ReportFigures,
}

/// How many were compared, how many agreed, and the share with its Wilson
/// interval (`None` when nothing was compared).
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Agreement {
    pub compared: i64,
    pub agreed: i64,
    pub ratio: Option<f64>,
    pub lower: Option<f64>,
    pub upper: Option<f64>,
}

impl Agreement {
    /// `agreed` of `compared`, with the interval at `z`.
    pub fn of(agreed: i64, compared: i64, z: f64) -> Self {
        if compared <= 0 {
            return Self::default();
        }
        let (lower, upper) = calibration::wilson(agreed.max(0) as u64, compared as u64, z);
        Self {
            compared,
            agreed,
            ratio: Some(agreed as f64 / compared as f64),
            lower: Some(lower),
            upper: Some(upper),
        }
    }
}

/// Second opinions this reviewer took part in (`review::submit`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SecondOpinionFigures {
    /// Checks of this reviewer's labels not decided yet.
    pub checked_open: i64,
    /// Checks of this reviewer's labels where the second reviewer chose the
    /// same class, the model's, or a third one.
    pub checked_upheld: i64,
    pub checked_sided_with_model: i64,
    pub checked_neither: i64,
    /// Checks this reviewer gave: siding with the first reviewer, with the
    /// model, or with neither.
    pub given_agreed_with_first: i64,
    pub given_agreed_with_model: i64,
    pub given_neither: i64,
}

impl SecondOpinionFigures {
    /// Decided comparisons with the other reviewer, and those that agreed.
    fn compared_and_agreed(&self) -> (i64, i64) {
        let compared = self.checked_upheld
            + self.checked_sided_with_model
            + self.checked_neither
            + self.given_agreed_with_first
            + self.given_agreed_with_model
            + self.given_neither;
        (compared, self.checked_upheld + self.given_agreed_with_first)
    }
}

/// Reports of this reviewer's labels: still in review, confirmed, corrected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReportFigures {
    pub open: i64,
    pub confirmed: i64,
    pub corrected: i64,
}

/// Labels per reviewer. The window function runs on the window's labels
/// only (it is partitioned by `in_window` too), so a session never reaches
/// back before `since`. Tasks are found by `closed_at`, which a submit sets
/// to its label's `created_at` (index `review_tasks_done`). `$1` project,
/// `$2` since (NULL: all time), `$3` now, `$4` the session gap in seconds.
const LABELS: &str = r#"
SELECT token, name,
       count(*) FILTER (WHERE in_window) AS labels,
       count(*) FILTER (WHERE created_at >= $3::timestamptz - interval '1 hour') AS last_hour,
       count(*) FILTER (WHERE created_at >= $3::timestamptz - interval '1 day') AS last_day,
       min(created_at) FILTER (WHERE in_window) AS first_at,
       max(created_at) FILTER (WHERE in_window) AS last_at,
       count(*) FILTER (WHERE in_window AND gap <= $4) AS paced,
       COALESCE(sum(gap) FILTER (WHERE in_window AND gap <= $4), 0)::float8 AS active_seconds,
       count(*) FILTER (WHERE in_window AND reason = 'audit' AND top_class IS NOT NULL) AS audits,
       count(*) FILTER (WHERE in_window AND reason = 'audit' AND class_index = top_class)
           AS audits_agreed
FROM (
    SELECT t.lease_holder_token AS token, l.reviewer AS name, l.created_at, l.class_index,
           t.reason, p.top_class, w.in_window,
           EXTRACT(EPOCH FROM l.created_at - lag(l.created_at) OVER (
               PARTITION BY t.lease_holder_token, l.reviewer, w.in_window
               ORDER BY l.created_at, l.id))::float8 AS gap
    FROM review_tasks t
    JOIN labels l ON l.review_task_id = t.id AND l.source = 'human'
    LEFT JOIN predictions p ON p.id = t.prediction_id
    CROSS JOIN LATERAL (
        SELECT $2::timestamptz IS NULL OR l.created_at >= $2::timestamptz AS in_window
    ) w
    WHERE t.project_id = $1 AND t.state = 'done' AND l.reviewer IS NOT NULL
      AND ($2::timestamptz IS NULL
           OR t.closed_at >= LEAST($2::timestamptz, $3::timestamptz - interval '1 day'))
) labeled
GROUP BY token, name
"#;

#[derive(FromQueryResult)]
struct LabelRow {
    token: Option<Uuid>,
    name: String,
    labels: i64,
    last_hour: i64,
    last_day: i64,
    first_at: Option<DateTime<FixedOffset>>,
    last_at: Option<DateTime<FixedOffset>>,
    paced: i64,
    active_seconds: f64,
    audits: i64,
    audits_agreed: i64,
}

/// Second opinions by the reviewers on each side: the first reviewer (the
/// token that submitted the checked label) and the second (the token that
/// closed the second-opinion task). Open checks count for the first
/// reviewer only; a decided one falls in the window by when it was decided,
/// an open one by when it was asked. `$1` project, `$2` since.
const SECOND_OPINIONS: &str = r#"
SELECT who.token, who.name,
       count(*) FILTER (WHERE who.side = 'first' AND so.outcome IS NULL) AS checked_open,
       count(*) FILTER (WHERE who.side = 'first' AND so.outcome = 'agreed_with_first')
           AS checked_upheld,
       count(*) FILTER (WHERE who.side = 'first' AND so.outcome = 'agreed_with_model')
           AS checked_sided_with_model,
       count(*) FILTER (WHERE who.side = 'first' AND so.outcome = 'neither') AS checked_neither,
       count(*) FILTER (WHERE who.side = 'second' AND so.outcome = 'agreed_with_first')
           AS given_agreed_with_first,
       count(*) FILTER (WHERE who.side = 'second' AND so.outcome = 'agreed_with_model')
           AS given_agreed_with_model,
       count(*) FILTER (WHERE who.side = 'second' AND so.outcome = 'neither') AS given_neither
FROM second_opinions so
LEFT JOIN labels fl ON fl.id = so.first_label_id
LEFT JOIN review_tasks ft ON ft.id = fl.review_task_id
JOIN review_tasks st ON st.id = so.task_id
CROSS JOIN LATERAL (VALUES
    ('first', ft.lease_holder_token, so.first_reviewer),
    ('second', CASE WHEN so.outcome IS NOT NULL THEN st.lease_holder_token END,
     so.second_reviewer)
) who (side, token, name)
WHERE so.project_id = $1 AND who.name IS NOT NULL
  AND (who.side = 'first' OR so.outcome IS NOT NULL)
  AND ($2::timestamptz IS NULL OR COALESCE(so.decided_at, so.created_at) >= $2::timestamptz)
GROUP BY who.token, who.name
"#;

#[derive(FromQueryResult)]
struct SecondOpinionRow {
    token: Option<Uuid>,
    name: String,
    checked_open: i64,
    checked_upheld: i64,
    checked_sided_with_model: i64,
    checked_neither: i64,
    given_agreed_with_first: i64,
    given_agreed_with_model: i64,
    given_neither: i64,
}

/// Reports of human labels, by the label's author. `$1` project, `$2`
/// since.
const REPORTS: &str = r#"
SELECT rt.lease_holder_token AS token, rl.reviewer AS name,
       count(*) FILTER (WHERE r.outcome IS NULL) AS open,
       count(*) FILTER (WHERE r.outcome = 'confirmed') AS confirmed,
       count(*) FILTER (WHERE r.outcome = 'corrected') AS corrected
FROM reports r
JOIN labels rl ON rl.id = r.reported_label_id
LEFT JOIN review_tasks rt ON rt.id = rl.review_task_id
WHERE r.project_id = $1 AND rl.source = 'human' AND rl.reviewer IS NOT NULL
  AND ($2::timestamptz IS NULL OR COALESCE(r.decided_at, r.created_at) >= $2::timestamptz)
GROUP BY rt.lease_holder_token, rl.reviewer
"#;

#[derive(FromQueryResult)]
struct ReportRow {
    token: Option<Uuid>,
    name: String,
    open: i64,
    confirmed: i64,
    corrected: i64,
}

/// Skips and undos. `$1` project, `$2` since.
const EVENTS: &str = r#"
SELECT reviewer_token AS token, reviewer AS name,
       count(*) FILTER (WHERE kind = 'skip') AS skips,
       count(*) FILTER (WHERE kind = 'undo') AS undos
FROM review_events
WHERE project_id = $1 AND ($2::timestamptz IS NULL OR created_at >= $2::timestamptz)
GROUP BY reviewer_token, reviewer
"#;

#[derive(FromQueryResult)]
struct EventRow {
    token: Option<Uuid>,
    name: String,
    skips: i64,
    undos: i64,
}

/// Where a figure from before `now` starts: `raw` is a duration back from
/// `now` (`90m`, `24h`, `7d`) or an RFC 3339 instant.
pub fn parse_since(raw: &str, now: DateTime<Utc>) -> AppResult<DateTime<Utc>> {
    let raw = raw.trim();
    if let Ok(back) = humantime::parse_duration(raw) {
        let back = chrono::Duration::from_std(back)
            .map_err(|_| AppError::Invalid(format!("since {raw:?} is too long ago")))?;
        return now
            .checked_sub_signed(back)
            .ok_or_else(|| AppError::Invalid(format!("since {raw:?} is too long ago")));
    }
    DateTime::parse_from_rfc3339(raw)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|_| {
            AppError::Invalid(format!(
                "since {raw:?} is neither a duration (90m, 24h, 7d) nor an RFC 3339 instant \
                 (2026-12-01T00:00:00Z)"
            ))
        })
}

/// One reviewer's key: token id, then name.
type Who = (Option<Uuid>, String);

fn utc(at: Option<DateTime<FixedOffset>>) -> Option<DateTime<Utc>> {
    at.map(|at| at.with_timezone(&Utc))
}

/// The figures of every reviewer of `project` who did anything counted
/// from `since` on (every one ever, with `None`).
pub async fn reviewer_figures(
    db: &DatabaseConnection,
    project: &Project,
    since: Option<DateTime<Utc>>,
) -> AppResult<ReviewerFiguresReport> {
    let now = Utc::now();
    let txn = db
        .begin_with_config(
            Some(IsolationLevel::RepeatableRead),
            Some(AccessMode::ReadOnly),
        )
        .await?;
    let id: Value = project.id.as_uuid().into();
    let since_value: Value = since.map(|s| s.fixed_offset()).into();
    let statement = |sql: &str, values: Vec<Value>| {
        Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
    };
    let window = vec![id.clone(), since_value.clone()];
    let labels = LabelRow::find_by_statement(statement(
        LABELS,
        vec![
            id.clone(),
            since_value.clone(),
            now.fixed_offset().into(),
            SESSION_GAP.as_secs_f64().into(),
        ],
    ))
    .all(&txn)
    .await?;
    let opinions = SecondOpinionRow::find_by_statement(statement(SECOND_OPINIONS, window.clone()))
        .all(&txn)
        .await?;
    let reports = ReportRow::find_by_statement(statement(REPORTS, window.clone()))
        .all(&txn)
        .await?;
    let events = EventRow::find_by_statement(statement(EVENTS, window))
        .all(&txn)
        .await?;
    txn.commit().await?;

    let mut by: BTreeMap<Who, ReviewerFigures> = BTreeMap::new();
    let z = calibration::z_for(project.policy.confidence_level);
    for r in labels {
        let f = figures(&mut by, r.token, r.name);
        f.labels = r.labels;
        f.labels_last_hour = r.last_hour;
        f.labels_last_day = r.last_day;
        f.first_label_at = utc(r.first_at);
        f.last_label_at = utc(r.last_at);
        f.sessions = r.labels - r.paced;
        f.active_hours = r.active_seconds / 3600.0;
        f.labels_per_hour =
            (r.paced > 0 && r.active_seconds > 0.0).then(|| r.paced as f64 / f.active_hours);
        f.audits = Agreement::of(r.audits_agreed, r.audits, z);
    }
    for r in opinions {
        figures(&mut by, r.token, r.name).second_opinions = SecondOpinionFigures {
            checked_open: r.checked_open,
            checked_upheld: r.checked_upheld,
            checked_sided_with_model: r.checked_sided_with_model,
            checked_neither: r.checked_neither,
            given_agreed_with_first: r.given_agreed_with_first,
            given_agreed_with_model: r.given_agreed_with_model,
            given_neither: r.given_neither,
        };
    }
    for r in reports {
        figures(&mut by, r.token, r.name).reports = ReportFigures {
            open: r.open,
            confirmed: r.confirmed,
            corrected: r.corrected,
        };
    }
    for r in events {
        let f = figures(&mut by, r.token, r.name);
        f.skips = r.skips;
        f.undos = r.undos;
    }

    let mut reviewers: Vec<ReviewerFigures> = by
        .into_values()
        .map(|mut f| {
            let (compared, agreed) = f.second_opinions.compared_and_agreed();
            f.agreement = Agreement::of(
                agreed + f.reports.confirmed,
                compared + f.reports.confirmed + f.reports.corrected,
                z,
            );
            f
        })
        .collect();
    reviewers.sort_by(|a, b| {
        b.labels
            .cmp(&a.labels)
            .then_with(|| a.name.cmp(&b.name))
            .then_with(|| a.token_id.cmp(&b.token_id))
    });
    Ok(ReviewerFiguresReport {
        project: project.name.clone(),
        since,
        as_of: now,
        session_gap_seconds: SESSION_GAP.as_secs(),
        confidence_level: project.policy.confidence_level,
        reviewers,
    })
}

fn figures(
    by: &mut BTreeMap<Who, ReviewerFigures>,
    token: Option<Uuid>,
    name: String,
) -> &mut ReviewerFigures {
    by.entry((token, name.clone()))
        .or_insert_with(|| ReviewerFigures {
            token_id: token,
            name,
            ..ReviewerFigures::default()
        })
}

/// The `reviewer` label of a reviewer's gauges: the token id, or `cli` for
/// what was done without a token (the `name` label tells those apart).
pub fn metric_reviewer(figures: &ReviewerFigures) -> String {
    figures
        .token_id
        .map_or_else(|| "cli".to_owned(), |id| id.to_string())
}

/// Export every project's all-time reviewer figures as gauges labeled
/// `{project, reviewer, name}` (`reviewer`: [`metric_reviewer`]):
/// `sieve_reviewer_labels_total`, `sieve_reviewer_skips_total`,
/// `sieve_reviewer_undos_total`, `sieve_reviewer_labels_per_hour` (once
/// there is a pace), `sieve_reviewer_agreement_ratio` with its sample size
/// `sieve_reviewer_agreement_compared`, and
/// `sieve_reviewer_audit_agreement_ratio` with `sieve_reviewer_audits`
/// (ratios once something was compared). All time, not a window: a gauge
/// once exported stays in this process's registry, so a windowed figure
/// would go stale instead of disappearing. One series set per reviewer who
/// ever acted in a project: bounded by the API tokens. Called at each
/// `/metrics` scrape.
pub async fn record_reviewer_metrics(ctx: &Context) -> AppResult<()> {
    for project in crate::projects::list(&ctx.db).await? {
        let report = reviewer_figures(&ctx.db, &project, None).await?;
        for f in &report.reviewers {
            let labels = vec![
                metrics::Label::new("project", project.name.clone()),
                metrics::Label::new("reviewer", metric_reviewer(f)),
                metrics::Label::new("name", f.name.clone()),
            ];
            metrics::gauge!("sieve_reviewer_labels_total", labels.clone()).set(f.labels as f64);
            metrics::gauge!("sieve_reviewer_skips_total", labels.clone()).set(f.skips as f64);
            metrics::gauge!("sieve_reviewer_undos_total", labels.clone()).set(f.undos as f64);
            if let Some(pace) = f.labels_per_hour {
                metrics::gauge!("sieve_reviewer_labels_per_hour", labels.clone()).set(pace);
            }
            metrics::gauge!("sieve_reviewer_agreement_compared", labels.clone())
                .set(f.agreement.compared as f64);
            if let Some(ratio) = f.agreement.ratio {
                metrics::gauge!("sieve_reviewer_agreement_ratio", labels.clone()).set(ratio);
            }
            metrics::gauge!("sieve_reviewer_audits", labels.clone()).set(f.audits.compared as f64);
            if let Some(ratio) = f.audits.ratio {
                metrics::gauge!("sieve_reviewer_audit_agreement_ratio", labels).set(ratio);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_a_duration_back_or_an_instant() {
        let now = DateTime::parse_from_rfc3339("2026-12-08T12:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        let at = |raw: &str| parse_since(raw, now).map(|t| t.to_rfc3339());
        assert_eq!(at("90m").ok().as_deref(), Some("2026-12-08T10:30:00+00:00"));
        assert_eq!(at("1d").ok().as_deref(), Some("2026-12-07T12:00:00+00:00"));
        assert_eq!(
            at("2026-12-01T00:00:00Z").ok().as_deref(),
            Some("2026-12-01T00:00:00+00:00")
        );
        assert!(matches!(at("yesterday"), Err(AppError::Invalid(_))));
    }

    #[test]
    fn agreement_has_no_ratio_without_a_comparison() {
        let z = calibration::z_for(0.95);
        assert_eq!(Agreement::of(0, 0, z), Agreement::default());
        let a = Agreement::of(3, 4, z);
        assert_eq!((a.compared, a.agreed, a.ratio), (4, 3, Some(0.75)));
        let (lower, upper) = calibration::wilson(3, 4, z);
        assert_eq!((a.lower, a.upper), (Some(lower), Some(upper)));
    }

    #[test]
    fn second_opinions_compare_with_the_other_reviewer() {
        let s = SecondOpinionFigures {
            checked_open: 5,
            checked_upheld: 1,
            checked_sided_with_model: 2,
            checked_neither: 1,
            given_agreed_with_first: 3,
            given_agreed_with_model: 1,
            given_neither: 0,
        };
        // Open checks are not comparisons yet.
        assert_eq!(s.compared_and_agreed(), (8, 4));
    }
}
