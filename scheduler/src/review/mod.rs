//! The human review queue, in PostgreSQL.
//!
//! A claim takes the open task (or one whose lease expired) that was skipped
//! the fewest times and, among those, is the most uncertain, with
//! `FOR UPDATE SKIP LOCKED`, so concurrent reviewers never get the same task
//! and never wait on each other. Each claim bumps the task's fencing token;
//! every later step on the claim must come from the holder and present the
//! current token, so a reviewer whose lease was taken over cannot overwrite
//! the new holder's work (409). A submit with the current token is accepted
//! even after the lease time has passed, as long as nobody else claimed the
//! task: the work is not thrown away.
//!
//! The other steps on a claim, and their rules:
//! - **renew** extends the lease from now by the configured lease time. Only
//!   the holder, with the current token, and only while the task is claimed
//!   (an expired lease nobody took over can still be renewed).
//! - **release** gives the task back unchanged.
//! - **skip** gives the task back with a reason and counts the skip. The
//!   queue is ordered by skip count first, so a skipped task comes back only
//!   after every task skipped fewer times, and a rescore that re-prioritises
//!   it (see `results`) cannot move it back to the front.
//! - **undo** takes back the holder's own submit while the lease that covered
//!   it has not run out: the label that submit wrote is deleted (the only way
//!   a human label is ever removed), the item is `in_review` again and the
//!   task is claimed again by the same reviewer, with a fresh lease and a new
//!   token. Refused (nothing written) once the lease time has passed, for
//!   anyone but the label's author, or when anything newer happened to the
//!   item (a newer label, another open task, a second opinion being given
//!   on the label; one not yet claimed is cancelled with the label).
//!
//! A submit for an item that people already labeled (an earlier review, an
//! import) is a conflict (409, nothing written) unless it says `force`, which
//! only the `ml` and `admin` roles may (see `auth::Action::ForceLabel`): a
//! reviewer cannot silently overrule another human.
//!
//! A label that disagrees with a confident model can ask for a **second
//! opinion** from another reviewer (policy `second_review_confidence`); how
//! that works and which label then counts is on [`submit`].

use chrono::{DateTime, Duration, FixedOffset, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait,
    FromQueryResult, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Statement,
    TransactionTrait,
};
use serde::{Deserialize, Serialize};
use sieve_shared::box_scores::ImageScores;
use sieve_shared::boxes::LabeledBox;
use sieve_shared::ids::TaskId;
use uuid::Uuid;

use crate::entities::item::{self, ItemState};
use crate::entities::label::{self, LabelSource};
use crate::entities::prediction;
use crate::entities::review_task::{self, TaskReason, TaskState};
use crate::error::{AppError, AppResult};
use crate::kind::classification::{self, Proposal};
use crate::kind::detection::{self, NamedBox};
use crate::kind::{self, TaskKind};
use crate::projects::{self, Project};

/// Longest skip reason accepted, in characters.
pub const MAX_SKIP_REASON_CHARS: usize = 500;

/// Who acts on a review task. People are told apart by their API token's
/// id, since two tokens may share a name; `name` is what is shown, and what
/// labels and skips record. The CLI acts with the database's authority under
/// a name and has no token (`token: None`): a claim made that way is held
/// only by callers without a token, and a claim made with a token only by
/// that token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reviewer<'a> {
    pub name: &'a str,
    pub token: Option<Uuid>,
}

impl<'a> From<&'a str> for Reviewer<'a> {
    fn from(name: &'a str) -> Self {
        Self { name, token: None }
    }
}

impl<'a> From<&'a String> for Reviewer<'a> {
    fn from(name: &'a String) -> Self {
        Self::from(name.as_str())
    }
}

/// Who holds a task's claim, as stored on the task.
#[derive(FromQueryResult)]
struct Holder {
    state: TaskState,
    fencing_token: i64,
    lease_holder: Option<String>,
    lease_holder_token: Option<Uuid>,
}

impl Holder {
    async fn of(db: &impl ConnectionTrait, task_id: TaskId) -> AppResult<Self> {
        Self::find_by_statement(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT state, fencing_token, lease_holder, lease_holder_token \
             FROM review_tasks WHERE id = $1",
            [task_id.as_uuid().into()],
        ))
        .one(db)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no review task {task_id}")))
    }

    /// Whether `reviewer` is the one the claim was made by (whatever its
    /// state now).
    fn is(&self, reviewer: Reviewer<'_>) -> bool {
        self.lease_holder.as_deref() == Some(reviewer.name)
            && self.lease_holder_token == reviewer.token
    }
}

/// A claimed task with what a reviewer needs to decide.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClaimedTask {
    pub task_id: Uuid,
    pub fencing_token: i64,
    pub lease_expires_at: DateTime<Utc>,
    /// How long a lease (and each renewal) lasts.
    #[serde(default)]
    pub lease_seconds: u64,
    pub project: String,
    pub item_id: Uuid,
    pub object_key: String,
    pub source: String,
    /// Where the image is served (`GET`, with the same token).
    #[serde(default)]
    pub image_url: String,
    pub reason: TaskReason,
    /// What the reviewer gives: a class (`classification`) or boxes
    /// (`detection`).
    #[serde(default)]
    pub task_kind: TaskKind,
    pub class_names: Vec<String>,
    /// Detection: the boxes to start from (the item's newest boxes by
    /// people or an import; none yet: an empty list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boxes: Option<Vec<NamedBox>>,
    /// The model's proposal, if it made one.
    pub predicted_class: Option<String>,
    pub probabilities: Option<Vec<f32>>,
    /// The top class of each committee member.
    pub member_votes: Option<Vec<u32>>,
    pub confidence: Option<f32>,
    /// Tasks still open in this project, this one excluded.
    pub remaining: u64,
}

/// What the model proposed for an item (a kind's review view).
fn proposal(project: &Project, prediction: Option<&prediction::Model>) -> Proposal {
    match prediction {
        // A detector proposes boxes (the task's `boxes`), not a class.
        Some(p) if project.task_kind.draws_boxes() => Proposal {
            confidence: Some(p.confidence),
            ..Proposal::default()
        },
        Some(p) => Proposal::from_columns(
            project,
            p.top_class,
            &p.probabilities,
            &p.member_votes,
            p.confidence,
        ),
        None => Proposal::default(),
    }
}

/// Where the API serves an item's image (to a caller allowed to review).
pub fn image_url(item_id: Uuid) -> String {
    format!("/api/v1/items/{item_id}/image")
}

fn lease_length(lease: std::time::Duration) -> Duration {
    Duration::from_std(lease).unwrap_or(Duration::minutes(5))
}

fn utc(at: DateTime<FixedOffset>) -> DateTime<Utc> {
    at.with_timezone(&Utc)
}

async fn item_and_prediction(
    db: &impl ConnectionTrait,
    task: &ClaimRow,
) -> AppResult<(item::Model, Option<prediction::Model>)> {
    let item = item::Entity::find_by_id(task.item_id)
        .one(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("task {} points at a missing item", task.id))?;
    let prediction = match task.prediction_id {
        Some(id) => prediction::Entity::find_by_id(id).one(db).await?,
        None => None,
    };
    Ok((item, prediction))
}

