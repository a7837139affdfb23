//! The human review queue, in PostgreSQL.
//!
//! A claim takes the most uncertain open task (or one whose lease expired)
//! with `FOR UPDATE SKIP LOCKED`, so concurrent reviewers never get the same
//! task and never wait on each other. Each claim bumps the task's fencing
//! token; a submit must present the current token, so a reviewer whose lease
//! was taken over cannot overwrite the new holder's work (409). A submit
//! with the current token is accepted even after the lease time has passed,
//! as long as nobody else claimed the task: the work is not thrown away.

use chrono::{Duration, Utc};
use sea_orm::sea_query::{Expr, LockBehavior, LockType};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, DatabaseConnection, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};
use serde::{Deserialize, Serialize};
use sieve_shared::ids::TaskId;
use uuid::Uuid;

use crate::entities::item::{self, ItemState};
use crate::entities::label::{self, LabelSource};
use crate::entities::prediction;
use crate::entities::review_task::{self, TaskReason, TaskState};
use crate::error::{AppError, AppResult};
use crate::projects::{self, Project};

/// A claimed task with what a reviewer needs to decide.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClaimedTask {
    pub task_id: Uuid,
    pub fencing_token: i64,
    pub lease_expires_at: chrono::DateTime<Utc>,
    pub project: String,
    pub item_id: Uuid,
    pub object_key: String,
    pub source: String,
    pub reason: TaskReason,
    pub class_names: Vec<String>,
    /// The model's proposal, if it made one.
    pub predicted_class: Option<String>,
    pub probabilities: Option<Vec<f32>>,
    pub member_votes: Option<Vec<u32>>,
    pub confidence: Option<f32>,
    /// Tasks still open in this project, this one excluded.
    pub remaining: u64,
}

/// Claim the next task of `project` for `reviewer`, or `None` when the queue
/// is empty.
pub async fn claim_next(
    db: &DatabaseConnection,
    project: &Project,
    reviewer: &str,
    lease: std::time::Duration,
) -> AppResult<Option<ClaimedTask>> {
    let txn = db.begin().await?;
    let now = Utc::now();
    let claimable = Condition::any()
        .add(review_task::Column::State.eq(TaskState::Open))
        .add(
            Condition::all()
                .add(review_task::Column::State.eq(TaskState::Claimed))
                .add(review_task::Column::LeaseExpiresAt.lt(now.fixed_offset())),
        );
    let Some(task) = review_task::Entity::find()
        .filter(review_task::Column::ProjectId.eq(project.id.as_uuid()))
        .filter(claimable)
        .order_by_desc(review_task::Column::Priority)
        .order_by_asc(review_task::Column::CreatedAt)
        .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
        .one(&txn)
        .await?
    else {
        txn.commit().await?;
        return Ok(None);
    };

    let expires = now + Duration::from_std(lease).unwrap_or(Duration::minutes(5));
    let token = task.fencing_token + 1;
    review_task::Entity::update(review_task::ActiveModel {
        id: Set(task.id),
        state: Set(TaskState::Claimed),
        lease_holder: Set(Some(reviewer.to_owned())),
        lease_expires_at: Set(Some(expires.fixed_offset())),
        fencing_token: Set(token),
        updated_at: Set(now.fixed_offset()),
        ..Default::default()
    })
    .exec(&txn)
    .await?;
    txn.commit().await?;
    metrics::counter!("sieve_review_tasks_claimed_total").increment(1);

    let item = item::Entity::find_by_id(task.item_id)
        .one(db)
        .await?
        .ok_or_else(|| anyhow::anyhow!("task {} points at a missing item", task.id))?;
    let prediction = match task.prediction_id {
        Some(id) => prediction::Entity::find_by_id(id).one(db).await?,
        None => None,
    };
    let remaining = review_task::Entity::find()
        .filter(review_task::Column::ProjectId.eq(project.id.as_uuid()))
        .filter(review_task::Column::State.eq(TaskState::Open))
        .count(db)
        .await?;

    Ok(Some(ClaimedTask {
        task_id: task.id,
        fencing_token: token,
        lease_expires_at: expires,
        project: project.name.clone(),
        item_id: item.id,
        object_key: item.object_key,
        source: item.source,
        reason: task.reason,
        class_names: project.class_names.clone(),
        predicted_class: prediction
            .as_ref()
            .and_then(|p| project.class_names.get(p.top_class as usize).cloned()),
        probabilities: prediction
            .as_ref()
            .and_then(|p| serde_json::from_value(p.probabilities.clone()).ok()),
        member_votes: prediction
            .as_ref()
            .and_then(|p| serde_json::from_value(p.member_votes.clone()).ok()),
        confidence: prediction.as_ref().map(|p| p.confidence),
        remaining,
    }))
}

