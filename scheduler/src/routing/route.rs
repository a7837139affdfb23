//! What routing does with one item, and the writes of a batch of such
//! decisions, set-wise.
//!
//! Deciding is pure: the item (locked by the caller), its open review task,
//! the project's policy and what routing knows of its active version go in;
//! an [`Outcome`] comes out ([`decide`]). Writing takes a whole batch of
//! outcomes at once ([`write`]): one multi-row insert of machine labels,
//! one of new review tasks, one update each of cancelled tasks,
//! re-prioritised tasks and item states. A batch so costs PostgreSQL a
//! handful of statements, not six per item; the result consumer
//! (`results.rs`) and the re-routing pass after a policy change
//! (`reroute.rs`) both go through here, so a prediction is routed by the
//! same rules whichever way it comes.
//!
//! A batch may hold each item once: the caller splits results for the same
//! item into successive batches, each decided on the state the one before
//! left.

use std::collections::HashMap;

use chrono::Utc;
use rand::Rng;
use sea_orm::{
    ActiveEnum, ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, FromQueryResult,
    QueryFilter, QueryOrder, QuerySelect, Statement,
};
use serde_json::{Value, json};
use sieve_shared::boxes::{self, LabeledBox};
use sieve_shared::scores::Scores;
use uuid::Uuid;

use crate::entities::item::{self, ItemState};
use crate::entities::label::LabelSource;
use crate::entities::review_task::{self, TaskReason, TaskState};
use crate::kind::{LabelValue, TaskKind};
use crate::policy::{Decision, Policy, decide as decide_by_policy, draws};
use crate::projects::Project;
use crate::routing::calibration::{self, Calibration};

/// What happened to one result; counted for metrics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    MachineLabeled,
    SentToReview,
    /// Stored, but routing left the item as it was (human-labeled, a claimed
    /// task, or a prediction by a version that is no longer active).
    Kept,
    Duplicate,
    Failed,
    /// The item no longer exists.
    UnknownItem,
}

impl Applied {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Applied::MachineLabeled => "machine_labeled",
            Applied::SentToReview => "review",
            Applied::Kept => "kept",
            Applied::Duplicate => "duplicate",
            Applied::Failed => "failed",
            Applied::UnknownItem => "unknown_item",
        }
    }
}

/// What routing needs to know about a project's active model.
#[derive(Default)]
pub(crate) struct ActiveModel {
    calibration: Option<Calibration>,
    /// Trained on nothing: route everything to review as a random seed set.
    untrained: bool,
}

impl ActiveModel {
    /// What routing knows about `project`'s active version (nothing without one).
    pub(crate) async fn of(txn: &impl ConnectionTrait, project: &Project) -> anyhow::Result<Self> {
        Ok(match project.active_model_version_id {
            Some(id) => ActiveModel {
                calibration: calibration::load(txn, id).await?,
                untrained: calibration::is_untrained(txn, id).await?,
            },
            None => ActiveModel::default(),
        })
    }

    /// The share of items sampled for random checks under `policy`: more
    /// than the audit rate while the version's calibration, for this very
    /// policy, is short of evidence.
    fn sample_rate(&self, policy: &Policy) -> f64 {
        self.calibration
            .as_ref()
            .filter(|c| c.is_for(policy))
            .and_then(|c| c.sample_rate)
            .unwrap_or(policy.audit_rate)
    }
}

/// A stored (or about to be stored) prediction, about to be routed.
pub(crate) struct Routed<'a> {
    pub prediction_id: Uuid,
    pub version_id: Uuid,
    pub scores: &'a Scores,
    /// A detector's proposed boxes: the label a machine-accepted image gets.
    pub proposal: Option<Vec<LabeledBox>>,
    /// Whether a box committee may have missed something
    /// (`ImageScores::possible_miss`): a recall-first kind never accepts
    /// such an image by machine.
    pub possible_miss: bool,
}

impl Routed<'_> {
    /// The label a machine acceptance writes for `project`'s item: the
    /// proposed class, or the proposed boxes if they fit the item (a
    /// detection prediction without a proposal, or with a box the image
    /// cannot hold, is no label at all).
    fn machine_label(
        &self,
        project: &Project,
        item: &item::Model,
        class_index: u32,
    ) -> Option<LabelValue> {
        match project.task_kind {
            TaskKind::Classification => Some(LabelValue::Class(class_index as i32)),
            TaskKind::Detection | TaskKind::Deidentify => {
                let boxes = self.proposal.clone()?;
                let (width, height) = (
                    u32::try_from(item.width?).ok()?,
                    u32::try_from(item.height?).ok()?,
                );
                match boxes::check(&boxes, project.class_names.len(), width, height) {
                    Ok(()) => Some(LabelValue::Boxes(boxes)),
                    Err(problem) => {
                        tracing::warn!(item = %item.id, %problem, "a proposal the image cannot hold; sent to review instead");
                        None
                    }
                }
            }
        }
    }
}