/// Up to this many open tasks are counted exactly on every claim; a longer
/// queue is counted at most every [`COUNT_EVERY`] per project and process,
/// off the claim's path (see [`open_tasks`]).
const EXACT_COUNT_UP_TO: u64 = 1_000;
const COUNT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(FromQueryResult)]
struct Counted {
    n: i64,
}

async fn count_open(
    db: &impl ConnectionTrait,
    project_id: Uuid,
    limit: Option<u64>,
) -> AppResult<u64> {
    let limit = limit.map_or_else(|| "ALL".to_owned(), |l| l.to_string());
    let counted = Counted::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "SELECT count(*) AS n FROM (SELECT 1 FROM review_tasks \
             WHERE project_id = $1 AND state = 'open' LIMIT {limit}) open"
        ),
        [project_id.into()],
    ))
    .one(db)
    .await?;
    Ok(counted.map_or(0, |c| c.n.max(0) as u64))
}

/// The last count of each long queue in this process: when, and how many.
/// A std mutex: it is never held across an await.
static LONG_QUEUES: std::sync::OnceLock<
    std::sync::Mutex<std::collections::HashMap<Uuid, (std::time::Instant, u64)>>,
> = std::sync::OnceLock::new();

fn long_queues()
-> std::sync::MutexGuard<'static, std::collections::HashMap<Uuid, (std::time::Instant, u64)>> {
    LONG_QUEUES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Count the open tasks of a project and remember the figure if the queue
/// is long (forget it if it is not).
async fn count_long_queue(db: &DatabaseConnection, project_id: Uuid) -> AppResult<u64> {
    let fresh = count_open(db, project_id, None).await?;
    if fresh < EXACT_COUNT_UP_TO {
        long_queues().remove(&project_id);
    } else {
        long_queues().insert(project_id, (std::time::Instant::now(), fresh));
    }
    Ok(fresh)
}

/// Open tasks in a project: what a reviewer's "N left" shows. Counting a
/// long queue on every claim would cost more than the claim itself (a count
/// of 100,000 open tasks takes ~20 ms here), so once a queue was found to
/// hold [`EXACT_COUNT_UP_TO`] or more, this process answers from its last
/// count. Once that is older than [`COUNT_EVERY`], the next claim starts a
/// recount in the background and every claim keeps the old figure until it
/// lands: no claim waits for a count of a long queue (the figure may be
/// behind by that much). A shorter queue is counted exactly on every claim.
async fn open_tasks(db: &DatabaseConnection, project_id: Uuid) -> AppResult<u64> {
    if let Some((at, n)) = long_queues().get_mut(&project_id) {
        if at.elapsed() >= COUNT_EVERY {
            // Marked fresh now, so that one claimer recounts, not all.
            *at = std::time::Instant::now();
            let db = db.clone();
            tokio::spawn(async move {
                if let Err(err) = count_long_queue(&db, project_id).await {
                    tracing::warn!(error = %err, project = %project_id, "recounting the review queue failed");
                }
            });
        }
        return Ok(*n);
    }
    let bounded = count_open(db, project_id, Some(EXACT_COUNT_UP_TO)).await?;
    if bounded < EXACT_COUNT_UP_TO {
        return Ok(bounded);
    }
    count_long_queue(db, project_id).await
}

/// The columns of a task that its view needs.
#[derive(Clone, Debug)]
struct ClaimRow {
    id: Uuid,
    item_id: Uuid,
    prediction_id: Option<Uuid>,
    reason: TaskReason,
}

impl From<&review_task::Model> for ClaimRow {
    fn from(task: &review_task::Model) -> Self {
        Self {
            id: task.id,
            item_id: task.item_id,
            prediction_id: task.prediction_id,
            reason: task.reason,
        }
    }
}

/// The boxes a reviewer of `item_id` starts from: its newest by people or
/// an import, else the boxes `prediction` (the task's) proposes, else none.
async fn start_boxes(
    db: &DatabaseConnection,
    project: &Project,
    item_id: Uuid,
    prediction: Option<&prediction::Model>,
) -> AppResult<Vec<NamedBox>> {
    let newest = label::Entity::find()
        .filter(label::Column::ItemId.eq(item_id))
        .filter(label::Column::Source.is_in([LabelSource::Human, LabelSource::Import]))
        .order_by_desc(label::Column::CreatedAt)
        .one(db)
        .await?;
    Ok(starting_boxes(
        project,
        newest.and_then(|l| l.boxes).as_ref(),
        prediction.and_then(|p| p.detections.as_ref()),
    ))
}

/// The boxes a reviewer starts from: `by_people` (the item's newest label
/// by people or an import) if it reads, else what `detections` (the task's
/// prediction) proposes, else none.
fn starting_boxes(
    project: &Project,
    by_people: Option<&serde_json::Value>,
    detections: Option<&serde_json::Value>,
) -> Vec<NamedBox> {
    let by_model = || {
        serde_json::from_value::<ImageScores>(detections?.clone())
            .ok()
            .map(|d| d.labeled_boxes())
    };
    let start = by_people
        .and_then(detection::from_json)
        .or_else(by_model)
        .unwrap_or_default();
    detection::named(&project.class_names, &start)
}

/// What the holder of `task` (already claimed, with `token` and `expires`)
/// is shown.
async fn claimed_view(
    db: &DatabaseConnection,
    project: &Project,
    task: &ClaimRow,
    token: i64,
    expires: DateTime<Utc>,
    lease: std::time::Duration,
) -> AppResult<ClaimedTask> {
    let (item, prediction) = item_and_prediction(db, task).await?;
    let proposal = proposal(project, prediction.as_ref());
    let boxes = match project.task_kind {
        TaskKind::Detection | TaskKind::Deidentify => {
            Some(start_boxes(db, project, item.id, prediction.as_ref()).await?)
        }
        TaskKind::Classification => None,
    };
    Ok(ClaimedTask {
        task_id: task.id,
        task_kind: project.task_kind,
        boxes,
        fencing_token: token,
        lease_expires_at: expires,
        lease_seconds: lease.as_secs(),
        project: project.name.clone(),
        item_id: item.id,
        image_url: image_url(item.id),
        object_key: item.object_key,
        source: item.source,
        reason: task.reason,
        class_names: project.class_names.clone(),
        predicted_class: proposal.predicted_class,
        probabilities: proposal.probabilities,
        member_votes: proposal.member_votes,
        confidence: proposal.confidence,
        remaining: open_tasks(db, project.id.as_uuid()).await?,
    })
}

/// Claim the next task of `project` for `reviewer`, or `None` when the queue
/// is empty.
pub async fn claim_next(
    db: &DatabaseConnection,
    project: &Project,
    reviewer: impl Into<Reviewer<'_>>,
    lease: std::time::Duration,
) -> AppResult<Option<ClaimedTask>> {
    let reviewer = reviewer.into();
    let started = std::time::Instant::now();
    let claimed = claim_next_inner(db, project, reviewer, lease).await;
    metrics::histogram!("sieve_review_claim_seconds").record(started.elapsed().as_secs_f64());
    claimed
}

