//! Request bodies over `http.body_limit`, over real HTTP: each is refused
//! with 413 and a JSON error, before any handler writes anything, whether
//! the client declares its length or streams it chunked, and whether or not
//! the endpoint reads a body at all.

#![allow(clippy::unwrap_used)]

use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::{Value, json};
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::review_task::TaskState;
use sieve_scheduler::entities::{label, project};
use sieve_testkit::{App, with_app};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A JSON object of exactly `len` bytes: `{"pad":"xxx…"}` merged into `base`.
fn padded(base: Value, len: usize) -> Vec<u8> {
    let mut body = base;
    body["pad"] = "".into();
    let bare = serde_json::to_vec(&body).unwrap().len();
    body["pad"] = "x".repeat(len.saturating_sub(bare)).into();
    let bytes = serde_json::to_vec(&body).unwrap();
    assert_eq!(bytes.len(), len);
    bytes
}

async fn post_bytes(app: &App, path: &str, token: &str, body: Vec<u8>) -> (u16, Value) {
    let response = app
        .http
        .post(app.url(path))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// POST `body` with `Transfer-Encoding: chunked` (no declared length) over a
/// raw socket; the status and the JSON answer.
async fn post_chunked(app: &App, path: &str, token: &str, body: &[u8]) -> (u16, Value) {
    let addr = app.base.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    // Read while writing: the server may answer before the body ends.
    let reader = tokio::spawn(async move {
        let mut answer = Vec::new();
        let _ = read.read_to_end(&mut answer).await;
        answer
    });
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    let mut wire = head.into_bytes();
    for chunk in body.chunks(16 * 1024) {
        wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        wire.extend_from_slice(chunk);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    // The server may close early; what it answered is still read.
    let _ = write.write_all(&wire).await;
    let _ = write.shutdown().await;
    let answer = String::from_utf8_lossy(&reader.await.unwrap()).into_owned();
    let status: u16 = answer
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"))
        .parse()
        .unwrap();
    let (headers, payload) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let payload = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // One chunk is enough for a small JSON error.
        payload
            .split_once("\r\n")
            .map(|(_, rest)| rest.split("\r\n").next().unwrap_or(""))
            .unwrap_or("")
    } else {
        payload
    };
    (status, serde_json::from_str(payload).unwrap_or(Value::Null))
}

fn assert_too_large(what: &str, status: u16, body: &Value) {
    assert_eq!(status, 413, "{what}: {body}");
    assert_eq!(body["error"]["code"], "payload_too_large", "{what}: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("http.body_limit")),
        "{what}: {body}"
    );
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_and_write_nothing() {
    with_app(300, |app| async move {
        let limit = app.settings.http.body_limit;
        let seeded = app.seed("limits", &["cat", "dog"], 2).await;
        let admin = app.token("root", Role::Admin).await;
        let alice = app.token("alice", Role::Reviewer).await;
        let projects_before = project::Entity::find().count(app.db()).await.unwrap();

        // A new project, declared length one byte over.
        let create = padded(json!({ "name": "big", "classes": ["a", "b"] }), limit + 1);
        let (status, body) = post_bytes(&app, "/api/v1/projects", &admin, create.clone()).await;
        assert_too_large("create project", status, &body);
        // The same, chunked with no length.
        let (status, body) = post_chunked(&app, "/api/v1/projects", &admin, &create).await;
        assert_too_large("create project, chunked", status, &body);
        assert_eq!(
            project::Entity::find().count(app.db()).await.unwrap(),
            projects_before,
            "no project created"
        );

        // An endpoint that takes no body at all must not act on one either:
        // an oversized claim claims nothing.
        let claim_path = "/api/v1/projects/limits/review/next";
        let (status, body) =
            post_bytes(&app, claim_path, &alice, padded(json!({}), limit + 1)).await;
        assert_too_large("claim", status, &body);
        let (status, body) =
            post_chunked(&app, claim_path, &alice, &padded(json!({}), limit * 2)).await;
        assert_too_large("claim, chunked", status, &body);
        for task in &seeded.tasks {
            let t = app.task(task.task_id).await;
            assert_eq!(t.state, TaskState::Open, "nothing claimed");
            assert_eq!(t.fencing_token, 0);
        }

        // A real claim, then an oversized submit and skip on it.
        let (status, claimed) = app.post(claim_path, &alice, json!({})).await;
        assert_eq!(status, 200, "{claimed}");
        let task = claimed["task_id"].as_str().unwrap().to_owned();
        let token = claimed["fencing_token"].as_i64().unwrap();
        let submit = padded(json!({ "fencing_token": token, "class": "cat" }), limit + 1);
        let (status, body) = post_bytes(
            &app,
            &format!("/api/v1/review/{task}/submit"),
            &alice,
            submit,
        )
        .await;
        assert_too_large("submit", status, &body);
        let skip = json!({ "fencing_token": token, "reason": "y".repeat(limit + 1) });
        let (status, body) = post_chunked(
            &app,
            &format!("/api/v1/review/{task}/skip"),
            &alice,
            &serde_json::to_vec(&skip).unwrap(),
        )
        .await;
        assert_too_large("skip, chunked", status, &body);
        assert_eq!(label::Entity::find().count(app.db()).await.unwrap(), 0);
        let t = app.task(task.parse().unwrap()).await;
        assert_eq!(t.state, TaskState::Claimed);
        assert_eq!(app.skips(t.id).await.0, 0, "no skip recorded");

        // A body at the limit is read as usual (here: a valid submit).
        let at_limit = padded(json!({ "fencing_token": token, "class": "cat" }), limit);
        let (status, body) = post_bytes(
            &app,
            &format!("/api/v1/review/{task}/submit"),
            &alice,
            at_limit,
        )
        .await;
        println!("a submit of exactly {limit} bytes: {status} {body}");
        assert_ne!(status, 413, "{body}");
        assert_eq!(status, 200, "{body}");
        assert_eq!(label::Entity::find().count(app.db()).await.unwrap(), 1);
    })
    .await;
}