/// What routing does with one item.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Outcome {
    /// Left as it is: a retired version's prediction, an item people
    /// labeled, a claimed or reported task.
    Kept,
    /// A machine label; the open task, if any, is cancelled.
    Label {
        value: LabelValue,
        cancel_task: Option<Uuid>,
    },
    /// People decide: the open task (if any) is re-prioritised by this
    /// prediction, or a task is opened.
    Review {
        reason: TaskReason,
        priority: f32,
        open_task: Option<Uuid>,
    },
}

impl Outcome {
    pub(crate) fn applied(&self) -> Applied {
        match self {
            Outcome::Kept => Applied::Kept,
            Outcome::Label { .. } => Applied::MachineLabeled,
            Outcome::Review { .. } => Applied::SentToReview,
        }
    }

    /// The prediction's `routed_to`.
    pub(crate) fn routed_to(&self) -> &'static str {
        match self {
            Outcome::Kept => "kept",
            Outcome::Label { .. } => "auto_labeled",
            Outcome::Review { .. } => "review",
        }
    }
}

/// One item's route, as [`write`] takes it.
pub(crate) struct Decided {
    pub project_id: Uuid,
    pub item_id: Uuid,
    pub prediction_id: Uuid,
    pub version_id: Uuid,
    /// The policy version the item was routed under (`predictions.policy_version`).
    pub policy_version: i32,
    pub outcome: Outcome,
}

/// Route `item` by one of its predictions under `project`'s current policy.
/// `open_task` is the item's open or claimed review task, if any.
pub(crate) fn decide(
    project: &Project,
    active: &ActiveModel,
    item: &item::Model,
    open_task: Option<&review_task::Model>,
    routed: &Routed<'_>,
) -> Outcome {
    let scores = routed.scores;
    let is_active = project.active_model_version_id == Some(routed.version_id);
    let routable = matches!(
        item.state,
        ItemState::Queued | ItemState::InReview | ItemState::AutoLabeled
    );
    let claimed = open_task.is_some_and(|t| t.state == TaskState::Claimed);
    // Someone reported its label as wrong: people decide, not a model
    // (`items::reopen`).
    let reported = open_task.is_some_and(|t| t.reason == TaskReason::Reported);
    if !is_active || !routable || claimed || reported {
        return Outcome::Kept;
    }

    let threshold = calibration::threshold_for(
        &project.policy,
        scores.top_class,
        active.calibration.as_ref(),
    );
    let decision = if active.untrained {
        // An untrained committee's doubt is noise, and ordering by it would
        // bias the first labels toward whatever classes it happens to doubt.
        // Review in random order instead: the first labels are a random
        // sample of the data (the seed set).
        Decision::Review {
            reason: TaskReason::Seed,
            priority: rand::rng().random::<f32>(),
        }
    } else {
        decide_by_policy(
            &project.policy,
            scores,
            threshold,
            draws(project.id, &item.content_hash),
            active.sample_rate(&project.policy),
        )
    };
    let doubt = || Outcome::Review {
        reason: TaskReason::LowConfidence,
        priority: (1.0 - scores.confidence) + scores.disagreement,
        open_task: open_task.map(|t| t.id),
    };
    match decision {
        // Recall first: a possible miss is a possible privacy leak, so such
        // an image is neither accepted nor audited as if it would have been.
        Decision::MachineLabel { .. }
        | Decision::Review {
            reason: TaskReason::Audit,
            ..
        } if project.task_kind == TaskKind::Deidentify && routed.possible_miss => doubt(),
        // A machine acceptance needs a label to write; without one, people decide.
        Decision::MachineLabel { class_index } => {
            match routed.machine_label(project, item, class_index) {
                Some(value) => Outcome::Label {
                    value,
                    cancel_task: open_task.map(|t| t.id),
                },
                None => doubt(),
            }
        }
        Decision::Review { reason, priority } => Outcome::Review {
            reason,
            priority,
            open_task: open_task.map(|t| t.id),
        },
    }
}