async fn claim_next_inner(
    db: &DatabaseConnection,
    project: &Project,
    reviewer: Reviewer<'_>,
    lease: std::time::Duration,
) -> AppResult<Option<ClaimedTask>> {
    let now = Utc::now();
    let expires = now + lease_length(lease);
    let Some(claimed) = Claimed::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        CLAIM,
        [
            project.id.as_uuid().into(),
            reviewer.name.into(),
            expires.fixed_offset().into(),
            now.fixed_offset().into(),
            reviewer.token.into(),
            (project.task_kind.draws_boxes()).into(),
        ],
    ))
    .one(db)
    .await?
    else {
        return Ok(None);
    };
    let boxes = (project.task_kind.draws_boxes())
        .then(|| starting_boxes(project, claimed.boxes.as_ref(), claimed.detections.as_ref()));
    if claimed.expired {
        // Its holder's lease ran out: the task returns to the queue.
        metrics::counter!("sieve_review_leases_expired_total").increment(1);
    }
    metrics::counter!("sieve_review_tasks_claimed_total").increment(1);
    let proposal = match (
        &claimed.probabilities,
        &claimed.member_votes,
        claimed.top_class,
    ) {
        // A detector proposes boxes (the task's `boxes`), not a class.
        _ if project.task_kind.draws_boxes() => Proposal {
            confidence: claimed.confidence,
            ..Proposal::default()
        },
        (Some(probabilities), Some(votes), Some(top_class)) => Proposal::from_columns(
            project,
            top_class,
            probabilities,
            votes,
            claimed.confidence.unwrap_or_default(),
        ),
        _ => Proposal::default(),
    };
    Ok(Some(ClaimedTask {
        task_id: claimed.id,
        fencing_token: claimed.fencing_token,
        lease_expires_at: expires,
        lease_seconds: lease.as_secs(),
        project: project.name.clone(),
        item_id: claimed.item_id,
        image_url: image_url(claimed.item_id),
        object_key: claimed.object_key,
        source: claimed.source,
        reason: claimed.reason,
        task_kind: project.task_kind,
        class_names: project.class_names.clone(),
        boxes,
        predicted_class: proposal.predicted_class,
        probabilities: proposal.probabilities,
        member_votes: proposal.member_votes,
        confidence: proposal.confidence,
        remaining: open_tasks(db, project.id.as_uuid()).await?,
    }))
}

/// What one claim statement returns: the task it took, and its item and
/// prediction.
#[derive(FromQueryResult)]
struct Claimed {
    id: Uuid,
    item_id: Uuid,
    reason: TaskReason,
    fencing_token: i64,
    expired: bool,
    object_key: String,
    source: String,
    probabilities: Option<serde_json::Value>,
    member_votes: Option<serde_json::Value>,
    top_class: Option<i32>,
    confidence: Option<f32>,
    /// The item's newest boxes by people (detection projects only).
    boxes: Option<serde_json::Value>,
    /// The task's prediction's detector answer, if it has one.
    detections: Option<serde_json::Value>,
}

/// A claim, as one statement (its own transaction, one round trip): pick
/// the next task and lock it, skipping rows other claimers hold
/// (`SKIP LOCKED`, so they never wait on each other), take it, and return it
/// with its item and prediction. A task whose holder's lease ran out goes
/// first (index `review_tasks_claimed_leases`): it was handed out before
/// anything still open. Otherwise the open task skipped the fewest times,
/// then the most uncertain, then the oldest (index
/// `review_tasks_open_queue`). `COALESCE` evaluates the second pick only when
/// the first finds nothing. Neither pick takes a task that names the
/// claimer as the author of the label a second opinion checks (by token id
/// where the label had one, `not_for_token`; by name otherwise).
///
/// The claim commits without waiting for its WAL to reach the disk
/// (`synchronous_commit` off for this transaction only, set from inside the
/// statement since it has no transaction block of its own): that flush was
/// the largest part of an uncontended claim here (about 3 ms of fdatasync).
/// A crash can lose the last fraction of a second of claims; such a claim
/// comes back as it was (open, or its earlier holder's) and may be handed
/// out again with the same token number, which is why a submit also checks
/// the holder. Nothing a reviewer submitted is at risk: submits commit
/// synchronously, and their flush also covers every claim before them.
/// `$1` project, `$2` reviewer, `$3` lease expiry, `$4` now, `$5` the
/// reviewer's token id (NULL without one), `$6` whether to read the item's
/// newest boxes (a detection project).
const CLAIM: &str = r#"
WITH claimed AS (
    UPDATE review_tasks t
    SET state = 'claimed', lease_holder = $2, lease_holder_token = $5::uuid,
        lease_expires_at = $3,
        fencing_token = t.fencing_token + 1, updated_at = $4
    FROM (
        SELECT id, state AS was FROM review_tasks
        WHERE id = COALESCE(
            (SELECT id FROM review_tasks
             WHERE project_id = $1 AND state = 'claimed' AND lease_expires_at < $4
               AND NOT (CASE WHEN not_for_token IS NOT NULL THEN not_for_token IS NOT DISTINCT FROM $5::uuid
                         ELSE not_for IS NOT DISTINCT FROM $2 END)
             ORDER BY lease_expires_at LIMIT 1 FOR UPDATE SKIP LOCKED),
            (SELECT id FROM review_tasks
             WHERE project_id = $1 AND state = 'open'
               AND NOT (CASE WHEN not_for_token IS NOT NULL THEN not_for_token IS NOT DISTINCT FROM $5::uuid
                         ELSE not_for IS NOT DISTINCT FROM $2 END)
             ORDER BY skip_count, priority DESC, created_at LIMIT 1 FOR UPDATE SKIP LOCKED))
    ) pick
    WHERE t.id = pick.id
    RETURNING t.id, t.item_id, t.prediction_id, t.reason, t.fencing_token,
              pick.was = 'claimed' AS expired
)
SELECT c.id, c.item_id, c.reason, c.fencing_token, c.expired, i.object_key, i.source,
       p.probabilities, p.member_votes, p.top_class, p.confidence, p.detections,
       CASE WHEN $6 THEN (SELECT l.boxes FROM labels l
                          WHERE l.item_id = c.item_id AND l.source IN ('human', 'import')
                          ORDER BY l.created_at DESC LIMIT 1) END AS boxes,
       set_config('synchronous_commit', 'off', true) AS commit_mode
FROM claimed c
JOIN items i ON i.id = c.item_id
LEFT JOIN predictions p ON p.id = c.prediction_id
"#;

/// A reviewer's answer to a claimed task.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Submission {
    pub fencing_token: i64,
    /// Class name (or index) chosen by the reviewer: the label of a
    /// classification project.
    #[serde(default)]
    pub class: String,
    /// The boxes the reviewer drew: the label of a detection project (an
    /// empty list: nothing in the image to box). Each box is checked
    /// against the image's size and the project's classes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boxes: Option<Vec<NamedBox>>,
    /// Label the item even though a human already labeled it (the newest
    /// human label wins). Only `ml` and `admin` may ask for it: the HTTP
    /// layer refuses it to other roles with 403 before calling [`submit`].
    #[serde(default)]
    pub force: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubmittedLabel {
    pub label_id: Uuid,
    pub item_id: Uuid,
    /// The class (classification).
    pub class_index: Option<u32>,
    pub class: Option<String>,
    /// The boxes (detection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boxes: Option<Vec<NamedBox>>,
    /// Until when the submitter may undo this submit (the end of the lease
    /// it was made under); `None` when it was made after the lease ran out.
    #[serde(default)]
    pub undo_until: Option<DateTime<Utc>>,
    /// The second-opinion task this label opened (it disagreed with a
    /// confident model; see [`submit`]), if any.
    #[serde(default)]
    pub second_opinion_task: Option<Uuid>,
}

