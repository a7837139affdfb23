//! API tokens over their life (issue 21 item 6): an admin lists, creates
//! (with an expiry) and revokes them; a revoked or expired token gets 401
//! at once, even for a claim it holds; nobody but an admin manages them.

#![allow(clippy::unwrap_used)]

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::json;
use sieve_scheduler::entities::api_token::Role;
use sieve_testkit::with_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_listed_created_revoked_and_expire() {
    with_app(300, |app| async move {
        app.seed("shoes", &["boot", "sneaker"], 2).await;
        let admin = app.token("ada", Role::Admin).await;
        let ml = app.token("mia", Role::Ml).await;

        // Only an admin manages tokens.
        let (status, _) = app.get("/api/v1/tokens", &ml).await;
        assert_eq!(status, 403);
        let (status, created) = app
            .post(
                "/api/v1/tokens",
                &admin,
                json!({ "name": "rita", "role": "reviewer", "project": "shoes", "expires_in_seconds": 3600 }),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        let rita = created["token"].as_str().unwrap().to_owned();
        let rita_id = created["id"].as_str().unwrap().to_owned();
        let (status, listed) = app.get("/api/v1/tokens", &admin).await;
        assert_eq!(status, 200, "{listed}");
        let row = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == json!(rita_id))
            .unwrap()
            .clone();
        assert_eq!(row["state"], "active");
        assert_eq!(row["role"], "reviewer");
        assert!(row["expires_at"].is_string(), "{row}");
        // The secret is never listed.
        assert!(!listed.to_string().contains(&rita), "{listed}");

        // Rita claims a task; her token is revoked mid-claim.
        let (status, claim) = app
            .post("/api/v1/projects/shoes/review/next", &rita, json!({}))
            .await;
        assert_eq!(status, 200, "{claim}");
        let (status, revoked) = app
            .post(&format!("/api/v1/tokens/{rita_id}/revoke"), &admin, json!({}))
            .await;
        assert_eq!(status, 200, "{revoked}");
        assert_eq!(revoked["state"], "revoked");
        let (status, _) = app
            .post(
                &format!("/api/v1/review/{}/submit", claim["task_id"].as_str().unwrap()),
                &rita,
                json!({ "fencing_token": claim["fencing_token"], "class": "boot" }),
            )
            .await;
        assert_eq!(status, 401, "a revoked token submitted a label");
        let (status, _) = app.get("/api/v1/projects/shoes", &rita).await;
        assert_eq!(status, 401);

        // An expired token is refused the same way.
        let (_, created) = app
            .post(
                "/api/v1/tokens",
                &admin,
                json!({ "name": "temp", "role": "reviewer", "expires_in_seconds": 3600 }),
            )
            .await;
        let temp = created["token"].as_str().unwrap().to_owned();
        let (status, _) = app.get("/api/v1/projects", &temp).await;
        assert_eq!(status, 200);
        app.db()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE name = $1",
                ["temp".into()],
            ))
            .await
            .unwrap();
        let (status, _) = app.get("/api/v1/projects", &temp).await;
        assert_eq!(status, 401);
        let (_, listed) = app.get("/api/v1/tokens", &admin).await;
        let states: Vec<(String, String)> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["name"].as_str().unwrap().to_owned(), t["state"].as_str().unwrap().to_owned()))
            .collect();
        assert!(states.contains(&("temp".into(), "expired".into())), "{states:?}");
        assert!(states.contains(&("rita".into(), "revoked".into())), "{states:?}");

        // Bad input is refused with what was wrong.
        let (status, body) = app
            .post("/api/v1/tokens", &admin, json!({ "name": "x", "role": "boss" }))
            .await;
        assert_eq!(status, 422, "{body}");
        let (status, body) = app
            .post("/api/v1/tokens", &admin, json!({ "name": "x", "role": "ops", "expires_in_seconds": 0 }))
            .await;
        assert_eq!(status, 422, "{body}");
        let (status, _) = app
            .post("/api/v1/tokens/nobody/revoke", &admin, json!({}))
            .await;
        assert_eq!(status, 404);
    })
    .await;
}
