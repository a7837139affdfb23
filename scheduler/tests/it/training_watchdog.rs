//! Training runs cannot get stuck (issue 25 item 3), a project can always
//! get a model (item 0), and automatic retrains do not repeat a run that
//! failed on the same labels.
//!
//! The watchdog's sweep is called directly, with `stuck_after_seconds` at 2
//! and runs aged by SQL, so each case is decided, not waited for.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use lapin::options::QueuePurgeOptions;
use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, Statement};
use serde_json::json;
use sieve_scheduler::context::Context;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::training_run::{self, RunState};
use sieve_scheduler::policy::{Policy, PolicyPatch};
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_scheduler::routing;
use sieve_scheduler::training::auto_retrain::{self, Outcome};
use sieve_scheduler::training::{self, watchdog};
use sieve_shared::broker;
use sieve_shared::messages::ModelArch;
use sieve_testkit::{App, with_app};
use uuid::Uuid;

/// The app's context with runs stuck after 2 s.
fn impatient(app: &App) -> Context {
    let mut ctx = app.ctx.clone();
    let mut settings = (*ctx.settings).clone();
    settings.training.stuck_after_seconds = 2;
    ctx.settings = Arc::new(settings);
    ctx
}

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

/// Make `run` look `seconds` old: created then, last touched then.
async fn age(app: &App, run: Uuid, seconds: i64) {
    sql(
        app,
        "UPDATE training_runs SET created_at = now() - make_interval(secs => $2),
                updated_at = now() - make_interval(secs => $2) WHERE id = $1",
        vec![run.into(), (seconds as f64).into()],
    )
    .await;
}

async fn run_row(app: &App, run: Uuid) -> training_run::Model {
    training_run::Entity::find_by_id(run)
        .one(app.db())
        .await
        .unwrap()
        .unwrap()
}

async fn train_jobs_waiting(app: &App) -> u32 {
    let queue = app.ctx.topology().train_queue();
    broker::queue_counts(&app.ctx.connection, &queue)
        .await
        .unwrap()
        .0
}

async fn purge_train_queue(app: &App) {
    let channel = app.ctx.connection.create_channel().await.unwrap();
    channel
        .queue_purge(
            app.ctx.topology().train_queue().into(),
            QueuePurgeOptions::default(),
        )
        .await
        .unwrap();
    channel.close(200, "purged".into()).await.ok();
}

async fn new_project(app: &App, name: &str) -> (Project, Uuid) {
    let project = training::create_project(
        &app.ctx,
        &ProjectName::parse(name).unwrap(),
        &ClassNames::parse(&["cat".to_owned(), "dog".to_owned()]).unwrap(),
        &Policy::default(),
        ModelArch::SmallCnn,
        "test",
    )
    .await
    .unwrap();
    let run = training::list_runs(&app.ctx, &project).await.unwrap()[0].id;
    (project, run)
}

#[tokio::test]
async fn a_lost_job_is_published_again_once_then_the_run_fails_and_the_first_model_returns() {
    with_app(300, |app| async move {
        let ctx = impatient(&app);
        let (project, run) = new_project(&app, "lost").await;
        // The scheduler died between the run's commit and its publish.
        purge_train_queue(&app).await;
        age(&app, run, 10).await;

        let swept = watchdog::sweep(&ctx).await.unwrap();
        assert_eq!(swept.republished, vec![run]);
        assert_eq!(train_jobs_waiting(&app).await, 1);
        assert_eq!(run_row(&app, run).await.state, RunState::Queued);
        // Just published again: nothing to do.
        assert_eq!(watchdog::sweep(&ctx).await.unwrap(), Default::default());

        // Lost again and silent past the deadline: failed, not published a
        // third time.
        purge_train_queue(&app).await;
        sql(
            &app,
            "UPDATE training_runs SET updated_at = now() - interval '5 seconds' WHERE id = $1",
            vec![run.into()],
        )
        .await;
        let swept = watchdog::sweep(&ctx).await.unwrap();
        assert_eq!(swept.failed, vec![run]);
        assert!(swept.republished.is_empty());
        let failed = run_row(&app, run).await;
        assert_eq!(failed.state, RunState::Failed);
        assert!(
            failed.error.as_deref().unwrap().contains("not started"),
            "{:?}",
            failed.error
        );
        assert_eq!(train_jobs_waiting(&app).await, 0);

        // The project has no model and its last run failed: within the
        // backoff nothing is queued; after it, the first model is.
        assert!(watchdog::sweep(&ctx).await.unwrap().first_models.is_empty());
        sql(
            &app,
            "UPDATE training_runs SET finished_at = now() - interval '2 minutes' WHERE id = $1",
            vec![run.into()],
        )
        .await;
        let swept = watchdog::sweep(&ctx).await.unwrap();
        assert_eq!(swept.first_models, vec![project.id]);
        let runs = training::list_runs(&app.ctx, &project).await.unwrap();
        assert_eq!(runs.len(), 2);
        assert!(runs.iter().any(|r| r.state == RunState::Queued));
        assert_eq!(train_jobs_waiting(&app).await, 1);
    })
    .await;
}

