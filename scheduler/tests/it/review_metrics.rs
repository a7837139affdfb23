//! The measured accuracy of machine labels, from audits, on `/metrics`:
//! overall and per class, with its Wilson interval, as `sieve project show`
//! reports it, refreshed at each scrape.

#![allow(clippy::unwrap_used)]

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::operate::status;
use sieve_scheduler::routing::calibration;
use sieve_testkit::{App, with_app};

const CLASSES: [&str; 3] = ["cat", "dog", "bird"];

async fn scrape(app: &App) -> String {
    let ops = app.token("scraper", Role::Ops).await;
    let response = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth(ops)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// The value of `name{labels}` whose label set is exactly `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (inside, value) = rest.split_once("} ")?;
        let mut have: Vec<&str> = inside.split(',').collect();
        let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        have.sort_unstable();
        want.sort();
        (have == want).then(|| value.trim().parse().unwrap())
    })
}

async fn audit_one(app: &App, token: &str, class: &str) {
    app.label_next("audited", token, class).await;
}

#[tokio::test]
async fn audited_accuracy_is_exported_per_class_and_overall() {
    with_app(300, |app| async move {
        let seeded = app.seed("audited", &CLASSES, 6).await;
        let alice = app.token("alice", Role::Reviewer).await;
        // Every task is an audit: a random would-be machine label.
        app.db()
            .execute_raw(Statement::from_string(
                DbBackend::Postgres,
                "UPDATE review_tasks SET reason = 'audit'",
            ))
            .await
            .unwrap();

        let before = scrape(&app).await;
        assert_eq!(
            sample(
                &before,
                "sieve_machine_label_audits_overall",
                &[("project", "audited")]
            ),
            None,
            "no audits yet, no gauge"
        );

        // Task i proposes class i % 3; the reviewer agrees except on the
        // last one (proposed bird, truly cat).
        for (i, task) in seeded.tasks.iter().enumerate() {
            let truth = if i == 5 { 0 } else { task.proposed };
            audit_one(&app, &alice, CLASSES[truth]).await;
        }

        let text = scrape(&app).await;
        let z = calibration::z_for(seeded.project.policy.confidence_level);
        let overall = [("project", "audited")];
        assert_eq!(
            sample(&text, "sieve_machine_label_audits_overall", &overall),
            Some(6.0)
        );
        let accuracy = sample(&text, "sieve_machine_label_accuracy_overall", &overall).unwrap();
        assert!((accuracy - 5.0 / 6.0).abs() < 1e-9, "{accuracy}");
        let (lower, upper) = calibration::wilson(5, 6, z);
        let got_lower = sample(
            &text,
            "sieve_machine_label_accuracy_overall_lower",
            &overall,
        );
        let got_upper = sample(
            &text,
            "sieve_machine_label_accuracy_overall_upper",
            &overall,
        );
        assert!((got_lower.unwrap() - lower).abs() < 1e-9);
        assert!((got_upper.unwrap() - upper).abs() < 1e-9);

        // Per predicted class: cat 2/2, dog 2/2, bird 1/2.
        for (class, correct) in [("cat", 2u64), ("dog", 2), ("bird", 1)] {
            let labels = [("project", "audited"), ("class", class)];
            assert_eq!(
                sample(&text, "sieve_machine_label_audits", &labels),
                Some(2.0),
                "{class}"
            );
            let accuracy = sample(&text, "sieve_machine_label_accuracy", &labels).unwrap();
            assert!((accuracy - correct as f64 / 2.0).abs() < 1e-9, "{class}");
            let (lower, upper) = calibration::wilson(correct, 2, z);
            let got_lower = sample(&text, "sieve_machine_label_accuracy_lower", &labels);
            let got_upper = sample(&text, "sieve_machine_label_accuracy_upper", &labels);
            assert!((got_lower.unwrap() - lower).abs() < 1e-9, "{class}");
            assert!((got_upper.unwrap() - upper).abs() < 1e-9, "{class}");
        }

        // The same figures `sieve project show` reports.
        let shown = status::measured_accuracy(&app.ctx, &seeded.project)
            .await
            .unwrap();
        assert_eq!(shown.len(), 4);
        for m in shown {
            let (name, labels) = match &m.class {
                None => (
                    "sieve_machine_label_accuracy_overall",
                    vec![("project", "audited")],
                ),
                Some(class) => (
                    "sieve_machine_label_accuracy",
                    vec![("project", "audited"), ("class", class.as_str())],
                ),
            };
            assert!((sample(&text, name, &labels).unwrap() - m.accuracy).abs() < 1e-9);
        }
    })
    .await;
}
