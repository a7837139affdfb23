//! Per-reviewer figures on the real services: two reviewers label over
//! HTTP (a skip, an undo, audits, a second opinion on which they disagree,
//! a report of a label confirmed), their labels are put at chosen times,
//! and `GET /projects/{p}/reviewers`, `sieve reviewers --json` and the
//! `sieve_reviewer_*` gauges on `/metrics` give each one's exact figures;
//! a reviewer token may not read them, a token scoped elsewhere gets 404.

#![allow(clippy::unwrap_used)]

use chrono::{DateTime, Duration, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use sieve_scheduler::auth;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::routing::calibration;
use sieve_testkit::{App, with_app};
use uuid::Uuid;

const CLASSES: [&str; 3] = ["cat", "dog", "bird"];

async fn token(app: &App, name: &str, role: Role) -> (String, Uuid) {
    auth::create_expiring_token(app.db(), name, role, None, None)
        .await
        .unwrap()
}

async fn claim(app: &App, token: &str) -> Value {
    let (status, task) = app
        .post("/api/v1/projects/crew/review/next", token, json!({}))
        .await;
    assert_eq!(status, 200, "{task}");
    task
}

fn task_id(task: &Value) -> Uuid {
    task["task_id"].as_str().unwrap().parse().unwrap()
}

async fn step(app: &App, token: &str, task: &Value, what: &str, body: Value) -> Value {
    let mut body = body;
    body["fencing_token"] = task["fencing_token"].clone();
    let (status, answer) = app
        .post(
            &format!("/api/v1/review/{}/{what}", task_id(task)),
            token,
            body,
        )
        .await;
    assert_eq!(status, 200, "{what}: {answer}");
    answer
}

async fn submit(app: &App, token: &str, task: &Value, class: &str) -> Value {
    step(app, token, task, "submit", json!({ "class": class })).await
}

/// Put the label that closed `task` (and the task's close) at `at`.
async fn labeled_at(app: &App, task: Uuid, at: DateTime<Utc>) {
    for sql in [
        "UPDATE labels SET created_at = $2 WHERE review_task_id = $1",
        "UPDATE review_tasks SET closed_at = $2 WHERE id = $1",
    ] {
        let done = app
            .db()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                [task.into(), at.fixed_offset().into()],
            ))
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 1, "{sql}");
    }
}

async fn sql(app: &App, sql: &str, values: Vec<sea_orm::Value>) {
    app.db()
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            values,
        ))
        .await
        .unwrap();
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

fn close(got: &Value, want: f64, what: &str) {
    let got = got
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: {got} is no number"));
    assert!((got - want).abs() < 1e-9, "{what}: {got}, not {want}");
}

/// The reviewer called `name` in a report's `reviewers`.
fn of<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["reviewers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {report}"))
}

