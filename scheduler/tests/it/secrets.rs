//! Tokens never reach the logs: a real `sieve serve` at the most verbose log
//! level handles requests with good and bad tokens, and its output is
//! searched for them.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sieve_scheduler::auth;
use sieve_scheduler::entities::api_token::Role;
use sieve_testkit::Sandbox;

#[tokio::test]
async fn tokens_never_reach_the_logs() {
    let test = Sandbox::start(|s| s.database.max_connections = 20).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let logs = tempfile::NamedTempFile::new().unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_sieve"))
        .arg("serve")
        .env("SIEVE_DATABASE__URL", &test.settings.database.url)
        .env("SIEVE_BROKER__PREFIX", &test.settings.broker.prefix)
        .env("SIEVE_STORE__ROOT", test.store.path())
        .env("SIEVE_HTTP__BIND", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "trace")
        .stdout(Stdio::from(logs.reopen().unwrap()))
        .stderr(Stdio::from(logs.reopen().unwrap()))
        .spawn()
        .unwrap();

    let token = auth::create_token(&test.db, "secret-holder", Role::Reviewer)
        .await
        .unwrap();
    let wrong = format!("{token}x");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "sieve serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in [&token, &wrong] {
        for path in [
            "/api/v1/projects",
            "/api/v1/projects/nope/review/next",
            "/api/v1/status",
        ] {
            let _ = http
                .get(format!("{base}{path}"))
                .bearer_auth(t)
                .send()
                .await
                .unwrap();
            let _ = http
                .post(format!("{base}{path}"))
                .bearer_auth(t)
                .send()
                .await
                .unwrap();
        }
    }
    Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    let status = serve.wait().unwrap();
    assert!(status.success(), "{status:?}");

    let output = std::fs::read_to_string(logs.path()).unwrap();
    println!(
        "searched {} lines of trace-level output",
        output.lines().count()
    );
    assert!(output.lines().count() > 10, "the server did log");
    assert!(
        !output.contains(&token),
        "a valid token appeared in the logs"
    );
    assert!(
        !output.contains(&wrong),
        "an invalid token appeared in the logs"
    );
    // The sandbox removes the queues this server declared, and the database.
    drop(test);
}
