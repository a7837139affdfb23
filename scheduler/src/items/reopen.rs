//! Reopen: someone spotted a wrong label and sends the item back to people.
//!
//! A machine-labeled or imported item goes back to the review queue at the
//! top (priority at least [`REPORTED_PRIORITY`] and above every open task
//! of the project), as a task with the reason `reported`, and the report is a row
//! of `reports`: the label it questions, who reported it and why. A human
//! label is not reopened (409) unless `force` (only `ml` and `admin` may,
//! as for a forced submit). The item is `in_review` until a reviewer
//! labels it; routing leaves a reported item alone meanwhile (a rescore
//! does not label it by machine again).
//!
//! The label that closes the task is an ordinary human label (the item's
//! label from then on, training data like any other), and it decides the
//! report (`review::submit`): `confirmed` when it agrees with the reported
//! label, `corrected` when not. Those outcomes are evidence about machine
//! labels, but not random evidence: people report what looks wrong, so
//! they are counted on their own (`operate::status`, reported labels by
//! class) and never enter the audited accuracy or calibration, which rest
//! on random picks only (`TaskReason::is_random`).

use chrono::{DateTime, FixedOffset, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, FromQueryResult, Statement, TransactionTrait,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::{Action, Caller};
use crate::error::{AppError, AppResult};
use crate::kind::classification;
use crate::projects;

/// Where a reported task goes in the queue: first. Priority is the
/// model's doubt (0 to about 1; a second opinion is 1); a reported task
/// gets this, or more than any open task of its project has.
pub const REPORTED_PRIORITY: f32 = 2.0;

/// Longest report reason accepted, in characters.
pub const MAX_REASON_CHARS: usize = 500;

/// The body of `POST /items/{id}/reopen`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reopen {
    /// Why the label looks wrong (one line).
    pub reason: String,
    /// Reopen a label by people too (`ml`, `admin`).
    #[serde(default)]
    pub force: bool,
}

/// Who reports: a token's name and id, or the CLI's name without one.
#[derive(Clone, Copy, Debug)]
pub struct Reporter<'a> {
    pub name: &'a str,
    pub token: Option<Uuid>,
}

impl<'a> From<&'a Caller> for Reporter<'a> {
    fn from(caller: &'a Caller) -> Self {
        Self {
            name: &caller.name,
            token: Some(caller.token_id),
        }
    }
}

/// What a reopen did.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reopened {
    pub item_id: Uuid,
    pub task_id: Uuid,
    /// The label reported: its class and source.
    pub reported_label_id: Uuid,
    pub reported_class: String,
    pub reported_source: String,
}

#[derive(FromQueryResult)]
struct Current {
    project_id: Uuid,
    state: String,
    label_id: Option<Uuid>,
    class_index: Option<i32>,
    source: Option<String>,
    reviewer: Option<String>,
    labeled_at: Option<DateTime<FixedOffset>>,
    prediction_id: Option<Uuid>,
    open_task: Option<Uuid>,
}

/// The item locked (as a submit and the result consumer lock it first),
/// its current label, the prediction a reviewer will be shown (the label's
/// own, else the newest), and any task already open on it.
const CURRENT: &str = r#"
WITH item AS (SELECT id, project_id, state FROM items WHERE id = $1 FOR UPDATE)
SELECT item.project_id, item.state, l.id AS label_id, l.class_index, l.source, l.reviewer,
       l.created_at AS labeled_at,
       COALESCE(l.prediction_id,
                (SELECT p.id FROM predictions p WHERE p.item_id = item.id
                 ORDER BY p.created_at DESC, p.id DESC LIMIT 1)) AS prediction_id,
       (SELECT t.id FROM review_tasks t
        WHERE t.item_id = item.id AND t.state IN ('open', 'claimed')) AS open_task
FROM item
LEFT JOIN LATERAL (
    SELECT id, class_index, source, reviewer, created_at, prediction_id FROM labels
    WHERE item_id = item.id ORDER BY source = 'machine', created_at DESC, id DESC LIMIT 1
) l ON true
"#;

