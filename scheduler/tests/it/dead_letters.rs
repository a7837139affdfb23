//! Dead letters stay dead until someone acts (issue 25 item 4).
//!
//! A prelabel job dead-lettered (by a worker whose retries ran out, or by
//! the broker at its delivery limit) marks its item: rescores and the
//! sweeper leave it alone, so an image that crashes workers is not sent
//! again to crash them again. `sieve failed retry` unmarks it and sends the
//! job back. A dead-lettered train job fails its run at once.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lapin::options::BasicGetOptions;
use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, Statement};
use sieve_scheduler::dispatch;
use sieve_scheduler::entities::training_run::{self, RunState};
use sieve_scheduler::operate::failed;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{ClassNames, ProjectName};
use sieve_scheduler::training;
use sieve_shared::broker;
use sieve_shared::ids::{ItemId, JobId, ModelVersionId};
use sieve_shared::messages::{ModelArch, ModelRef, PrelabelJob, SCHEMA_VERSION, encode};
use sieve_shared::retry;
use sieve_shared::topology::Route;
use sieve_testkit::{App, eventually, with_app};
use uuid::Uuid;

async fn sql(app: &App, statement: &str, values: Vec<sea_orm::Value>) {
    app.db()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            statement,
            values,
        ))
        .await
        .unwrap();
}

async fn dead_lettered(app: &App, item: Uuid) -> Option<String> {
    app.db()
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT dead_letter_reason FROM items WHERE id = $1 AND dead_lettered_at IS NOT NULL",
            [item.into()],
        ))
        .await
        .unwrap()
        .map(|row| row.try_get::<String>("", "dead_letter_reason").unwrap())
}

async fn waiting(app: &App, queue: &str) -> u32 {
    broker::queue_counts(&app.ctx.connection, queue)
        .await
        .unwrap()
        .0
}

/// Publish `payload` as a dead letter from `queue`, as a worker does.
async fn dead_letter(app: &App, payload: Vec<u8>, queue: &str, reason: &str) {
    let headers = retry::dead_letter_headers(queue, reason, "the image crashed the worker");
    app.ctx
        .publisher
        .publish_payloads(Route::Dead, &[payload], Some(headers))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_item_is_left_alone_until_retried() {
    with_app(60, |app| async move {
        let seeded = app.seed("crashy", &["cat", "dog"], 2).await;
        let project = seeded.project.clone();
        let (poison, fine) = (seeded.tasks[0].item_id, seeded.tasks[1].item_id);
        // An active version with an artifact; both items wait for it.
        let version = Uuid::now_v7();
        sql(
            &app,
            "INSERT INTO model_versions (id, project_id, version, status, artifact_key, checksum)
             VALUES ($1, $2, 2, 'active', 'models/v2', 'abc')",
            vec![version.into(), project.id.as_uuid().into()],
        )
        .await;
        sql(
            &app,
            "UPDATE projects SET active_model_version_id = $1 WHERE id = $2",
            vec![version.into(), project.id.as_uuid().into()],
        )
        .await;
        sql(&app, "UPDATE items SET state = 'queued'", vec![]).await;
        sql(&app, "DELETE FROM review_tasks", vec![]).await;

        let prelabel = app.ctx.topology().prelabel_queue();
        let job = PrelabelJob {
            size_bytes: None,
            schema: SCHEMA_VERSION,
            job_id: JobId::new(),
            project_id: project.id,
            item_id: ItemId::from_uuid(poison),
            object_key: "images/poison.png".into(),
            model: ModelRef {
                version_id: ModelVersionId::from_uuid(version),
                version: 2,
                artifact_key: "models/v2".into(),
                checksum: "abc".into(),
            },
        };
        dead_letter(&app, encode(&job), &prelabel, retry::RETRIES_EXHAUSTED).await;
        let reason = eventually("the item marked", Duration::from_secs(20), || async {
            dead_lettered(&app, poison).await
        })
        .await;
        assert_eq!(reason, retry::RETRIES_EXHAUSTED);
        // Operators still see the dead letter.
        assert_eq!(failed::dead_letters(&app.ctx, 10).await.unwrap().len(), 1);

        // A rescore sends the other item, not the dead-lettered one.
        assert_eq!(
            dispatch::dispatch_pending(&app.ctx, &project, None)
                .await
                .unwrap(),
            1
        );
        assert_eq!(waiting(&app, &prelabel).await, 1);
        let channel = app.ctx.connection.create_channel().await.unwrap();
        let sent = channel
            .basic_get(prelabel.clone().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap();
        let sent: PrelabelJob = sieve_shared::messages::decode(&sent.delivery.data).unwrap();
        assert_eq!(sent.item_id.as_uuid(), fine);
        // And again (the other item still has no prediction): only it.
        assert_eq!(
            dispatch::dispatch_pending(&app.ctx, &project, None)
                .await
                .unwrap(),
            1
        );
        let sent = channel
            .basic_get(prelabel.clone().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap();
        let sent: PrelabelJob = sieve_shared::messages::decode(&sent.delivery.data).unwrap();
        assert_eq!(sent.item_id.as_uuid(), fine);

        // Someone acts: the job goes back and the item is unmarked.
        let report = failed::retry_dead(&app.ctx, None).await.unwrap();
        assert_eq!(report.retried, 1, "{report:?}");
        assert_eq!(dead_lettered(&app, poison).await, None);
        assert_eq!(waiting(&app, &prelabel).await, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_train_job_fails_its_run() {
    with_app(60, |app| async move {
        let project = training::create_project(
            &app.ctx,
            &ProjectName::parse("fragile").unwrap(),
            &ClassNames::parse(&["cat".to_owned(), "dog".to_owned()]).unwrap(),
            &Policy::default(),
            ModelArch::SmallCnn,
            "test",
        )
        .await
        .unwrap();
        let run = training::list_runs(&app.ctx, &project).await.unwrap()[0].id;
        // Take the job off the train queue, as the broker does at the
        // delivery limit, and dead-letter it.
        let queue = app.ctx.topology().train_queue();
        let channel = app.ctx.connection.create_channel().await.unwrap();
        let job = channel
            .basic_get(queue.clone().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap();
        dead_letter(&app, job.delivery.data.clone(), &queue, "delivery_limit").await;
        let failed = eventually("the run failed", Duration::from_secs(20), || async {
            let run = training_run::Entity::find_by_id(run)
                .one(app.db())
                .await
                .unwrap()?;
            (run.state == RunState::Failed).then_some(run)
        })
        .await;
        let reason = failed.error.unwrap();
        assert!(
            reason.contains("dead-lettered") && reason.contains("delivery_limit"),
            "{reason}"
        );
    })
    .await;
}