/// Lock the items `ids` (sorted) in id order, as everything that locks
/// several items does, and read them.
pub(crate) async fn lock_items(
    txn: &DatabaseTransaction,
    ids: &[Uuid],
) -> anyhow::Result<Vec<item::Model>> {
    Ok(item::Entity::find()
        .filter(item::Column::Id.is_in(ids.iter().copied()))
        .order_by_asc(item::Column::Id)
        .lock_exclusive()
        .all(txn)
        .await?)
}

/// The open or claimed review task of each of the items `ids` (at most one
/// each: `review_tasks_one_open_per_item`), locked.
///
/// The states are written in the statement and the ids passed as one
/// array, so that every plan, generic ones and those made before the table
/// was ever analysed included, probes that partial unique index for the
/// batch's ids. With the states as parameters a cached generic plan cannot
/// use it, and with the ids as a joined set PostgreSQL may take every open
/// task and hash them: either way each batch then reads every open task
/// (`sieve-tools bench ceiling` saw routing fall from 3,200 to 1,200
/// results a second over 100,000 items).
pub(crate) async fn open_tasks(
    txn: &DatabaseTransaction,
    ids: &[Uuid],
) -> anyhow::Result<HashMap<Uuid, review_task::Model>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(review_task::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            txn.get_database_backend(),
            r#"
            SELECT id, project_id, item_id, prediction_id, reason, priority, state, lease_holder,
                   lease_expires_at, fencing_token, created_at, updated_at, closed_at
            FROM review_tasks
            WHERE item_id = ANY(ARRAY(SELECT value::uuid FROM jsonb_array_elements_text($1::jsonb)))
              AND state IN ('open', 'claimed')
            ORDER BY item_id
            FOR UPDATE
            "#,
            [serde_json::to_string(ids)?.into()],
        ))
        .all(txn)
        .await?
        .into_iter()
        .map(|task| (task.item_id, task))
        .collect())
}

/// Write a batch of routes (each item at most once): machine labels,
/// cancelled, re-prioritised and new review tasks, item states. The
/// predictions' own `routed_to` is the caller's: a fresh result is inserted
/// with it, a re-routed one updated by [`mark_routed`].
pub(crate) async fn write(txn: &DatabaseTransaction, batch: &[Decided]) -> anyhow::Result<()> {
    let mut labels = Vec::new();
    let mut cancelled = Vec::new();
    let mut reprioritised = Vec::new();
    let mut opened = Vec::new();
    let mut states = Vec::new();
    for d in batch {
        match &d.outcome {
            Outcome::Kept => {}
            Outcome::Label { value, cancel_task } => {
                labels.push(json!({
                    "id": Uuid::now_v7(),
                    "item_id": d.item_id,
                    "class_index": value.class_index(),
                    "boxes": value.boxes_json(),
                    "prediction_id": d.prediction_id,
                    "model_version_id": d.version_id,
                }));
                // The better model is now sure: nobody needs to look at it.
                cancelled.extend(*cancel_task);
                states.push(json!({"id": d.item_id, "state": ItemState::AutoLabeled.to_value()}));
            }
            Outcome::Review {
                reason,
                priority,
                open_task,
            } => {
                let task = json!({
                    "id": open_task.unwrap_or_else(Uuid::now_v7),
                    "project_id": d.project_id,
                    "item_id": d.item_id,
                    "prediction_id": d.prediction_id,
                    "reason": reason.to_value(),
                    "priority": real(*priority),
                });
                // An open task is re-prioritised by the newer model's doubt.
                match open_task {
                    Some(_) => reprioritised.push(task),
                    None => opened.push(task),
                }
                states.push(json!({"id": d.item_id, "state": ItemState::InReview.to_value()}));
            }
        }
    }
    let now = Utc::now().fixed_offset();
    if !labels.is_empty() {
        execute(
            txn,
            r#"
            INSERT INTO labels (id, item_id, class_index, boxes, source, reviewer,
                                prediction_id, model_version_id, review_task_id, created_at)
            SELECT r.id, r.item_id, r.class_index, r.boxes, $3, NULL,
                   r.prediction_id, r.model_version_id, NULL, $2
            FROM jsonb_to_recordset($1::jsonb) AS r(id uuid, item_id uuid, class_index int,
                 boxes jsonb, prediction_id uuid, model_version_id uuid)
            "#,
            labels,
            [now.into(), LabelSource::Machine.to_value().into()],
        )
        .await?;
    }
    if !cancelled.is_empty() {
        execute(
            txn,
            r#"
            UPDATE review_tasks SET state = $3, closed_at = $2, updated_at = $2
            WHERE id IN (SELECT value::uuid FROM jsonb_array_elements_text($1::jsonb))
            "#,
            cancelled.into_iter().map(|id| json!(id)).collect(),
            [now.into(), TaskState::Cancelled.to_value().into()],
        )
        .await?;
    }
    if !reprioritised.is_empty() {
        execute(
            txn,
            r#"
            UPDATE review_tasks t
            SET prediction_id = r.prediction_id, reason = r.reason, priority = r.priority,
                updated_at = $2
            FROM jsonb_to_recordset($1::jsonb) AS r(id uuid, prediction_id uuid, reason text,
                 priority real)
            WHERE t.id = r.id
            "#,
            reprioritised,
            [now.into()],
        )
        .await?;
    }
    if !opened.is_empty() {
        #[derive(FromQueryResult)]
        struct Opened {
            #[allow(dead_code)] // read only to count the rows
            id: Uuid,
        }
        let count = Opened::find_by_statement(Statement::from_sql_and_values(
            txn.get_database_backend(),
            r#"
            INSERT INTO review_tasks (id, project_id, item_id, prediction_id, reason, priority,
                                      state, lease_holder, lease_expires_at, fencing_token,
                                      created_at, updated_at, closed_at)
            SELECT r.id, r.project_id, r.item_id, r.prediction_id, r.reason, r.priority,
                   $3, NULL, NULL, 0, $2, $2, NULL
            FROM jsonb_to_recordset($1::jsonb) AS r(id uuid, project_id uuid, item_id uuid,
                 prediction_id uuid, reason text, priority real)
            ON CONFLICT DO NOTHING
            RETURNING id
            "#,
            [
                Value::Array(opened).to_string().into(),
                now.into(),
                TaskState::Open.to_value().into(),
            ],
        ))
        .all(txn)
        .await?
        .len();
        metrics::counter!("sieve_review_tasks_opened_total").increment(count as u64);
    }
    if !states.is_empty() {
        execute(
            txn,
            r#"
            UPDATE items i SET state = r.state, updated_at = $2
            FROM jsonb_to_recordset($1::jsonb) AS r(id uuid, state text)
            WHERE i.id = r.id
            "#,
            states,
            [now.into()],
        )
        .await?;
    }
    Ok(())
}