fn stale(task: Uuid, current: i64, state: TaskState, token: i64) -> AppError {
    AppError::Conflict(format!(
        "task {task} is no longer yours: its lease moved on (token {token}, current {current}, state {state:?}); nothing was written"
    ))
}

/// Why a step on a claim that matched no row was refused.
async fn refusal(
    db: &impl ConnectionTrait,
    task_id: TaskId,
    token: i64,
    reviewer: Reviewer<'_>,
) -> AppResult<AppError> {
    let task = Holder::of(db, task_id).await?;
    let holder = task.lease_holder.as_deref().unwrap_or("nobody");
    Ok(
        if task.state == TaskState::Claimed && task.fencing_token == token && !task.is(reviewer) {
            let by = if holder == reviewer.name {
                format!("another token named {holder}")
            } else {
                holder.to_owned()
            };
            AppError::Conflict(format!(
                "task {task_id} is held by {by}, not by this caller ({}); nothing was written",
                reviewer.name
            ))
        } else {
            stale(task_id.as_uuid(), task.fencing_token, task.state, token)
        },
    )
}

/// Where a second-opinion task goes in the queue: ahead of most of what the
/// model doubts (priority is its doubt, 0 to about 1), because the label it
/// questions is already training data.
const SECOND_OPINION_PRIORITY: f32 = 1.0;

/// What the submit statement found, and whether it wrote.
#[derive(FromQueryResult)]
struct SubmitRow {
    item_id: Uuid,
    state: TaskState,
    fencing_token: i64,
    lease_holder: Option<String>,
    lease_holder_token: Option<Uuid>,
    lease_expires_at: Option<DateTime<FixedOffset>>,
    not_for: Option<String>,
    not_for_token: Option<Uuid>,
    project_name: String,
    class_names: serde_json::Value,
    task_kind: String,
    class_index: Option<i32>,
    /// The item's newest label by people, before this submit.
    newest_label_id: Option<Uuid>,
    newest_class: Option<i32>,
    newest_source: Option<LabelSource>,
    newest_reviewer: Option<String>,
    newest_at: Option<DateTime<FixedOffset>>,
    first_label_id: Option<Uuid>,
    /// The label a `reported` task questions (`items::reopen`).
    reported_label_id: Option<Uuid>,
    written: bool,
    second_opinion_task: Option<Uuid>,
    outcome: Option<String>,
}

/// A submit, as one statement (its own transaction, one round trip).
///
/// It locks the item first, as the result consumer does (so the two never
/// deadlock), then reads what the decision needs (`facts`) and writes only
/// if it is allowed (`ok`): the task is claimed by this reviewer with this
/// token, the class exists, the reviewer is not the author of the label a
/// second opinion checks, and the item has no label by people yet (unless
/// `force`, or it is the label this second opinion checks).
/// Then the task is closed (re-checking state and token on the row as it is
/// now), the label written, the item marked `human_labeled`; a label that
/// disagrees with a confident model opens a second-opinion task, and a
/// second opinion records how it compares. Every write reads from `done`,
/// so nothing is written unless the task was closed, and the second-opinion
/// task is inserted only after the closed task left the one-open-task-per-
/// item index. The policy's `second_review_confidence` is read from the
/// project's stored policy here, as of this statement.
///
/// `$1` task, `$2` token, `$3` reviewer, `$4` class name, `$5` class number
/// (NULL unless the class given is a number), `$6` force, `$7` now, `$8` the
/// new label's id, `$9` the id of a second-opinion task, `$10` its priority,
/// `$11` the reviewer's token id (NULL without one), `$12` the boxes of a
/// detection label (checked by the caller; NULL for a class).
const SUBMIT: &str = r#"
WITH item AS (
    SELECT id FROM items
    WHERE id = (SELECT item_id FROM review_tasks WHERE id = $1)
    FOR UPDATE
), facts AS (
    SELECT t.id, t.project_id, t.item_id, t.prediction_id, t.reason, t.state,
           t.fencing_token, t.lease_holder, t.lease_holder_token, t.lease_expires_at, t.not_for,
           t.not_for_token,
           pr.name AS project_name, pr.class_names, pr.task_kind,
           COALESCE(
               (SELECT (c.ord - 1)::int
                FROM jsonb_array_elements_text(pr.class_names) WITH ORDINALITY c(name, ord)
                WHERE c.name = $4 LIMIT 1),
               CASE WHEN $5::int < jsonb_array_length(pr.class_names) THEN $5::int END
           ) AS class_index,
           h.id AS newest_label_id, h.class_index AS newest_class,
           h.source AS newest_source, h.reviewer AS newest_reviewer,
           h.created_at AS newest_at,
           so.first_label_id, rp.reported_label_id, p.top_class, p.confidence,
           (pr.policy ->> 'second_review_confidence')::real AS second_review_confidence
    FROM item
    JOIN review_tasks t ON t.id = $1 AND t.item_id = item.id
    JOIN projects pr ON pr.id = t.project_id
    LEFT JOIN predictions p ON p.id = t.prediction_id
    LEFT JOIN second_opinions so ON so.task_id = t.id
    LEFT JOIN reports rp ON rp.task_id = t.id
    LEFT JOIN LATERAL (
        SELECT id, class_index, source, reviewer, created_at FROM labels
        WHERE item_id = t.item_id AND source IN ('human', 'import')
        ORDER BY created_at DESC LIMIT 1
    ) h ON true
), ok AS (
    SELECT * FROM facts
    WHERE state = 'claimed' AND fencing_token = $2 AND lease_holder = $3
      AND lease_holder_token IS NOT DISTINCT FROM $11::uuid
      AND CASE WHEN task_kind = 'classification' THEN class_index IS NOT NULL AND $12::jsonb IS NULL
               ELSE class_index IS NULL AND $12::jsonb IS NOT NULL END
      AND NOT (CASE WHEN not_for_token IS NOT NULL THEN not_for_token IS NOT DISTINCT FROM $11::uuid
                    ELSE not_for IS NOT DISTINCT FROM $3 END)
      AND ($6 OR newest_label_id IS NULL OR newest_label_id = first_label_id
           OR newest_label_id = reported_label_id)
), done AS (
    UPDATE review_tasks t SET state = 'done', closed_at = $7, updated_at = $7
    FROM ok
    WHERE t.id = ok.id AND t.state = 'claimed' AND t.fencing_token = $2
      AND t.lease_holder = $3 AND t.lease_holder_token IS NOT DISTINCT FROM $11::uuid
    RETURNING ok.*
), label AS (
    INSERT INTO labels (id, item_id, class_index, boxes, source, reviewer, prediction_id,
                        review_task_id, created_at)
    SELECT $8, item_id, class_index, $12::jsonb, 'human', $3, prediction_id, id, $7 FROM done
), labeled AS (
    UPDATE items SET state = 'human_labeled', updated_at = $7
    FROM done WHERE items.id = done.item_id
), opened AS (
    INSERT INTO review_tasks (id, project_id, item_id, prediction_id, reason, priority,
                              state, fencing_token, not_for, not_for_token, created_at,
                              updated_at)
    SELECT $9, project_id, item_id, prediction_id, 'second_opinion', $10, 'open', 0, $3,
           $11::uuid, $7, $7
    FROM done
    WHERE reason <> 'second_opinion' AND second_review_confidence IS NOT NULL
      AND confidence >= second_review_confidence AND top_class <> class_index
    RETURNING id
), asked AS (
    INSERT INTO second_opinions (task_id, project_id, item_id, first_label_id,
                                 first_reviewer, first_class, prediction_id, model_class,
                                 model_confidence, created_at)
    SELECT o.id, d.project_id, d.item_id, $8, $3, d.class_index, d.prediction_id,
           d.top_class, d.confidence, $7
    FROM opened o CROSS JOIN done d
), decided AS (
    UPDATE second_opinions s
    SET second_label_id = $8, second_reviewer = $3, second_class = d.class_index,
        outcome = CASE WHEN d.class_index = s.first_class THEN 'agreed_with_first'
                       WHEN d.class_index = s.model_class THEN 'agreed_with_model'
                       ELSE 'neither' END,
        decided_at = $7
    FROM done d WHERE s.task_id = d.id
    RETURNING s.outcome
), reported AS (
    UPDATE reports r
    SET corrected_label_id = $8, corrected_class = d.class_index,
        outcome = CASE WHEN d.class_index = r.reported_class THEN 'confirmed' ELSE 'corrected' END,
        decided_at = $7
    FROM done d WHERE r.task_id = d.id
)
SELECT f.item_id, f.state, f.fencing_token, f.lease_holder, f.lease_holder_token,
       f.lease_expires_at, f.not_for, f.not_for_token,
       f.project_name, f.class_names, f.task_kind, f.class_index, f.newest_label_id,
       f.newest_class, f.newest_source, f.newest_reviewer, f.newest_at, f.first_label_id,
       f.reported_label_id,
       EXISTS (SELECT 1 FROM done) AS written,
       (SELECT id FROM opened) AS second_opinion_task,
       (SELECT outcome FROM decided) AS outcome
