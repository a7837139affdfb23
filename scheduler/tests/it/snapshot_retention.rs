//! Old snapshots leave the store (issue 25 item 3): a finished run's
//! snapshot and embedding table go once the run ended longer ago than
//! `training.snapshot_retention_hours`, its row marked; a recent run's stay,
//! and so do those of the run whose version serves a project. A second
//! sweep removes nothing more.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, Statement};
use sieve_scheduler::entities::training_run;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{ClassNames, ProjectName};
use sieve_scheduler::training::{self, retention};
use sieve_shared::messages::ModelArch;
use sieve_shared::store::StoreError;
use sieve_testkit::{App, with_app};
use uuid::Uuid;

/// A project and its first run, as `POST /projects` makes them.
async fn project_run(app: &App, name: &str) -> training_run::Model {
    let classes = ClassNames::parse(&["a".to_owned(), "b".to_owned()]).unwrap();
    let project = training::create_project(
        &app.ctx,
        &ProjectName::parse(name).unwrap(),
        &classes,
        &Policy::default(),
        ModelArch::SmallCnn,
        "test",
    )
    .await
    .unwrap();
    let runs = training_run::Entity::find().all(app.db()).await.unwrap();
    runs.into_iter()
        .find(|r| r.project_id == project.id.as_uuid())
        .unwrap()
}

/// End `run` `hours` ago.
async fn ended(app: &App, run: Uuid, hours: f64) {
    app.db()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE training_runs SET state = 'failed', finished_at = now() - make_interval(secs => $2) WHERE id = $1",
            [run.into(), (hours * 3600.0).into()],
        ))
        .await
        .unwrap();
}

async fn kept(app: &App, key: &str) -> bool {
    match app.ctx.store.get(key).await {
        Ok(_) => true,
        Err(StoreError::NotFound(_)) => false,
        Err(other) => panic!("{other}"),
    }
}

#[tokio::test]
async fn snapshots_past_the_retention_are_removed_but_the_serving_ones_stay() {
    with_app(300, |app| async move {
        let retention = app.ctx.settings.training.snapshot_retention_hours as f64;
        let old = project_run(&app, "retention-old").await;
        let recent = project_run(&app, "retention-recent").await;
        let serving = project_run(&app, "retention-serving").await;
        ended(&app, old.id, retention + 1.0).await;
        ended(&app, recent.id, retention - 1.0).await;
        ended(&app, serving.id, retention + 1.0).await;
        app.db()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE projects SET active_model_version_id = $1 WHERE id = $2",
                [serving.model_version_id.into(), serving.project_id.into()],
            ))
            .await
            .unwrap();
        // The old run was a heads run: an embedding table beside its snapshot.
        let [old_snapshot, old_table] = retention::snapshot_objects(&old.snapshot_key);
        app.ctx
            .store
            .put(&old_table, Bytes::from_static(b"\0\0\0\0"))
            .await
            .unwrap();
        for run in [&old, &recent, &serving] {
            assert!(kept(&app, &run.snapshot_key).await, "{} wrote its snapshot", run.id);
        }

        let removed = retention::sweep(&app.ctx).await.unwrap();
        assert_eq!(removed, vec![old.id]);
        assert!(!kept(&app, &old_snapshot).await && !kept(&app, &old_table).await);
        assert!(kept(&app, &recent.snapshot_key).await, "within the retention");
        assert!(kept(&app, &serving.snapshot_key).await, "its version serves");
        let marked = app
            .db()
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT count(*) AS n FROM training_runs WHERE snapshot_removed_at IS NOT NULL AND id = ANY($1)",
                [vec![old.id, recent.id, serving.id].into()],
            ))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(marked.try_get::<i64>("", "n").unwrap(), 1);

        assert!(retention::sweep(&app.ctx).await.unwrap().is_empty(), "nothing twice");
    })
    .await;
}