#[tokio::test]
async fn a_running_run_without_progress_is_failed_and_retraining_works_again() {
    with_app(300, |app| async move {
        let ctx = impatient(&app);
        let (project, run) = new_project(&app, "silent").await;
        // A worker took it, said it started, and died without a word.
        sql(
            &app,
            "UPDATE training_runs SET state = 'running' WHERE id = $1",
            vec![run.into()],
        )
        .await;
        age(&app, run, 10).await;
        // The one-run index refuses a retrain meanwhile.
        assert!(
            training::request(&app.ctx, &project, "test", project.train_params(), false)
                .await
                .is_err()
        );

        let swept = watchdog::sweep(&ctx).await.unwrap();
        assert_eq!(swept.failed, vec![run]);
        let failed = run_row(&app, run).await;
        assert_eq!(failed.state, RunState::Failed);
        assert!(
            failed.error.as_deref().unwrap().contains("no progress"),
            "{:?}",
            failed.error
        );
        let next = training::request(&app.ctx, &project, "test", project.train_params(), false)
            .await
            .unwrap();
        assert_ne!(next.run_id, run);

        // A run that reports progress is left alone, however old.
        let fresh = next.run_id;
        sql(
            &app,
            "UPDATE training_runs SET state = 'running', created_at = now() - interval '1 hour' WHERE id = $1",
            vec![fresh.into()],
        )
        .await;
        assert!(watchdog::sweep(&ctx).await.unwrap().failed.is_empty());
        assert_eq!(run_row(&app, fresh).await.state, RunState::Running);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_retrains_do_not_repeat_a_run_that_failed_on_the_same_labels() {
    with_app(300, |app| async move {
        let classes = ["cat", "dog"];
        let seeded = app.seed("backoff", &classes, 4).await;
        let project = projects::get(app.db(), "backoff").await.unwrap();
        let project = routing::calibration::patch_policy(
            app.db(),
            &project,
            &PolicyPatch {
                retrain_every_labels: Some(Some(2)),
                ..PolicyPatch::default()
            },
        )
        .await
        .unwrap();
        let reviewer = app.token("rita", Role::Reviewer).await;
        let label = |i: usize| {
            let (app, reviewer, task) = (&app, reviewer.clone(), seeded.tasks[i].clone());
            async move {
                let (status, claimed) = app
                    .post("/api/v1/projects/backoff/review/next", &reviewer, json!({}))
                    .await;
                assert_eq!(status, 200, "{claimed}");
                let class = classes[task.proposed];
                let (status, body) = app
                    .post(
                        &format!(
                            "/api/v1/review/{}/submit",
                            claimed["task_id"].as_str().unwrap()
                        ),
                        &reviewer,
                        json!({ "fencing_token": claimed["fencing_token"], "class": class }),
                    )
                    .await;
                assert_eq!(status, 200, "{body}");
            }
        };
        label(0).await;
        label(1).await;
        let Outcome::Requested(run) = auto_retrain::check(&app.ctx, &project).await.unwrap() else {
            panic!("two new labels with retrain_every_labels = 2 must request a run");
        };
        // The run fails (a worker's fault, say) on those two labels.
        training::cancel(&app.ctx, &project, "test").await.unwrap();
        sql(
            &app,
            "UPDATE training_runs SET state = 'failed' WHERE id = $1",
            vec![run.run_id.into()],
        )
        .await;
        // The same labels would fail the same way: no new run every 10 s.
        assert!(matches!(
            auto_retrain::check(&app.ctx, &project).await.unwrap(),
            Outcome::BackedOff { failed_run } if failed_run == run.run_id
        ));
        // A new label lifts it.
        label(2).await;
        assert!(matches!(
            auto_retrain::check(&app.ctx, &project).await.unwrap(),
            Outcome::Requested(_)
        ));
    })
    .await;
}