FROM facts f
"#;

fn already_labeled(
    item_id: Uuid,
    class: &str,
    source: Option<LabelSource>,
    reviewer: Option<&str>,
    at: Option<DateTime<FixedOffset>>,
) -> AppError {
    let by = match (source, reviewer) {
        (Some(LabelSource::Import), _) => "an import".to_owned(),
        (_, Some(reviewer)) => reviewer.to_owned(),
        (_, None) => "a person".to_owned(),
    };
    let at = at.map_or_else(|| "an earlier time".to_owned(), |at| at.to_rfc3339());
    AppError::Conflict(format!(
        "item {item_id} is already labeled {class:?} by {by} (at {at}); an ml or admin token \
         may override it with \"force\": true; nothing was written"
    ))
}

/// Why a submit that wrote nothing was refused, in the order the rules are
/// listed on [`SUBMIT`]. What is not about this submit's own content (a
/// lease that moved on, also while the statement waited for the item) is
/// read again, as it is now.
async fn submit_refusal(
    db: &DatabaseConnection,
    task_id: TaskId,
    reviewer: Reviewer<'_>,
    submission: &Submission,
    row: &SubmitRow,
) -> AppResult<AppError> {
    let holds = row.state == TaskState::Claimed
        && row.fencing_token == submission.fencing_token
        && row.lease_holder.as_deref() == Some(reviewer.name)
        && row.lease_holder_token == reviewer.token;
    if !holds {
        return refusal(db, task_id, submission.fencing_token, reviewer).await;
    }
    let class_names: Vec<String> =
        serde_json::from_value(row.class_names.clone()).map_err(|e| {
            anyhow::anyhow!("project {} has corrupt class names: {e}", row.project_name)
        })?;
    if row.task_kind != TaskKind::Classification.as_str() {
        return Ok(AppError::Invalid(format!(
            "project {} is a {} project: submit its label as \"boxes\", not a class; nothing was written",
            row.project_name, row.task_kind
        )));
    }
    let Some(_) = row.class_index else {
        return Ok(AppError::Invalid(format!(
            "project {} has no class {:?}; its classes are: {}; nothing was written",
            row.project_name,
            submission.class,
            class_names.join(", ")
        )));
    };
    let author = match row.not_for_token {
        Some(token) => reviewer.token == Some(token),
        None => row.not_for.as_deref() == Some(reviewer.name),
    };
    if author {
        let reviewer = reviewer.name;
        return Ok(AppError::Forbidden(format!(
            "task {task_id} asks for a second opinion on {reviewer}'s own label: another \
             reviewer must give it; nothing was written"
        )));
    }
    if let Some(existing) = row.newest_label_id
        && !submission.force
        && row.first_label_id != Some(existing)
        && row.reported_label_id != Some(existing)
    {
        let class = row
            .newest_class
            .and_then(|c| classification::class_name(&class_names, c))
            .unwrap_or("?");
        return Ok(already_labeled(
            row.item_id,
            class,
            row.newest_source,
            row.newest_reviewer.as_deref(),
            row.newest_at,
        ));
    }
    // Every rule held on what the statement read, yet the task was not
    // closed: it changed while the statement waited for the item.
    refusal(db, task_id, submission.fencing_token, reviewer).await
}

