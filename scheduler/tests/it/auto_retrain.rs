//! Automatic retraining on the real services: a project with
//! `retrain_every_labels = N` gets a run once N human labels arrived since
//! the last run's snapshot, and never a second one while one is queued.

#![allow(clippy::unwrap_used)]

use sea_orm::{ActiveValue::Set, EntityTrait};
use serde_json::json;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::training_run::{self, RunState};
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects;
use sieve_scheduler::routing;
use sieve_scheduler::training::auto_retrain::{self, Outcome};
use sieve_testkit::{App, with_app};

/// Claim the next task and label it with its proposed class, over HTTP.
async fn label_next(app: &App, token: &str, project: &str, classes: &[&str]) {
    let (status, task) = app
        .post(
            &format!("/api/v1/projects/{project}/review/next"),
            token,
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{task}");
    // Seeded tasks propose the classes in turn: every class gets labels.
    let proposed = task["predicted_class"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| classes[0].to_owned());
    let (status, body) = app
        .post(
            &format!(
                "/api/v1/review/{}/submit",
                task["task_id"].as_str().unwrap()
            ),
            token,
            json!({ "fencing_token": task["fencing_token"], "class": proposed }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_requested_every_n_human_labels_and_never_twice() {
    with_app(300, |app| async move {
        let classes = ["cat", "dog"];
        let seeded = app.seed("auto", &classes, 8).await;
        let reviewer = app.token("rita", Role::Reviewer).await;

        // Not configured: nothing happens, however many labels arrive.
        label_next(&app, &reviewer, "auto", &classes).await;
        label_next(&app, &reviewer, "auto", &classes).await;
        let project = projects::get(app.db(), "auto").await.unwrap();
        assert!(matches!(
            auto_retrain::check(&app.ctx, &project).await.unwrap(),
            Outcome::NotDue { new_labels: 0 }
        ));

        let project = routing::calibration::set_policy(
            app.db(),
            &seeded.project,
            Policy {
                retrain_every_labels: Some(3),
                ..project.policy.clone()
            },
        )
        .await
        .unwrap();
        match auto_retrain::check(&app.ctx, &project).await.unwrap() {
            Outcome::NotDue { new_labels } => assert_eq!(new_labels, 2),
            other => panic!("two labels of three: not due yet, got {other:?}"),
        }

        label_next(&app, &reviewer, "auto", &classes).await;
        let run = match auto_retrain::check(&app.ctx, &project).await.unwrap() {
            Outcome::Requested(run) => run,
            other => panic!("three labels: a run is due, got {other:?}"),
        };
        assert_eq!(run.labels, 3);
        assert!(
            matches!(
                auto_retrain::check(&app.ctx, &project).await.unwrap(),
                Outcome::Busy
            ),
            "a queued run is never requested twice"
        );

        // The run trains on those three; the count starts again from them.
        training_run::Entity::update(training_run::ActiveModel {
            id: Set(run.run_id),
            state: Set(RunState::Succeeded),
            ..Default::default()
        })
        .exec(app.db())
        .await
        .unwrap();
        match auto_retrain::check(&app.ctx, &project).await.unwrap() {
            Outcome::NotDue { new_labels } => assert_eq!(new_labels, 0),
            other => panic!("nothing new since the run: got {other:?}"),
        }
        for _ in 0..3 {
            label_next(&app, &reviewer, "auto", &classes).await;
        }
        assert!(matches!(
            auto_retrain::check(&app.ctx, &project).await.unwrap(),
            Outcome::Requested(_)
        ));
        let runs = training_run::Entity::find().all(app.db()).await.unwrap();
        assert_eq!(runs.len(), 2, "one run per due point");
        assert!(
            runs.iter()
                .all(|r| r.requested_by == auto_retrain::REQUESTER)
        );
    })
    .await;
}

#[test]
fn a_zero_interval_is_refused() {
    let policy = Policy {
        retrain_every_labels: Some(0),
        ..Policy::default()
    };
    let err = policy.validate().unwrap_err().to_string();
    assert!(err.contains("retrain_every_labels"), "{err}");
}
