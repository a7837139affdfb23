//! Faults around the result consumer.
//!
//! A poison result (one no database write can take) among good ones: the
//! good ones, in its batch and in another project, are routed within
//! seconds, and the poison one is dead-lettered with its error for `sieve
//! failed` to show and replay. Before, the consumer retried the whole batch
//! forever and routing stopped for every project.
//!
//! A `Failed` result by a version that is no longer active fails no item: a
//! worker that could not do a job for an old version says nothing about
//! the active one (issue 25 item 1).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use sea_orm::{ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, Statement};
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::prediction;
use sieve_scheduler::operate::failed;
use sieve_scheduler::routing::results::POISON_REASON;
use sieve_shared::ids::{ItemId, JobId, ModelVersionId, ProjectId};
use sieve_shared::messages::{
    PredictionOutput, PrelabelOutcome, PrelabelResult, PrelabelResults, SCHEMA_VERSION,
};
use sieve_shared::scores::Scores;
use sieve_testkit::{App, eventually, with_app};
use uuid::Uuid;

/// A second version of `project`, made active, so results by it route.
async fn active_version(app: &App, project: ProjectId) -> Uuid {
    let version = Uuid::now_v7();
    let db = app.db();
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO model_versions (id, project_id, version, status) VALUES ($1, $2, 2, 'active')",
        [version.into(), project.as_uuid().into()],
    ))
    .await
    .unwrap();
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE projects SET active_model_version_id = $1 WHERE id = $2",
        [version.into(), project.as_uuid().into()],
    ))
    .await
    .unwrap();
    version
}

fn result(project: ProjectId, item: Uuid, version: Uuid, worker: &str) -> PrelabelResult {
    PrelabelResult {
        schema: SCHEMA_VERSION,
        job_id: JobId::new(),
        project_id: project,
        item_id: ItemId::from_uuid(item),
        model_version_id: ModelVersionId::from_uuid(version),
        worker_id: worker.into(),
        outcome: PrelabelOutcome::Scored(PredictionOutput {
            probabilities: vec![0.3, 0.7],
            member_votes: vec![1, 1, 0],
            scores: Scores {
                top_class: 1,
                confidence: 0.7,
                margin: 0.4,
                entropy: 0.6,
                disagreement: 0.33,
                mutual_information: 0.05,
            },
            embedding: None,
            detections: None,
        }),
    }
}

async fn predicted_by(app: &App, item: Uuid, version: Uuid) -> bool {
    prediction::Entity::find()
        .filter(prediction::Column::ItemId.eq(item))
        .filter(prediction::Column::ModelVersionId.eq(version))
        .one(app.db())
        .await
        .unwrap()
        .is_some()
}

#[tokio::test]
async fn a_poison_result_is_dead_lettered_and_the_rest_is_routed() {
    with_app(30, |app| async move {
        let a = app.seed("poisoned", &["cat", "dog"], 3).await;
        let b = app.seed("bystander", &["cat", "dog"], 2).await;
        let (va, vb) = (
            active_version(&app, a.project.id).await,
            active_version(&app, b.project.id).await,
        );
        let item = |seeded: &sieve_testkit::Seeded, i: usize| seeded.tasks[i].item_id;

        // One batch, as a worker sends it: a good result, a result naming a
        // version that does not exist, one PostgreSQL refuses (a NUL byte in
        // a string), and a good result of another project.
        let batch = PrelabelResults {
            schema: SCHEMA_VERSION,
            results: vec![
                result(a.project.id, item(&a, 0), va, "w1"),
                result(a.project.id, item(&a, 1), Uuid::now_v7(), "w1"),
                result(a.project.id, item(&a, 2), va, "w1\u{0}"),
                result(b.project.id, item(&b, 0), vb, "w2"),
            ],
        };
        app.ctx.publisher.publish(&batch).await.unwrap();
        // And a later message of the other project, queued behind it.
        let later = result(b.project.id, item(&b, 1), vb, "w2");
        app.ctx.publisher.publish(&later).await.unwrap();

        eventually(
            "the good results routed",
            Duration::from_secs(20),
            || async {
                (predicted_by(&app, item(&a, 0), va).await
                    && predicted_by(&app, item(&b, 0), vb).await
                    && predicted_by(&app, item(&b, 1), vb).await)
                    .then_some(())
            },
        )
        .await;
        assert!(!predicted_by(&app, item(&a, 2), va).await);

        let dead = eventually(
            "both poison results dead-lettered",
            Duration::from_secs(20),
            || async {
                let dead = failed::dead_letters(&app.ctx, 100).await.unwrap();
                (dead.len() >= 2).then_some(dead)
            },
        )
        .await;
        assert_eq!(dead.len(), 2, "{dead:?}");
        for letter in &dead {
            assert_eq!(letter.reason, POISON_REASON);
            assert_eq!(letter.queue, app.ctx.topology().results_queue());
            assert!(letter.error.as_deref().is_some_and(|e| !e.is_empty()));
        }
        let summaries: Vec<&str> = dead.iter().map(|d| d.summary.as_str()).collect();
        for poisoned in [item(&a, 1), item(&a, 2)] {
            assert!(
                summaries.iter().any(|s| s.contains(&poisoned.to_string())),
                "{summaries:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_failure_by_a_retired_version_fails_no_item() {
    with_app(30, |app| async move {
        let seeded = app.seed("retired", &["cat", "dog"], 2).await;
        let project = seeded.project.id;
        let old = seeded_version(&app, project).await;
        let active = active_version(&app, project).await;
        let (a, b) = (seeded.tasks[0].item_id, seeded.tasks[1].item_id);
        for id in [a, b] {
            app.db()
                .execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "UPDATE items SET state = 'queued' WHERE id = $1",
                    [id.into()],
                ))
                .await
                .unwrap();
        }
        let failure = |item: Uuid, version: Uuid| PrelabelResult {
            outcome: PrelabelOutcome::Failed {
                reason: "model does not load here".into(),
            },
            ..result(project, item, version, "w1")
        };
        app.ctx
            .publisher
            .publish(&PrelabelResults {
                schema: SCHEMA_VERSION,
                results: vec![failure(a, old), failure(b, active)],
            })
            .await
            .unwrap();
        let state = |id: Uuid| {
            let app = &app;
            async move {
                item::Entity::find_by_id(id)
                    .one(app.db())
                    .await
                    .unwrap()
                    .unwrap()
                    .state
            }
        };
        // The active version's failure fails its item; the old one's not.
        eventually(
            "the active version's failure applied",
            Duration::from_secs(20),
            || async { (state(b).await == ItemState::Failed).then_some(()) },
        )
        .await;
        assert_eq!(state(a).await, ItemState::Queued);
    })
    .await;
}

/// The version `App::seed` registered for `project`.
async fn seeded_version(app: &App, project: ProjectId) -> Uuid {
    use sieve_scheduler::entities::model_version;
    model_version::Entity::find()
        .filter(model_version::Column::ProjectId.eq(project.as_uuid()))
        .one(app.db())
        .await
        .unwrap()
        .unwrap()
        .id
}
