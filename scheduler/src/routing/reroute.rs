//! Re-routing what waits for review when a project's policy changes.
//!
//! A policy change (a target, a threshold, pooling) changes which of the
//! items already in review the active model may label: without this pass
//! they stayed in review until the next version's rescore. The pass routes
//! each waiting item again by its stored prediction from the active
//! version, under the policy as it is now (`route::decide` and
//! `route::write`, the same code a fresh result goes through), so it costs no worker time.
//!
//! An item is waiting when it is `in_review` and its active-version
//! prediction was routed under an older policy version; the pass takes them
//! a chunk at a time, each chunk in its own transaction with its items
//! locked in id order (as result batches lock them), and re-reads the
//! project in each chunk. It is safe to run twice at once or to stop
//! halfway: a routed prediction carries the policy version it was routed
//! under, so nothing is routed twice under the same policy, and
//! `projects.rerouted_policy_version` only advances once a pass finishes.
//! The HTTP handler starts a pass at once; the background sweep
//! ([`sweep`]) finishes any a restart cut short. Claimed tasks stay with
//! their holder.

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, FromQueryResult, QueryFilter,
    Statement, TransactionTrait,
};
use serde::Serialize;
use sieve_shared::box_scores::ImageScores;
use sieve_shared::scores::Scores;
use uuid::Uuid;

use crate::entities::item::ItemState;
use crate::entities::{prediction, project};
use crate::projects::Project;
use crate::routing::route::{self, ActiveModel, Applied, Decided, Routed};

/// Items routed per transaction.
const CHUNK: usize = 500;

/// The waiting items of a project whose prediction by `$2` (the active
/// version) was routed under a policy older than `$3`.
const WAITING: &str = r#"
SELECT i.id FROM items i
JOIN predictions p ON p.item_id = i.id AND p.model_version_id = $2
WHERE i.project_id = $1 AND i.state = 'in_review'
  AND (p.policy_version IS NULL OR p.policy_version < $3)
ORDER BY i.id
"#;

/// What a pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rerouted {
    /// The policy version the pass brought the waiting items to.
    pub policy_version: i32,
    /// Waiting items the active model now labels.
    pub machine_labeled: u64,
    /// Still in review (perhaps for another reason, or asked first as a
    /// random check).
    pub review: u64,
    /// Left as they were: claimed by a reviewer, or reported.
    pub kept: u64,
}

#[derive(FromQueryResult)]
struct Id {
    id: Uuid,
}