/// A reviewer's answer to a claimed task.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Submission {
    pub fencing_token: i64,
    /// Class name (or index) chosen by the reviewer.
    pub class: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubmittedLabel {
    pub label_id: Uuid,
    pub item_id: Uuid,
    pub class_index: u32,
    pub class: String,
}

fn stale(task: &review_task::Model, token: i64) -> AppError {
    AppError::Conflict(format!(
        "task {} is no longer yours: its lease moved on (token {token}, current {}, state {:?}); nothing was written",
        task.id, task.fencing_token, task.state
    ))
}

/// Store a human label for a claimed task and close it.
pub async fn submit(
    db: &DatabaseConnection,
    task_id: TaskId,
    reviewer: &str,
    submission: &Submission,
) -> AppResult<SubmittedLabel> {
    let txn = db.begin().await?;
    let task = review_task::Entity::find_by_id(task_id.as_uuid())
        .lock_exclusive()
        .one(&txn)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no review task {task_id}")))?;
    if task.state != TaskState::Claimed || task.fencing_token != submission.fencing_token {
        return Err(stale(&task, submission.fencing_token));
    }
    let project = projects::get(db, &task.project_id.to_string()).await?;
    let class_index = project.class_index(&submission.class)?;
    let now = Utc::now().fixed_offset();

    let label_id = Uuid::now_v7();
    label::Entity::insert(label::ActiveModel {
        id: Set(label_id),
        item_id: Set(task.item_id),
        class_index: Set(class_index as i32),
        source: Set(LabelSource::Human),
        reviewer: Set(Some(reviewer.to_owned())),
        prediction_id: Set(task.prediction_id),
        model_version_id: Set(None),
        review_task_id: Set(Some(task.id)),
        created_at: Set(now),
    })
    .exec_without_returning(&txn)
    .await?;
    review_task::Entity::update(review_task::ActiveModel {
        id: Set(task.id),
        state: Set(TaskState::Done),
        closed_at: Set(Some(now)),
        updated_at: Set(now),
        ..Default::default()
    })
    .exec(&txn)
    .await?;
    item::Entity::update(item::ActiveModel {
        id: Set(task.item_id),
        state: Set(ItemState::HumanLabeled),
        updated_at: Set(now),
        ..Default::default()
    })
    .exec(&txn)
    .await?;
    txn.commit().await?;
    metrics::counter!("sieve_review_tasks_submitted_total").increment(1);

    Ok(SubmittedLabel {
        label_id,
        item_id: task.item_id,
        class_index,
        class: project.class_names[class_index as usize].clone(),
    })
}

/// Give a claimed task back to the queue unchanged.
pub async fn release(
    db: &DatabaseConnection,
    task_id: TaskId,
    fencing_token: i64,
) -> AppResult<()> {
    let updated = review_task::Entity::update_many()
        .col_expr(review_task::Column::State, Expr::value(TaskState::Open))
        .col_expr(
            review_task::Column::LeaseHolder,
            Expr::value(Option::<String>::None),
        )
        .col_expr(
            review_task::Column::LeaseExpiresAt,
            Expr::value(Option::<chrono::DateTime<chrono::FixedOffset>>::None),
        )
        .filter(review_task::Column::Id.eq(task_id.as_uuid()))
        .filter(review_task::Column::State.eq(TaskState::Claimed))
        .filter(review_task::Column::FencingToken.eq(fencing_token))
        .exec(db)
        .await?;
    if updated.rows_affected == 0 {
        let task = review_task::Entity::find_by_id(task_id.as_uuid())
            .one(db)
            .await?
            .ok_or_else(|| AppError::NotFound(format!("no review task {task_id}")))?;
        return Err(stale(&task, fencing_token));
    }
    Ok(())
}
