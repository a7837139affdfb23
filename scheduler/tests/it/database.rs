//! Migrations and connection errors, against the real PostgreSQL.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use sea_orm::{ConnectionTrait, Statement};
use sieve_scheduler::db;
use sieve_testkit::Sandbox;

#[tokio::test]
async fn migrating_twice_changes_nothing() {
    let test = Sandbox::start(|s| s.database.max_connections = 20).await;
    let tables = || async {
        test.db
            .query_all_raw(Statement::from_string(
                test.db.get_database_backend(),
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
            ))
            .await
            .unwrap()
            .len()
    };
    let before = tables().await;
    assert!(
        before >= 8,
        "projects, items, predictions, labels, review_tasks, model_versions, training_runs, api_tokens"
    );
    assert_eq!(
        db::migrate(&test.db).await.unwrap(),
        0,
        "nothing pending the second time"
    );
    assert_eq!(tables().await, before);
    drop(test);
}

/// The CLI's one-line error when a service is down: which service, which
/// address, non-zero exit, no panic.
fn sieve(env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sieve"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unreachable_services_are_named_in_one_line() {
    let (code, err) = sieve(
        &[(
            "SIEVE_DATABASE__URL",
            "postgres://postgres@127.0.0.1:1/sieve",
        )],
        &["project", "list"],
    );
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: cannot reach PostgreSQL at postgres://postgres@127.0.0.1:1/sieve"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"));

    let (code, err) = sieve(
        &[
            (
                "SIEVE_DATABASE__URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            ("SIEVE_BROKER__URL", "amqp://guest:secret@127.0.0.1:1/%2f"),
        ],
        &["status", "--project", "x"],
    );
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/%2f"),
        "{err}"
    );
    assert!(!err.contains("secret"), "passwords are never printed");

    let (code, err) = sieve(&[("SIEVE_REDIS__URL", "redis://127.0.0.1:1")], &["workers"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: cannot reach Redis at redis://127.0.0.1:1"),
        "{err}"
    );
}

#[test]
fn bad_configuration_is_reported() {
    let (code, err) = sieve(
        &[("SIEVE_WORKER__BATCH_SIZE", "many")],
        &["project", "list"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("invalid configuration"), "{err}");
}