/// Store a human label for a task claimed by `reviewer` and close it.
///
/// An item that already has a label by people (an earlier review, an
/// import) is refused with 409 unless `submission.force` is set; the caller
/// decides who may force. A second opinion is the exception: the label it
/// checks is expected.
///
/// **Second opinions** (policy `second_review_confidence`, off by default):
/// when the class submitted differs from the model's and the model's
/// confidence is at or above that setting, the label is stored as usual and
/// the item stays `human_labeled`, but a `second_opinion` task is opened for
/// it, which the first reviewer can neither claim nor submit. The second
/// reviewer sees the image and the model's proposal, not the first label.
/// Their label is appended like any other and, being the newest human
/// label, is the item's label from then on: where two of the three answers
/// agree (the second reviewer sides with the first, or with the model) that
/// is the majority; where all three differ, the second reviewer's stands and
/// the outcome `neither` marks the item. The outcome is recorded in
/// `second_opinions` (see `status::second_opinion_counts`). A second
/// opinion never asks for a third, and the model never labels the item:
/// human-labeled items are not routed again.
pub async fn submit(
    db: &DatabaseConnection,
    task_id: TaskId,
    reviewer: impl Into<Reviewer<'_>>,
    submission: &Submission,
) -> AppResult<SubmittedLabel> {
    let reviewer = reviewer.into();
    let now = Utc::now();
    let label_id = Uuid::now_v7();
    let boxes = match &submission.boxes {
        Some(named) => Some(checked_boxes(db, task_id, named).await?),
        None => None,
    };
    // A class given by number, if it is one (a class may also be named "3":
    // the name wins, as in `Project::class_index`); none with boxes.
    let class = boxes.is_none().then(|| submission.class.clone());
    let class_number = class
        .as_deref()
        .and_then(|class| class.parse::<usize>().ok())
        .and_then(|n| i32::try_from(n).ok());
    let row = SubmitRow::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        SUBMIT,
        [
            task_id.as_uuid().into(),
            submission.fencing_token.into(),
            reviewer.name.into(),
            class.into(),
            class_number.into(),
            submission.force.into(),
            now.fixed_offset().into(),
            label_id.into(),
            Uuid::now_v7().into(),
            SECOND_OPINION_PRIORITY.into(),
            reviewer.token.into(),
            boxes.as_ref().map(|b| detection::to_json(b)).into(),
        ],
    ))
    .one(db)
    .await?
    .ok_or_else(|| AppError::NotFound(format!("no review task {task_id}")))?;
    if !row.written {
        return Err(submit_refusal(db, task_id, reviewer, submission, &row).await?);
    }
    metrics::counter!("sieve_review_tasks_submitted_total").increment(1);
    let reviewer = reviewer.name;
    if let Some(opened) = row.second_opinion_task {
        tracing::info!(task = %task_id, second_opinion = %opened, reviewer,
            "label disagrees with a confident model: second opinion opened");
    }
    if let Some(outcome) = &row.outcome {
        tracing::info!(task = %task_id, reviewer, outcome, "second opinion given");
    }

    let class_names: Vec<String> =
        serde_json::from_value(row.class_names.clone()).unwrap_or_default();
    let class = row
        .class_index
        .and_then(|index| classification::class_name(&class_names, index))
        .map(str::to_owned);
    Ok(SubmittedLabel {
        label_id,
        item_id: row.item_id,
        class_index: row.class_index.map(|index| index as u32),
        class,
        boxes: boxes.map(|b| detection::named(&class_names, &b)),
        undo_until: row.lease_expires_at.map(utc).filter(|end| *end > now),
        second_opinion_task: row.second_opinion_task,
    })
}

/// The boxes of a submit to `task_id`, checked against its project (a
/// detection project) and its image's size: 422 naming what is wrong.
async fn checked_boxes(
    db: &DatabaseConnection,
    task_id: TaskId,
    named: &[NamedBox],
) -> AppResult<Vec<LabeledBox>> {
    #[derive(FromQueryResult)]
    struct Target {
        project_id: Uuid,
        width: Option<i32>,
        height: Option<i32>,
    }
    let target = Target::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT t.project_id, i.width, i.height FROM review_tasks t \
         JOIN items i ON i.id = t.item_id WHERE t.id = $1",
        [task_id.as_uuid().into()],
    ))
    .one(db)
    .await?
    .ok_or_else(|| AppError::NotFound(format!("no review task {task_id}")))?;
    let project = projects::get(db, &target.project_id.to_string()).await?;
    if !project.task_kind.draws_boxes() {
        return Err(kind::wrong_kind(
            &project,
            TaskKind::Detection,
            "a list of boxes",
        ));
    }
    let (Some(width), Some(height)) = (target.width, target.height) else {
        return Err(anyhow::anyhow!("item of task {task_id} has no stored size").into());
    };
    detection::parse(&project, named, width as u32, height as u32)
}

/// Give a claimed task back to the queue unchanged, by its holder with the
/// current token (like every other step on a claim).
pub async fn release(
    db: &DatabaseConnection,
    task_id: TaskId,
    reviewer: impl Into<Reviewer<'_>>,
    fencing_token: i64,
) -> AppResult<()> {
    let reviewer = reviewer.into();
    let updated = db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE review_tasks \
             SET state = 'open', lease_holder = NULL, lease_holder_token = NULL, \
                 lease_expires_at = NULL, updated_at = $5 \
             WHERE id = $1 AND state = 'claimed' AND fencing_token = $2 AND lease_holder = $3 \
               AND lease_holder_token IS NOT DISTINCT FROM $4::uuid",
            [
                task_id.as_uuid().into(),
                fencing_token.into(),
                reviewer.name.into(),
                reviewer.token.into(),
                Utc::now().fixed_offset().into(),
            ],
        ))
        .await?;
    if updated.rows_affected() == 0 {
        return Err(refusal(db, task_id, fencing_token, reviewer).await?);
    }
    Ok(())
}

/// A claim's lease after a renewal.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lease {
    pub task_id: Uuid,
    pub fencing_token: i64,
    pub lease_expires_at: DateTime<Utc>,
}

/// Extend the lease of a claimed task to `lease` from now.
pub async fn renew(
    db: &DatabaseConnection,
    task_id: TaskId,
    reviewer: impl Into<Reviewer<'_>>,
    fencing_token: i64,
    lease: std::time::Duration,
) -> AppResult<Lease> {
    let reviewer = reviewer.into();
    let now = Utc::now();
    let expires = now + lease_length(lease);
    let updated = db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE review_tasks SET lease_expires_at = $5, updated_at = $6 \
             WHERE id = $1 AND state = 'claimed' AND fencing_token = $2 AND lease_holder = $3 \
               AND lease_holder_token IS NOT DISTINCT FROM $4::uuid",
            [
                task_id.as_uuid().into(),
                fencing_token.into(),
                reviewer.name.into(),
                reviewer.token.into(),
                expires.fixed_offset().into(),
                now.fixed_offset().into(),
            ],
        ))
        .await?;
    if updated.rows_affected() == 0 {
        return Err(refusal(db, task_id, fencing_token, reviewer).await?);
    }
    Ok(Lease {
        task_id: task_id.as_uuid(),
        fencing_token,
        lease_expires_at: expires,
    })
}

/// A reviewer's request to pass on a claimed task.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Skip {
    pub fencing_token: i64,
    /// Why (ambiguous image, none of the classes fits...): kept on the task.
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Skipped {
    pub task_id: Uuid,
    /// How often this task has now been skipped, by anyone.
    pub skip_count: i32,
    /// Tasks open in the project, this one included again.
    pub remaining: u64,
}

fn skip_reason(raw: &str) -> AppResult<&str> {
    let reason = raw.trim();
    if reason.is_empty() {
        return Err(AppError::Invalid(
            "a skip needs a reason (e.g. \"ambiguous\", \"no class fits\"); nothing was written"
                .into(),
        ));
    }
    if reason.chars().count() > MAX_SKIP_REASON_CHARS {
        return Err(AppError::Invalid(format!(
            "a skip reason is at most {MAX_SKIP_REASON_CHARS} characters; nothing was written"
        )));
    }
    if reason.chars().any(char::is_control) {
        return Err(AppError::Invalid(
            "a skip reason is one line of text without control characters; nothing was written"
                .into(),
        ));
    }
    Ok(reason)
}

#[derive(FromQueryResult)]
struct SkipUpdate {
    project_id: Uuid,
    skip_count: i32,
}