/// Mark stored predictions with their routes and the policy version they
/// were routed under.
pub(crate) async fn mark_routed(
    txn: &DatabaseTransaction,
    batch: &[Decided],
) -> anyhow::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let rows = batch
        .iter()
        .map(|d| {
            json!({
                "id": d.prediction_id,
                "routed_to": d.outcome.routed_to(),
                "policy_version": d.policy_version,
            })
        })
        .collect();
    execute(
        txn,
        r#"
        UPDATE predictions p SET routed_to = r.routed_to, policy_version = r.policy_version
        FROM jsonb_to_recordset($1::jsonb) AS r(id uuid, routed_to text, policy_version int)
        WHERE p.id = r.id
        "#,
        rows,
        [],
    )
    .await
}

/// Run `sql` with `rows` as `$1` (a JSON array) and `rest` as `$2`….
async fn execute(
    txn: &DatabaseTransaction,
    sql: &str,
    rows: Vec<Value>,
    rest: impl IntoIterator<Item = sea_orm::Value>,
) -> anyhow::Result<()> {
    let mut values = vec![sea_orm::Value::from(Value::Array(rows).to_string())];
    values.extend(rest);
    txn.execute_raw(Statement::from_sql_and_values(
        txn.get_database_backend(),
        sql,
        values,
    ))
    .await?;
    Ok(())
}

/// An `f32` as JSON that PostgreSQL reads back into a `real` exactly: a
/// number, or the text PostgreSQL spells a non-finite value with (JSON has
/// no NaN).
pub(crate) fn real(x: f32) -> Value {
    if x.is_finite() {
        json!(x)
    } else if x.is_nan() {
        json!("NaN")
    } else if x > 0.0 {
        json!("Infinity")
    } else {
        json!("-Infinity")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_is_a_number_or_the_text_postgresql_reads_as_one() {
        assert_eq!(real(0.1), json!(0.1f32));
        assert_eq!(real(0.1).as_f64().map(|x| x as f32), Some(0.1f32));
        assert_eq!(real(f32::NAN), json!("NaN"));
        assert_eq!(real(f32::INFINITY), json!("Infinity"));
        assert_eq!(real(f32::NEG_INFINITY), json!("-Infinity"));
    }
}