fn sieve_reviewers(app: &App, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sieve"))
        .args(["reviewers", "-p", "crew"])
        .args(args)
        .env("SIEVE_DATABASE__URL", &app.settings.database.url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn each_reviewer_has_their_own_counts_pace_and_agreement() {
    with_app(300, |app| async move {
        // Handed out in this order; the model proposes cat, dog, bird, cat,
        // dog, bird, 60% sure, except 95% on the first.
        let seeded = app.seed("crew", &CLASSES, 6).await;
        let tasks: Vec<Uuid> = seeded.tasks.iter().map(|t| t.task_id).collect();
        sql(
            &app,
            "UPDATE predictions SET confidence = 0.95 WHERE item_id = $1",
            vec![seeded.tasks[0].item_id.into()],
        )
        .await;
        // Tasks 1, 3 and 5 are audits (random would-be machine labels).
        for i in [1, 3, 5] {
            sql(
                &app,
                "UPDATE review_tasks SET reason = 'audit' WHERE id = $1",
                vec![tasks[i].into()],
            )
            .await;
        }
        let (alice, alice_id) = token(&app, "alice", Role::Reviewer).await;
        let (bob, bob_id) = token(&app, "bob", Role::Reviewer).await;
        let (admin, _) = token(&app, "ada", Role::Admin).await;
        let (status, body) = app
            .http
            .patch(app.url("/api/v1/projects/crew/policy"))
            .bearer_auth(&admin)
            .json(&json!({ "second_review_confidence": 0.9 }))
            .send()
            .await
            .map(|r| (r.status().as_u16(), r))
            .unwrap();
        assert_eq!(status, 200, "{:?}", body.text().await);

        // Alice: dog against a 95%-sure cat (a second opinion is asked),
        // dog on an audit the model got right, skips the bird, bird on an
        // audit the model called cat, dog.
        let t0 = claim(&app, &alice).await;
        assert_eq!(task_id(&t0), tasks[0]);
        let answer = submit(&app, &alice, &t0, "dog").await;
        let second: Uuid = answer["second_opinion_task"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let t1 = claim(&app, &alice).await;
        assert_eq!(task_id(&t1), tasks[1]);
        submit(&app, &alice, &t1, "dog").await;
        let t2 = claim(&app, &alice).await;
        assert_eq!(task_id(&t2), tasks[2]);
        step(&app, &alice, &t2, "skip", json!({ "reason": "blurry" })).await;
        let t3 = claim(&app, &alice).await;
        assert_eq!(task_id(&t3), tasks[3]);
        submit(&app, &alice, &t3, "bird").await;
        let t4 = claim(&app, &alice).await;
        assert_eq!(task_id(&t4), tasks[4]);
        submit(&app, &alice, &t4, "dog").await;

        // An admin reports Alice's dog on item 1 as wrong; Bob confirms it.
        let (status, body) = app
            .post(
                &format!("/api/v1/items/{}/reopen", seeded.tasks[1].item_id),
                &admin,
                json!({ "reason": "looks like a cat", "force": true }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let reported = claim(&app, &bob).await;
        assert_eq!(reported["reason"], "reported");
        submit(&app, &bob, &reported, "dog").await;
        // Bob: bird on an audit the model got right, cat on the second
        // opinion (siding with the model, not Alice), bird on the skipped
        // task, undone and given again.
        let t5 = claim(&app, &bob).await;
        assert_eq!(task_id(&t5), tasks[5]);
        submit(&app, &bob, &t5, "bird").await;
        let so = claim(&app, &bob).await;
        assert_eq!(task_id(&so), second);
        submit(&app, &bob, &so, "cat").await;
        let again = claim(&app, &bob).await;
        assert_eq!(task_id(&again), tasks[2]);
        submit(&app, &bob, &again, "bird").await;
        let again = step(&app, &bob, &again, "undo", json!({})).await;
        submit(&app, &bob, &again, "bird").await;

        // Alice worked two hours ago (1 and 2 minutes apart), then once
        // half an hour ago after a break; Bob in the last ten minutes.
        let now = Utc::now();
        let ago = |minutes: i64| now - Duration::minutes(minutes);
        for (task, at) in [
            (tasks[0], ago(120)),
            (tasks[1], ago(119)),
            (tasks[3], ago(117)),
            (tasks[4], ago(30)),
            (task_id(&reported), ago(10)),
            (tasks[5], ago(8)),
            (second, ago(5)),
            (tasks[2], ago(4)),
        ] {
            labeled_at(&app, task, at).await;
        }

        let z = calibration::z_for(seeded.project.policy.confidence_level);
        let ml = app.token("trainer", Role::Ml).await;
        let (status, report) = app.get("/api/v1/projects/crew/reviewers", &ml).await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["project"], "crew");
        assert_eq!(report["since"], Value::Null);
        assert_eq!(report["session_gap_seconds"], 600);
        let names: Vec<&str> = report["reviewers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        // Both labeled 4; ties by name. The admin only reported.
        assert_eq!(names, ["alice", "bob"], "{report}");

        let a = of(&report, "alice");
        assert_eq!(a["token_id"], alice_id.to_string());
        assert_eq!(a["labels"], 4);
        assert_eq!(a["labels_last_hour"], 1);
        assert_eq!(a["labels_last_day"], 4);
        assert_eq!(a["sessions"], 2);
        close(&a["active_hours"], 180.0 / 3600.0, "alice's active hours");
        close(&a["labels_per_hour"], 40.0, "alice's pace");
        assert_eq!(a["skips"], 1);
        assert_eq!(a["undos"], 0);
        assert_eq!(a["second_opinions"]["checked_sided_with_model"], 1);
        assert_eq!(a["second_opinions"]["checked_upheld"], 0);
        assert_eq!(a["second_opinions"]["given_agreed_with_model"], 0);
        assert_eq!(a["reports"]["confirmed"], 1);
        assert_eq!(a["reports"]["corrected"], 0);
        // The second opinion against her, the report that confirmed her.
        assert_eq!(a["agreement"]["compared"], 2);
        assert_eq!(a["agreement"]["agreed"], 1);
        close(&a["agreement"]["ratio"], 0.5, "alice's agreement");
        let (lower, upper) = calibration::wilson(1, 2, z);
        close(&a["agreement"]["lower"], lower, "alice's lower bound");
        close(&a["agreement"]["upper"], upper, "alice's upper bound");
        assert_eq!(a["audits"]["compared"], 2);
        assert_eq!(a["audits"]["agreed"], 1);
        close(&a["audits"]["ratio"], 0.5, "alice's audits");

        let b = of(&report, "bob");
        assert_eq!(b["token_id"], bob_id.to_string());
        assert_eq!(b["labels"], 4);
        assert_eq!(b["labels_last_hour"], 4);
        assert_eq!(b["labels_last_day"], 4);
        assert_eq!(b["sessions"], 1);
        close(&b["active_hours"], 360.0 / 3600.0, "bob's active hours");
        close(&b["labels_per_hour"], 30.0, "bob's pace");
        assert_eq!(b["skips"], 0);
        assert_eq!(b["undos"], 1);
        assert_eq!(b["second_opinions"]["given_agreed_with_model"], 1);
        assert_eq!(b["second_opinions"]["checked_sided_with_model"], 0);
        assert_eq!(b["reports"]["confirmed"], 0);
        assert_eq!(b["agreement"]["compared"], 1);
        assert_eq!(b["agreement"]["agreed"], 0);
        close(&b["agreement"]["ratio"], 0.0, "bob's agreement");
        assert_eq!(b["audits"]["compared"], 1);
        assert_eq!(b["audits"]["agreed"], 1);

        // The last hour: Alice's one label since her break; Bob's four.
        let (status, recent) = app
            .get("/api/v1/projects/crew/reviewers?since=1h", &ml)
            .await;
        assert_eq!(status, 200, "{recent}");
        assert!(recent["since"].is_string(), "{recent}");
        let a = of(&recent, "alice");
        assert_eq!(a["labels"], 1);
        assert_eq!(a["sessions"], 1);
        assert_eq!(
            a["labels_per_hour"],
            Value::Null,
            "a lone label has no pace"
        );
        assert_eq!(a["labels_last_day"], 4, "the last day, whatever the window");
        assert_eq!(of(&recent, "bob")["labels"], 4);
        for bad in ["since=yesterday", "since=1h&since=2h", "window=1h"] {
            let (status, body) = app
                .get(&format!("/api/v1/projects/crew/reviewers?{bad}"), &ml)
                .await;
            assert_eq!(status, 422, "{bad}: {body}");
        }

        // The CLI reads the same figures.
        let cli: Value = serde_json::from_str(&sieve_reviewers(&app, &["--json"])).unwrap();
        for name in ["alice", "bob"] {
            let (mut from_cli, mut from_http) = (of(&cli, name).clone(), of(&report, name).clone());
            for r in [&mut from_cli, &mut from_http] {
                // Counted back from when each was read.
                r["labels_last_hour"] = Value::Null;
                r["labels_last_day"] = Value::Null;
            }
            assert_eq!(from_cli, from_http, "{name}");
        }
        let cli: Value =
            serde_json::from_str(&sieve_reviewers(&app, &["--since", "1h", "--json"])).unwrap();
        assert_eq!(of(&cli, "alice")["labels"], 1);
        let table = sieve_reviewers(&app, &[]);
        let line = |name: &str| {
            table
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name} in\n{table}"))
                .to_owned()
        };
        assert!(line("alice").contains(&alice_id.to_string()), "{table}");
        assert!(line("alice").contains("40.0"), "{table}");
        assert!(line("bob").contains("0.000 ["), "{table}");

        // The gauges, read at the scrape.
        let ops = app.token("scraper", Role::Ops).await;
        let response = app
            .http
            .get(app.url("/metrics"))
            .bearer_auth(&ops)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        let alice_id = alice_id.to_string();
        let bob_id = bob_id.to_string();
        for (name, id, metric, want) in [
            ("alice", &alice_id, "sieve_reviewer_labels_total", 4.0),
            ("alice", &alice_id, "sieve_reviewer_skips_total", 1.0),
            ("alice", &alice_id, "sieve_reviewer_undos_total", 0.0),
            ("alice", &alice_id, "sieve_reviewer_labels_per_hour", 40.0),
            ("alice", &alice_id, "sieve_reviewer_agreement_ratio", 0.5),
            ("alice", &alice_id, "sieve_reviewer_agreement_compared", 2.0),
            ("alice", &alice_id, "sieve_reviewer_audits", 2.0),
            (
                "alice",
                &alice_id,
                "sieve_reviewer_audit_agreement_ratio",
                0.5,
            ),
            ("bob", &bob_id, "sieve_reviewer_labels_total", 4.0),
            ("bob", &bob_id, "sieve_reviewer_undos_total", 1.0),
            ("bob", &bob_id, "sieve_reviewer_labels_per_hour", 30.0),
            ("bob", &bob_id, "sieve_reviewer_agreement_ratio", 0.0),
            ("bob", &bob_id, "sieve_reviewer_agreement_compared", 1.0),
            ("bob", &bob_id, "sieve_reviewer_audit_agreement_ratio", 1.0),
        ] {
            let labels = [
                ("project", "crew"),
                ("reviewer", id.as_str()),
                ("name", name),
            ];
            let got = sample(&text, metric, &labels)
                .unwrap_or_else(|| panic!("no {metric} for {name} in\n{text}"));
            assert!((got - want).abs() < 1e-9, "{metric} of {name}: {got}");
        }
    })
    .await;
}

#[tokio::test]
async fn only_ml_ops_and_admin_read_them_and_only_for_their_project() {
    with_app(60, |app| async move {
        let mine = app.seed("crew", &CLASSES, 1).await;
        app.seed("others", &CLASSES, 1).await;
        let reviewer = app.token("rita", Role::Reviewer).await;
        assert_eq!(
            app.get("/api/v1/projects/crew/reviewers", &reviewer)
                .await
                .0,
            403
        );
        let scoped = |name: &'static str, role: Role| {
            let app = app.clone();
            let project = mine.project.clone();
            async move {
                auth::create_scoped_token(app.db(), name, role, Some(&project))
                    .await
                    .unwrap()
            }
        };
        let ops = scoped("scoped-ops", Role::Ops).await;
        let ml = scoped("scoped-ml", Role::Ml).await;
        let scoped_reviewer = scoped("scoped-reviewer", Role::Reviewer).await;
        let (status, empty) = app.get("/api/v1/projects/crew/reviewers", &ops).await;
        assert_eq!(status, 200, "{empty}");
        assert_eq!(empty["reviewers"], json!([]));
        assert_eq!(app.get("/api/v1/projects/crew/reviewers", &ml).await.0, 200);
        assert_eq!(
            app.get("/api/v1/projects/crew/reviewers", &scoped_reviewer)
                .await
                .0,
            403
        );
        for token in [&ops, &ml] {
            let (status, body) = app.get("/api/v1/projects/others/reviewers", token).await;
            assert_eq!(status, 404, "{body}");
            assert_eq!(body["error"]["code"], "not_found");
        }
    })
    .await;
}