/// Give a claimed task back to the queue, behind every task skipped fewer
/// times, and record who skipped it and why: on the task (its last skip)
/// and as a row of `review_events` (every skip, for the per-reviewer
/// figures).
pub async fn skip(
    db: &DatabaseConnection,
    task_id: TaskId,
    reviewer: impl Into<Reviewer<'_>>,
    skip: &Skip,
) -> AppResult<Skipped> {
    let reviewer = reviewer.into();
    let reason = skip_reason(&skip.reason)?;
    let now = Utc::now().fixed_offset();
    let updated = SkipUpdate::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        r#"
        WITH skipped AS (
            UPDATE review_tasks
            SET state = 'open', lease_holder = NULL, lease_holder_token = NULL,
                lease_expires_at = NULL,
                skip_count = skip_count + 1, last_skip_reason = $4, last_skipped_by = $3,
                last_skipped_at = $5, updated_at = $5
            WHERE id = $1 AND state = 'claimed' AND fencing_token = $2 AND lease_holder = $3
              AND lease_holder_token IS NOT DISTINCT FROM $6::uuid
            RETURNING id, project_id, skip_count
        ), logged AS (
            INSERT INTO review_events (id, project_id, task_id, kind, reviewer, reviewer_token,
                                       created_at)
            SELECT $7, project_id, id, 'skip', $3, $6::uuid, $5 FROM skipped
        )
        SELECT project_id, skip_count FROM skipped
        "#,
        [
            task_id.as_uuid().into(),
            skip.fencing_token.into(),
            reviewer.name.into(),
            reason.into(),
            now.into(),
            reviewer.token.into(),
            Uuid::now_v7().into(),
        ],
    ))
    .one(db)
    .await?;
    let Some(updated) = updated else {
        return Err(refusal(db, task_id, skip.fencing_token, reviewer).await?);
    };
    metrics::counter!("sieve_review_tasks_skipped_total").increment(1);
    tracing::info!(task = %task_id, reviewer = reviewer.name, skips = updated.skip_count, "review task skipped");
    Ok(Skipped {
        task_id: task_id.as_uuid(),
        skip_count: updated.skip_count,
        remaining: open_tasks(db, updated.project_id).await?,
    })
}

/// A second opinion asked for by a label, as an undo of that label finds it.
#[derive(FromQueryResult)]
struct AskedOpinion {
    id: Uuid,
    state: TaskState,
    lease_holder: Option<String>,
}

/// Take back `reviewer`'s own submit of `task_id`, made with
/// `fencing_token`, while the lease it was made under still runs. The task
/// is claimed again by the same reviewer, with a fresh lease. A second
/// opinion the submit asked for is cancelled with it (refused while another
/// reviewer holds it); undoing a second opinion clears its outcome.
pub async fn undo(
    db: &DatabaseConnection,
    task_id: TaskId,
    reviewer: impl Into<Reviewer<'_>>,
    fencing_token: i64,
    lease: std::time::Duration,
) -> AppResult<ClaimedTask> {
    let who = reviewer.into();
    let reviewer = who.name;
    let txn = db.begin().await?;
    let task = review_task::Entity::find_by_id(task_id.as_uuid())
        .lock_exclusive()
        .one(&txn)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no review task {task_id}")))?;
    if task.state != TaskState::Done {
        return Err(AppError::Conflict(format!(
            "task {} is {:?}, not submitted: there is nothing to undo; nothing was written",
            task.id, task.state
        )));
    }
    if task.fencing_token != fencing_token {
        return Err(stale(
            task.id,
            task.fencing_token,
            task.state,
            fencing_token,
        ));
    }
    let label = label::Entity::find()
        .filter(label::Column::ReviewTaskId.eq(task.id))
        .lock_exclusive()
        .one(&txn)
        .await?
        .ok_or_else(|| {
            AppError::Conflict(format!(
                "task {} has no label to undo; nothing was written",
                task.id
            ))
        })?;
    let author = label.reviewer.as_deref().unwrap_or("nobody");
    // The task row is locked above; the token column is read under that lock.
    let holder = Holder::of(&txn, task_id).await?;
    if label.source != LabelSource::Human || author != reviewer || !holder.is(who) {
        return Err(AppError::Forbidden(format!(
            "only the reviewer who submitted task {} ({author}) may undo it; nothing was written",
            task.id
        )));
    }
    let now = Utc::now();
    match task.lease_expires_at.map(utc) {
        Some(end) if now < end => {}
        end => {
            let closed = end.map_or_else(|| "with the submit".to_owned(), |e| e.to_rfc3339());
            return Err(AppError::Conflict(format!(
                "the undo window of task {} closed {closed}; the label stays (to correct it, \
                 label the item again in a new review); nothing was written",
                task.id
            )));
        }
    }
    let item = item::Entity::find_by_id(task.item_id)
        .lock_exclusive()
        .one(&txn)
        .await?
        .ok_or_else(|| anyhow::anyhow!("task {} points at a missing item", task.id))?;
    // A second opinion this label asked for goes with it, unless someone is
    // giving it right now. Locked after the item, as a submit locks them.
    let asked = AskedOpinion::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT t.id, t.state, t.lease_holder FROM second_opinions s \
         JOIN review_tasks t ON t.id = s.task_id WHERE s.first_label_id = $1 FOR UPDATE OF t",
        [label.id.into()],
    ))
    .one(&txn)
    .await?;
    if let Some(asked) = &asked
        && asked.state == TaskState::Claimed
    {
        return Err(AppError::Conflict(format!(
            "{} is giving a second opinion on this label now (task {}); the label stays; \
             nothing was written",
            asked.lease_holder.as_deref().unwrap_or("another reviewer"),
            asked.id
        )));
    }
    let newer_labels = label::Entity::find()
        .filter(label::Column::ItemId.eq(item.id))
        .filter(label::Column::Id.ne(label.id))
        .filter(label::Column::CreatedAt.gte(label.created_at))
        .count(&txn)
        .await?;
    let mut other_tasks = review_task::Entity::find()
        .filter(review_task::Column::ItemId.eq(item.id))
        .filter(review_task::Column::Id.ne(task.id))
        .filter(review_task::Column::State.is_in([TaskState::Open, TaskState::Claimed]));
    if let Some(asked) = &asked {
        other_tasks = other_tasks.filter(review_task::Column::Id.ne(asked.id));
    }
    let other_tasks = other_tasks.count(&txn).await?;
    if item.state != ItemState::HumanLabeled || newer_labels > 0 || other_tasks > 0 {
        return Err(AppError::Conflict(format!(
            "item {} changed after the submit (state {:?}, {newer_labels} newer label(s), \
             {other_tasks} other open task(s)); the label stays; nothing was written",
            item.id, item.state
        )));
    }

    // What refers to the label goes first: the second opinion it asked for
    // (cancelled, unanswered), or, for a second opinion, its outcome.
    if let Some(asked) = &asked {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "WITH gone AS (DELETE FROM second_opinions WHERE task_id = $1) \
             UPDATE review_tasks SET state = 'cancelled', closed_at = $2, updated_at = $2 \
             WHERE id = $1 AND state = 'open'",
            [asked.id.into(), now.fixed_offset().into()],
        ))
        .await?;
    }
    if task.reason == TaskReason::SecondOpinion {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE second_opinions SET second_label_id = NULL, second_reviewer = NULL, \
             second_class = NULL, outcome = NULL, decided_at = NULL WHERE task_id = $1",
            [task.id.into()],
        ))
        .await?;
    }
    if task.reason == TaskReason::Reported {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE reports SET corrected_label_id = NULL, corrected_class = NULL, \
             outcome = NULL, decided_at = NULL WHERE task_id = $1",
            [task.id.into()],
        ))
        .await?;
    }
    let deleted = label::Entity::delete_many()
        .filter(label::Column::Id.eq(label.id))
        .filter(label::Column::ReviewTaskId.eq(task.id))
        .filter(label::Column::Source.eq(LabelSource::Human))
        .filter(label::Column::Reviewer.eq(reviewer))
        .exec(&txn)
        .await?;
    if deleted.rows_affected != 1 {
        return Err(anyhow::anyhow!(
            "undo of task {} deleted {} labels instead of 1",
            task.id,
            deleted.rows_affected
        )
        .into());
    }
    let expires = now + lease_length(lease);
    let token = task.fencing_token + 1;
    review_task::Entity::update(review_task::ActiveModel {
        id: Set(task.id),
        state: Set(TaskState::Claimed),
        lease_holder: Set(Some(reviewer.to_owned())),
        lease_expires_at: Set(Some(expires.fixed_offset())),
        fencing_token: Set(token),
        closed_at: Set(None),
        updated_at: Set(now.fixed_offset()),
        ..Default::default()
    })
    .exec(&txn)
    .await?;
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE review_tasks SET lease_holder_token = $2 WHERE id = $1",
        [task.id.into(), who.token.into()],
    ))
    .await?;
    // The label is gone; this row is what remembers that it was undone.
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO review_events (id, project_id, task_id, kind, reviewer, reviewer_token, \
         created_at) VALUES ($1, $2, $3, 'undo', $4, $5, $6)",
        [
            Uuid::now_v7().into(),
            task.project_id.into(),
            task.id.into(),
            reviewer.into(),
            who.token.into(),
            now.fixed_offset().into(),
        ],
    ))
    .await?;
    // Back in review, unless this was a second opinion: then the first
    // label is the item's label again, and the item stays human-labeled.
    let state = if task.reason == TaskReason::SecondOpinion {
        ItemState::HumanLabeled
    } else {
        ItemState::InReview
    };
    item::Entity::update(item::ActiveModel {
        id: Set(item.id),
        state: Set(state),
        updated_at: Set(now.fixed_offset()),
        ..Default::default()
    })
    .exec(&txn)
    .await?;
    txn.commit().await?;
    metrics::counter!("sieve_review_submits_undone_total").increment(1);
    tracing::info!(task = %task_id, reviewer, "review submit undone");

    let project = projects::get(db, &task.project_id.to_string()).await?;
    claimed_view(db, &project, &ClaimRow::from(&task), token, expires, lease).await
}