/// `$1` task, `$2` project, `$3` item, `$4` prediction, `$5` priority, `$6`
/// now, `$7` label, `$8` its source, `$9` its class, `$10` reason, `$11`
/// reporter, `$12` their token, `$13` forced.
const OPEN: &str = r#"
WITH task AS (
    INSERT INTO review_tasks (id, project_id, item_id, prediction_id, reason, priority, state,
                              fencing_token, created_at, updated_at)
    SELECT $1, $2, $3, $4, 'reported',
           GREATEST($5::real, (SELECT max(priority) + 1 FROM review_tasks
                               WHERE project_id = $2 AND state = 'open')),
           'open', 0, $6, $6
    RETURNING id
), report AS (
    INSERT INTO reports (task_id, project_id, item_id, reported_label_id, reported_source,
                         reported_class, reason, reported_by, reported_by_token, forced,
                         created_at)
    SELECT id, $2, $3, $7, $8, $9, $10, $11, $12, $13, $6 FROM task
)
UPDATE items SET state = 'in_review', updated_at = $6 WHERE id = $3
"#;

fn reason(raw: &str) -> AppResult<&str> {
    let reason = raw.trim();
    if reason.is_empty() {
        return Err(AppError::Invalid(
            "a reopen needs a reason (what looks wrong, e.g. \"a boot, not a sandal\"); nothing was written".into(),
        ));
    }
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(AppError::Invalid(format!(
            "a reopen reason is at most {MAX_REASON_CHARS} characters; nothing was written"
        )));
    }
    if reason.chars().any(char::is_control) {
        return Err(AppError::Invalid(
            "a reopen reason is one line of text without control characters; nothing was written"
                .into(),
        ));
    }
    Ok(reason)
}

/// Send `item_id` back to review as `reported`. `caller`: the token asking
/// (its project scope and its right to `force` are checked here), `None`
/// for the CLI, which has the database's own authority.
pub async fn reopen(
    db: &DatabaseConnection,
    item_id: Uuid,
    caller: Option<&Caller>,
    reporter: Reporter<'_>,
    request: &Reopen,
) -> AppResult<Reopened> {
    let why = reason(&request.reason)?;
    if request.force
        && let Some(caller) = caller
    {
        caller.require(Action::ForceLabel)?;
    }
    let txn = db.begin().await?;
    let current = Current::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        CURRENT,
        [item_id.into()],
    ))
    .one(&txn)
    .await?
    .ok_or_else(|| AppError::NotFound(format!("no item {item_id}")))?;
    if let Some(caller) = caller {
        caller.check_item_project(item_id, current.project_id)?;
    }
    let project = projects::get(db, &current.project_id.to_string()).await?;
    if let Some(task) = current.open_task {
        return Err(AppError::Conflict(format!(
            "item {item_id} already has an open review task ({task}); nothing was written"
        )));
    }
    let labeled = matches!(current.state.as_str(), "auto_labeled" | "human_labeled");
    let (true, Some(label_id), Some(class_index), Some(source)) = (
        labeled,
        current.label_id,
        current.class_index,
        current.source.clone(),
    ) else {
        return Err(AppError::Conflict(format!(
            "item {item_id} has no label to reopen (it is {}); nothing was written",
            current.state
        )));
    };
    let class = classification::class_name(&project.class_names, class_index)
        .unwrap_or_default()
        .to_owned();
    if source == "human" && !request.force {
        let by = current.reviewer.as_deref().unwrap_or("a person");
        let at = current
            .labeled_at
            .map_or_else(|| "an earlier time".to_owned(), |t| t.to_rfc3339());
        return Err(AppError::Conflict(format!(
            "item {item_id} is labeled {class:?} by {by} (at {at}), a person: an ml or admin \
             token may reopen it with \"force\": true; nothing was written"
        )));
    }
    let task_id = Uuid::now_v7();
    let now = Utc::now().fixed_offset();
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        OPEN,
        [
            task_id.into(),
            current.project_id.into(),
            item_id.into(),
            current.prediction_id.into(),
            REPORTED_PRIORITY.into(),
            now.into(),
            label_id.into(),
            source.clone().into(),
            class_index.into(),
            why.into(),
            reporter.name.into(),
            reporter.token.into(),
            request.force.into(),
        ],
    ))
    .await?;
    txn.commit().await?;
    metrics::counter!("sieve_items_reopened_total", "source" => source.clone()).increment(1);
    tracing::info!(item = %item_id, task = %task_id, reporter = reporter.name, source, "label reported; item back in review");
    Ok(Reopened {
        item_id,
        task_id,
        reported_label_id: label_id,
        reported_class: class,
        reported_source: source,
    })
}
