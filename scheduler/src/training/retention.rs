//! Old snapshots leave the store. Every run writes a snapshot (its examples
//! as JSON, and for a heads run the embedding table beside it), a few
//! megabytes each; an automatic retrain every few hundred labels makes
//! thousands. Once a run has ended more than
//! `training.snapshot_retention_hours` ago, its objects are deleted and the
//! run is marked (`snapshot_removed_at`), except where its version is a
//! project's active one: what the serving model learned from stays. A run
//! that failed or was cancelled keeps nothing anyone needs.
//!
//! Runs in the one scheduler holding the background lease, with the
//! watchdog's sweep, a bounded batch at a time.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, FromQueryResult, Statement};
use uuid::Uuid;

use crate::context::Context;

/// Runs handled per sweep: a backlog drains over a few sweeps.
const BATCH: i64 = 200;

/// What a run's snapshot left in the store: the snapshot and, beside it,
/// the embedding table a heads run reads (absent for other runs).
pub fn snapshot_objects(snapshot_key: &str) -> [String; 2] {
    let stem = snapshot_key.strip_suffix(".json").unwrap_or(snapshot_key);
    [snapshot_key.to_owned(), format!("{stem}.embeddings.f32")]
}

#[derive(FromQueryResult)]
struct Expired {
    id: Uuid,
    snapshot_key: String,
}

/// Finished runs past the retention whose snapshot is still kept, their
/// version not active anywhere.
const EXPIRED: &str = r#"
SELECT r.id, r.snapshot_key FROM training_runs r
WHERE r.snapshot_removed_at IS NULL AND r.finished_at IS NOT NULL
  AND r.finished_at < now() - make_interval(secs => $1)
  AND NOT EXISTS (SELECT 1 FROM projects p WHERE p.active_model_version_id = r.model_version_id)
ORDER BY r.finished_at
LIMIT $2
"#;

/// Remove the snapshots past the retention; the runs whose snapshots went.
pub async fn sweep(ctx: &Context) -> anyhow::Result<Vec<Uuid>> {
    let retention = Duration::from_secs(ctx.settings.training.snapshot_retention_hours * 3600);
    let expired = Expired::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        EXPIRED,
        [retention.as_secs_f64().into(), BATCH.into()],
    ))
    .all(&ctx.db)
    .await?;
    let mut removed = Vec::with_capacity(expired.len());
    'runs: for run in expired {
        for key in snapshot_objects(&run.snapshot_key) {
            // Gone already is fine: a run without embeddings, a sweep cut
            // short. Marked only once every object is gone: after an error
            // the next sweep tries again.
            if let Err(err) = ctx.store.delete(&key).await {
                tracing::warn!(run = %run.id, key, error = %err, "could not remove an old snapshot; will retry");
                continue 'runs;
            }
        }
        let marked = ctx
            .db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE training_runs SET snapshot_removed_at = now() WHERE id = $1",
                [run.id.into()],
            ))
            .await;
        match marked {
            Ok(_) => removed.push(run.id),
            Err(err) => {
                tracing::warn!(run = %run.id, error = %err, "could not mark a removed snapshot")
            }
        }
    }
    if !removed.is_empty() {
        tracing::info!(
            runs = removed.len(),
            retention_hours = ctx.settings.training.snapshot_retention_hours,
            "old training snapshots removed from the store"
        );
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_and_its_embedding_table() {
        assert_eq!(
            snapshot_objects("projects/p/snapshots/r.json"),
            [
                "projects/p/snapshots/r.json".to_owned(),
                "projects/p/snapshots/r.embeddings.f32".to_owned()
            ]
        );
    }
}