/// A review task as anyone allowed to review sees it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskView {
    pub task_id: Uuid,
    pub project: String,
    pub state: TaskState,
    pub reason: TaskReason,
    pub priority: f32,
    pub item_id: Uuid,
    pub object_key: String,
    pub source: String,
    pub image_url: String,
    pub class_names: Vec<String>,
    pub predicted_class: Option<String>,
    pub probabilities: Option<Vec<f32>>,
    /// The top class of each committee member.
    pub member_votes: Option<Vec<u32>>,
    pub confidence: Option<f32>,
    pub lease_holder: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Only shown to the lease holder: with it one can submit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<i64>,
    pub skip_count: i32,
    pub last_skip_reason: Option<String>,
    pub last_skipped_by: Option<String>,
    pub last_skipped_at: Option<DateTime<Utc>>,
    /// The human label this task produced, once submitted.
    pub label: Option<TaskLabel>,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskLabel {
    pub label_id: Uuid,
    /// The class (classification).
    pub class_index: Option<i32>,
    pub class: Option<String>,
    /// The boxes (detection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boxes: Option<Vec<NamedBox>>,
    pub reviewer: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(FromQueryResult)]
struct SkipRecord {
    skip_count: i32,
    last_skip_reason: Option<String>,
    last_skipped_by: Option<String>,
    last_skipped_at: Option<DateTime<FixedOffset>>,
}

/// One review task, its item and the model's proposal, as `viewer` may see
/// it.
pub async fn show(
    db: &DatabaseConnection,
    task_id: TaskId,
    viewer: impl Into<Reviewer<'_>>,
) -> AppResult<TaskView> {
    let viewer = viewer.into();
    let task = review_task::Entity::find_by_id(task_id.as_uuid())
        .one(db)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no review task {task_id}")))?;
    let project = projects::get(db, &task.project_id.to_string()).await?;
    let (item, prediction) = item_and_prediction(db, &ClaimRow::from(&task)).await?;
    let proposal = proposal(&project, prediction.as_ref());
    let skips = SkipRecord::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT skip_count, last_skip_reason, last_skipped_by, last_skipped_at \
         FROM review_tasks WHERE id = $1",
        [task.id.into()],
    ))
    .one(db)
    .await?
    .ok_or_else(|| AppError::NotFound(format!("no review task {task_id}")))?;
    let label = label::Entity::find()
        .filter(label::Column::ReviewTaskId.eq(task.id))
        .one(db)
        .await?
        .map(|l| TaskLabel {
            label_id: l.id,
            class_index: l.class_index,
            class: l
                .class_index
                .and_then(|index| classification::class_name(&project.class_names, index))
                .map(str::to_owned),
            boxes: l
                .boxes
                .as_ref()
                .and_then(detection::from_json)
                .map(|b| detection::named(&project.class_names, &b)),
            reviewer: l.reviewer,
            created_at: utc(l.created_at),
        });
    let holds = task.state == TaskState::Claimed && Holder::of(db, task_id).await?.is(viewer);
    Ok(TaskView {
        task_id: task.id,
        project: project.name.clone(),
        state: task.state,
        reason: task.reason,
        priority: task.priority,
        item_id: item.id,
        image_url: image_url(item.id),
        object_key: item.object_key,
        source: item.source,
        class_names: project.class_names.clone(),
        predicted_class: proposal.predicted_class,
        probabilities: proposal.probabilities,
        member_votes: proposal.member_votes,
        confidence: proposal.confidence,
        lease_holder: task.lease_holder,
        lease_expires_at: task.lease_expires_at.map(utc),
        fencing_token: holds.then_some(task.fencing_token),
        skip_count: skips.skip_count,
        last_skip_reason: skips.last_skip_reason,
        last_skipped_by: skips.last_skipped_by,
        last_skipped_at: skips.last_skipped_at.map(utc),
        label,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_reasons_are_one_short_line() {
        assert_eq!(skip_reason("  blurry \n").unwrap_or_default(), "blurry");
        assert!(matches!(skip_reason("   "), Err(AppError::Invalid(_))));
        assert!(matches!(skip_reason("a\u{7}b"), Err(AppError::Invalid(_))));
        assert!(matches!(
            skip_reason("two\nlines"),
            Err(AppError::Invalid(_))
        ));
        let long = "x".repeat(MAX_SKIP_REASON_CHARS + 1);
        assert!(matches!(skip_reason(&long), Err(AppError::Invalid(_))));
        let at_limit = "é".repeat(MAX_SKIP_REASON_CHARS);
        assert!(
            skip_reason(&at_limit).is_ok(),
            "the limit counts characters"
        );
    }
}
