//! The model registry: versions, promotion, rollback, activation.
//!
//! Activation is one transaction (retire the champion, activate the new
//! version, point the project at it), then two effects that are safe to
//! repeat: the activation notice on the control fanout, and the rescore
//! (re-dispatching every item the new version has not predicted yet, human
//! labels excepted).

use chrono::Utc;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement, TransactionTrait,
};
use serde::Serialize;
use sieve_shared::messages::{ControlCommand, ControlMessage, HoldoutMetrics, SCHEMA_VERSION};
use uuid::Uuid;

use crate::context::Context;
use crate::dispatch;
use crate::entities::model_version::{self, VersionStatus};
use crate::entities::project;
use crate::error::{AppError, AppResult};
use crate::projects::{self, Project};
use crate::training::gate;

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct VersionSummary {
    pub id: Uuid,
    pub version: i32,
    pub status: VersionStatus,
    pub holdout_accuracy: Option<f64>,
    /// A detector's average precision at IoU 0.5 on its holdout (its
    /// `holdout_accuracy` is the share of holdout images it got wholly
    /// right).
    pub average_precision: Option<f64>,
    pub holdout_size: Option<u32>,
    pub train_size: Option<u32>,
    pub status_reason: Option<String>,
    pub created_at: chrono::DateTime<chrono::FixedOffset>,
}

fn metrics_of(version: &model_version::Model) -> Option<HoldoutMetrics> {
    version
        .metrics
        .as_ref()
        .and_then(|m| serde_json::from_value(m.clone()).ok())
}

impl From<&model_version::Model> for VersionSummary {
    fn from(v: &model_version::Model) -> Self {
        let metrics = metrics_of(v);
        Self {
            id: v.id,
            version: v.version,
            status: v.status,
            holdout_accuracy: metrics.as_ref().and_then(|m| m.accuracy),
            average_precision: metrics.as_ref().and_then(|m| m.average_precision),
            holdout_size: metrics.as_ref().map(|m| m.holdout_size),
            train_size: metrics.as_ref().map(|m| m.train_size),
            status_reason: v.status_reason.clone(),
            created_at: v.created_at,
        }
    }
}

pub async fn list(ctx: &Context, project: &Project) -> AppResult<Vec<VersionSummary>> {
    let versions = model_version::Entity::find()
        .filter(model_version::Column::ProjectId.eq(project.id.as_uuid()))
        .order_by_asc(model_version::Column::Version)
        .all(&ctx.db)
        .await?;
    Ok(versions.iter().map(VersionSummary::from).collect())
}

/// One version in full: its summary and what its holdout says.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct VersionDetail {
    #[serde(flatten)]
    pub summary: VersionSummary,
    /// Accuracy of the version it started from, on this version's holdout.
    pub base_accuracy: Option<f64>,
    pub quality: Option<crate::training::evaluation::Quality>,
}

/// A version with per-class precision/recall, calibration error and the
/// machine share the project's current policy would reach with it.
pub async fn show(ctx: &Context, project: &Project, version: i32) -> AppResult<VersionDetail> {
    let found = find_version(ctx, project, version).await?;
    let metrics = metrics_of(&found);
    Ok(VersionDetail {
        summary: VersionSummary::from(&found),
        base_accuracy: metrics.as_ref().and_then(|m| m.base_accuracy),
        quality: metrics.filter(|m| !m.evaluations.is_empty()).map(|m| {
            crate::training::evaluation::quality(&m, &project.class_names, &project.policy)
        }),
    })
}

async fn find_version(
    ctx: &Context,
    project: &Project,
    version: i32,
) -> AppResult<model_version::Model> {
    model_version::Entity::find()
        .filter(model_version::Column::ProjectId.eq(project.id.as_uuid()))
        .filter(model_version::Column::Version.eq(version))
        .one(&ctx.db)
        .await?
        .ok_or_else(|| {
            AppError::NotFound(format!(
                "project {} has no model version {version}; `sieve models list` shows them",
                project.name
            ))
        })
}

/// Whose decision an activation carries out.
#[derive(Clone, Copy, Debug)]
enum Decision {
    /// A person's (promote, rollback): whatever is active is replaced.
    Person,
    /// The automatic promotion, decided against `champion`: carried out only
    /// while that is still the active version, so that it never overrides a
    /// promotion or rollback a person made while the candidate was judged.
    Automatic { champion: Option<Uuid> },
}