/// Re-route the waiting items of project `project_id` under its current
/// policy. `None` when the project is gone.
pub async fn reroute(
    db: &DatabaseConnection,
    project_id: Uuid,
) -> anyhow::Result<Option<Rerouted>> {
    let Some(model) = project::Entity::find_by_id(project_id).one(db).await? else {
        return Ok(None);
    };
    let project = Project::from_model(model)?;
    let mut done = Rerouted {
        policy_version: project.policy_version,
        ..Rerouted::default()
    };
    let Some(active) = project.active_model_version_id else {
        // Nothing is predicted yet: the first results route under this policy.
        mark_rerouted(db, project_id, project.policy_version).await?;
        return Ok(Some(done));
    };
    let ids: Vec<Uuid> = Id::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        WAITING,
        [
            project_id.into(),
            active.into(),
            project.policy_version.into(),
        ],
    ))
    .all(db)
    .await?
    .into_iter()
    .map(|row| row.id)
    .collect();
    for chunk in ids.chunks(CHUNK) {
        let txn = db.begin().await?;
        let items = route::lock_items(&txn, chunk).await?;
        let Some(model) = project::Entity::find_by_id(project_id).one(&txn).await? else {
            return Ok(None);
        };
        let current = Project::from_model(model)?;
        if current.active_model_version_id != Some(active) {
            // A new version was activated: its rescore routes every item
            // under the policy of its day.
            txn.commit().await?;
            break;
        }
        let routing = ActiveModel::of(&txn, &current).await?;
        let predictions: std::collections::HashMap<Uuid, prediction::Model> =
            prediction::Entity::find()
                .filter(prediction::Column::ItemId.is_in(chunk.iter().copied()))
                .filter(prediction::Column::ModelVersionId.eq(active))
                .all(&txn)
                .await?
                .into_iter()
                .map(|p| (p.item_id, p))
                .collect();
        let tasks = route::open_tasks(&txn, chunk).await?;
        let mut decided = Vec::new();
        for item in items {
            let Some(p) = predictions.get(&item.id) else {
                continue;
            };
            let stale = p.policy_version.is_none_or(|v| v < current.policy_version);
            if item.state != ItemState::InReview || !stale {
                continue;
            }
            let scores = Scores {
                top_class: u32::try_from(p.top_class).unwrap_or(0),
                confidence: p.confidence,
                margin: p.margin,
                entropy: p.entropy,
                disagreement: p.disagreement,
                mutual_information: p.mutual_information,
            };
            let detections = p
                .detections
                .as_ref()
                .and_then(|d| serde_json::from_value::<ImageScores>(d.clone()).ok());
            let routed = Routed {
                prediction_id: p.id,
                version_id: active,
                scores: &scores,
                proposal: detections.as_ref().map(ImageScores::labeled_boxes),
                possible_miss: detections.as_ref().is_some_and(ImageScores::possible_miss),
            };
            let outcome = route::decide(&current, &routing, &item, tasks.get(&item.id), &routed);
            match outcome.applied() {
                Applied::MachineLabeled => done.machine_labeled += 1,
                Applied::SentToReview => done.review += 1,
                _ => done.kept += 1,
            }
            decided.push(Decided {
                project_id,
                item_id: item.id,
                prediction_id: p.id,
                version_id: active,
                policy_version: current.policy_version,
                outcome,
            });
        }
        route::write(&txn, &decided).await?;
        route::mark_routed(&txn, &decided).await?;
        txn.commit().await?;
    }
    mark_rerouted(db, project_id, project.policy_version).await?;
    metrics::counter!("sieve_rerouted_total", "outcome" => "machine_labeled")
        .increment(done.machine_labeled);
    metrics::counter!("sieve_rerouted_total", "outcome" => "review").increment(done.review);
    metrics::counter!("sieve_rerouted_total", "outcome" => "kept").increment(done.kept);
    tracing::info!(
        project = %project.name,
        policy_version = project.policy_version,
        machine_labeled = done.machine_labeled,
        review = done.review,
        kept = done.kept,
        "waiting items re-routed under the new policy"
    );
    Ok(Some(done))
}

async fn mark_rerouted(
    db: &impl ConnectionTrait,
    project: Uuid,
    version: i32,
) -> anyhow::Result<()> {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "UPDATE projects SET rerouted_policy_version = GREATEST(rerouted_policy_version, $2) WHERE id = $1",
        [project.into(), version.into()],
    ))
    .await?;
    Ok(())
}

/// Re-route every project whose waiting items lag behind its policy (a pass
/// that a restart cut short). Run by the background sweep.
pub async fn sweep(db: &DatabaseConnection) -> anyhow::Result<()> {
    let lagging = Id::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        "SELECT id FROM projects WHERE rerouted_policy_version < policy_version",
    ))
    .all(db)
    .await?;
    for project in lagging {
        reroute(db, project.id).await?;
    }
    Ok(())
}

/// Start a pass in the background, as a policy change over HTTP does: the
/// answer does not wait for it, and the sweep finishes what it leaves.
pub fn spawn(db: DatabaseConnection, project_id: Uuid) {
    tokio::spawn(async move {
        if let Err(err) = reroute(&db, project_id).await {
            tracing::warn!(project = %project_id, error = format!("{err:#}"), "re-routing after a policy change failed; the background sweep retries");
        }
    });
}