/// Make `version_id` the project's active model, notify the fleet and
/// rescore. Returns the number of items re-dispatched.
pub async fn activate(ctx: &Context, project: &Project, version_id: Uuid) -> AppResult<usize> {
    Ok(activate_as(ctx, project, version_id, Decision::Person)
        .await?
        .unwrap_or(0))
}

/// [`activate`] on `decision`'s behalf; `None` when an automatic decision
/// was overtaken (the champion it was judged against is no longer active).
///
/// Activations of one project are serialized on its row: two at once (a
/// person's promotion racing an automatic one) would otherwise both retire
/// the champion they saw and both activate their own version, and the one
/// committing second would fail on the one-active-version index.
async fn activate_as(
    ctx: &Context,
    project: &Project,
    version_id: Uuid,
    decision: Decision,
) -> AppResult<Option<usize>> {
    let txn = ctx.db.begin().await?;
    let current = project::Entity::find_by_id(project.id.as_uuid())
        .lock_exclusive()
        .one(&txn)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no project {}", project.name)))?;
    if let Decision::Automatic { champion } = decision
        && current.active_model_version_id != champion
    {
        txn.rollback().await?;
        // A person may have promoted this very version meanwhile.
        let done = current.active_model_version_id == Some(version_id);
        return Ok(done.then_some(0));
    }
    let target = model_version::Entity::find_by_id(version_id)
        .lock_exclusive()
        .one(&txn)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no model version {version_id}")))?;
    if target.artifact_key.is_none()
        || matches!(
            target.status,
            VersionStatus::Training | VersionStatus::Failed
        )
    {
        return Err(AppError::Conflict(format!(
            "model version {} is {:?} and cannot be activated",
            target.version, target.status
        )));
    }
    let now = Utc::now().fixed_offset();
    // What the rescore below covers: the items committed so far. Ingest
    // batches hold the project's row in share mode, so none is half in;
    // those after this one read the new model and publish with it.
    let through = newest_item(&txn, project).await?;
    model_version::Entity::update_many()
        .col_expr(
            model_version::Column::Status,
            sea_orm::sea_query::Expr::value(VersionStatus::Retired),
        )
        .filter(model_version::Column::ProjectId.eq(project.id.as_uuid()))
        .filter(model_version::Column::Status.eq(VersionStatus::Active))
        .filter(model_version::Column::Id.ne(version_id))
        .exec(&txn)
        .await?;
    model_version::Entity::update(model_version::ActiveModel {
        id: Set(version_id),
        status: Set(VersionStatus::Active),
        activated_at: Set(Some(now)),
        ..Default::default()
    })
    .exec(&txn)
    .await?;
    project::Entity::update(project::ActiveModel {
        id: Set(project.id.as_uuid()),
        active_model_version_id: Set(Some(version_id)),
        updated_at: Set(now),
        ..Default::default()
    })
    .exec(&txn)
    .await?;
    txn.commit().await?;
    tracing::info!(project = %project.name, version = target.version, "model version activated");
    metrics::counter!("sieve_model_activations_total").increment(1);
    metrics::gauge!("sieve_model_version_active", "project" => project.name.clone())
        .set(f64::from(target.version));

    let model = dispatch::model_ref(&target)?;
    ctx.publisher
        .publish(&ControlMessage {
            schema: SCHEMA_VERSION,
            command: ControlCommand::Activate {
                project_id: project.id,
                model,
            },
        })
        .await
        .map_err(anyhow::Error::from)?;
    // Reload: the project now points at the new version.
    let project = projects::get(&ctx.db, &project.id.to_string()).await?;
    Ok(Some(
        dispatch::dispatch_rescore(ctx, &project, through).await?,
    ))
}

/// The newest item of `project` (ids are time-ordered), if it has any.
async fn newest_item(db: &impl ConnectionTrait, project: &Project) -> AppResult<Option<Uuid>> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            // PostgreSQL has no max(uuid); the newest of a time-ordered id.
            "SELECT id FROM items WHERE project_id = $1 ORDER BY id DESC LIMIT 1",
            [project.id.as_uuid().into()],
        ))
        .await?;
    Ok(match row {
        Some(row) => Some(row.try_get::<Uuid>("", "id")?),
        None => None,
    })
}

/// Promote a version by number (the ML team's manual override).
pub async fn promote(ctx: &Context, project: &Project, version: i32) -> AppResult<usize> {
    let target = find_version(ctx, project, version).await?;
    activate(ctx, project, target.id).await
}

/// Re-activate the version that was active before the current one.
pub async fn rollback(ctx: &Context, project: &Project) -> AppResult<i32> {
    let previous = model_version::Entity::find()
        .filter(model_version::Column::ProjectId.eq(project.id.as_uuid()))
        .filter(model_version::Column::Status.eq(VersionStatus::Retired))
        .filter(model_version::Column::ActivatedAt.is_not_null())
        .order_by_desc(model_version::Column::ActivatedAt)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| {
            AppError::Conflict(format!(
                "project {} has no earlier active version to roll back to",
                project.name
            ))
        })?;
    activate(ctx, project, previous.id).await?;
    Ok(previous.version)
}

/// Decide whether a freshly trained candidate replaces the champion: it does
/// when there is no champion, or unless its holdout accuracy is below the
/// champion's by more than `training.promotion_margin` and by more than the
/// holdout's sampling noise explains ([`gate::judge`]). The champion's figure is
/// the one measured on the candidate's own holdout when the run started from
/// the current champion (the fair comparison); otherwise the accuracy the
/// champion recorded when it was trained. The champion is `project`'s active
/// version as read by the caller; if a person promotes or rolls back before
/// the candidate is activated, the candidate stays a candidate with that
/// reason rather than overriding them.
pub async fn consider_promotion(
    ctx: &Context,
    project: &Project,
    candidate_id: Uuid,
) -> AppResult<bool> {
    let candidate = model_version::Entity::find_by_id(candidate_id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no model version {candidate_id}")))?;
    let champion = match project.active_model_version_id {
        Some(id) => model_version::Entity::find_by_id(id).one(&ctx.db).await?,
        None => None,
    };
    let candidate_metrics = metrics_of(&candidate);
    let candidate_accuracy = candidate_metrics.as_ref().and_then(|m| m.accuracy);
    let same_holdout = champion.is_some() && candidate.parent_id == project.active_model_version_id;
    let (champion_accuracy, basis) = match candidate_metrics.as_ref().and_then(|m| m.base_accuracy)
    {
        Some(base) if same_holdout => (Some(base), "on the same holdout"),
        _ => (
            champion
                .as_ref()
                .and_then(metrics_of)
                .and_then(|m| m.accuracy),
            "as recorded at its training",
        ),
    };
    let margin = ctx.settings.training.promotion_margin;
    // The holdouts' sizes, or the same holdout example by example.
    let evidence = match candidate_metrics.as_ref() {
        Some(m) if same_holdout && m.base_accuracy.is_some() => match m.paired {
            Some(paired) => gate::Evidence::Paired(paired),
            None => gate::Evidence::Unpaired {
                champion: m.holdout_size,
                candidate: m.holdout_size,
            },
        },
        m => gate::Evidence::Unpaired {
            champion: champion
                .as_ref()
                .and_then(metrics_of)
                .map_or(0, |c| c.holdout_size),
            candidate: m.map_or(0, |m| m.holdout_size),
        },
    };
    let judgement = match (champion_accuracy, candidate_accuracy) {
        _ if champion.is_none() => None,
        (None, _) => None,
        (Some(_), None) => Some(gate::Judgement {
            promote: false,
            test: "the candidate has no holdout accuracy".into(),
        }),
        (Some(champion), Some(candidate)) => {
            Some(gate::judge(champion, candidate, margin, evidence))
        }
    };
    let decision = Decision::Automatic {
        champion: project.active_model_version_id,
    };
    let reason = if let Some(refused) = judgement.filter(|j| !j.promote) {
        format!(
            "not promoted: holdout accuracy {} is below the champion's {} ({basis}, margin {margin}) beyond chance ({})",
            candidate_accuracy.map_or("unmeasured".into(), |a| format!("{a:.4}")),
            champion_accuracy.map_or("unmeasured".into(), |a| format!("{a:.4}")),
            refused.test,
        )
    } else if activate_as(ctx, project, candidate_id, decision)
        .await?
        .is_none()
    {
        "not promoted: another version was made active while this one was judged against the champion; `sieve models promote` it to use it".to_owned()
    } else {
        return Ok(true);
    };
    tracing::info!(project = %project.name, version = candidate.version, %reason);
    model_version::Entity::update(model_version::ActiveModel {
        id: Set(candidate_id),
        status_reason: Set(Some(reason)),
        ..Default::default()
    })
    .exec(&ctx.db)
    .await?;
    Ok(false)
}
