//! The authorization matrix on the real services: every `/api/v1` endpoint ×
//! every role, plus no token, a bad token, an expired and a revoked one.
//! Missing or invalid credentials give 401, a role without the right gives
//! 403, and a role with it gets past authorization (whatever the endpoint
//! then says about its input).

#![allow(clippy::unwrap_used)]

mod review_support;

use chrono::{Duration, Utc};
use review_support::with_app;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use sieve_scheduler::auth::{Action, allows};
use sieve_scheduler::entities::api_token::{self, Role};
use sieve_shared::store::sha256_hex;

const ROLES: [Role; 4] = [Role::Reviewer, Role::Ml, Role::Ops, Role::Admin];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_by_every_role() {
    with_app(60, |app| async move {
        let seeded = app.seed("authz", &["cat", "dog"], 2).await;
        let task = seeded.tasks[0].task_id;
        let item = seeded.tasks[0].item_id;
        let p = "authz";
        // (method, path, body, the right it needs)
        let endpoints: Vec<(&str, String, serde_json::Value, Action)> = vec![
            (
                "GET",
                "/api/v1/projects".into(),
                serde_json::Value::Null,
                Action::Read,
            ),
            (
                "POST",
                "/api/v1/projects".into(),
                serde_json::json!({"name": "", "classes": []}),
                Action::ManageProjects,
            ),
            (
                "GET",
                format!("/api/v1/projects/{p}"),
                serde_json::Value::Null,
                Action::Read,
            ),
            (
                "GET",
                format!("/api/v1/projects/{p}/policy"),
                serde_json::Value::Null,
                Action::Read,
            ),
            (
                "PUT",
                format!("/api/v1/projects/{p}/policy"),
                serde_json::json!({"confidence_threshold": 7.0}),
                Action::ManageProjects,
            ),
            (
                "GET",
                format!("/api/v1/projects/{p}/models"),
                serde_json::Value::Null,
                Action::Read,
            ),
            (
                "GET",
                format!("/api/v1/projects/{p}/models/1"),
                serde_json::Value::Null,
                Action::Read,
            ),
            (
                "POST",
                format!("/api/v1/projects/{p}/retrain"),
                serde_json::Value::Null,
                Action::Train,
            ),
            (
                "POST",
                format!("/api/v1/projects/{p}/retrain/cancel"),
                serde_json::Value::Null,
                Action::Train,
            ),
            (
                "POST",
                format!("/api/v1/projects/{p}/review/next"),
                serde_json::Value::Null,
                Action::Review,
            ),
            (
                "GET",
                format!("/api/v1/review/{task}"),
                serde_json::Value::Null,
                Action::Review,
            ),
            (
                "POST",
                format!("/api/v1/review/{task}/submit"),
                serde_json::json!({"fencing_token": -1, "class": "cat"}),
                Action::Review,
            ),
            (
                "POST",
                format!("/api/v1/review/{task}/release"),
                serde_json::json!({"fencing_token": -1}),
                Action::Review,
            ),
            (
                "POST",
                format!("/api/v1/review/{task}/renew"),
                serde_json::json!({"fencing_token": -1}),
                Action::Review,
            ),
            (
                "POST",
                format!("/api/v1/review/{task}/skip"),
                serde_json::json!({"fencing_token": -1, "reason": "x"}),
                Action::Review,
            ),
            (
                "POST",
                format!("/api/v1/review/{task}/undo"),
                serde_json::json!({"fencing_token": -1}),
                Action::Review,
            ),
            (
                "GET",
                format!("/api/v1/items/{item}/image"),
                serde_json::Value::Null,
                Action::Review,
            ),
            (
                "GET",
                "/api/v1/status".into(),
                serde_json::Value::Null,
                Action::Operate,
            ),
        ];

        let mut tokens = Vec::new();
        for role in ROLES {
            tokens.push((
                format!("{role:?}"),
                Some(role),
                app.token(&format!("{role:?}"), role).await,
            ));
        }
        // An expired and a revoked admin token: both worthless.
        let expired = app.token("expired", Role::Admin).await;
        let revoked = app.token("revoked", Role::Admin).await;
        for (secret, column, when) in [
            (
                &expired,
                api_token::Column::ExpiresAt,
                Utc::now() - Duration::minutes(1),
            ),
            (&revoked, api_token::Column::RevokedAt, Utc::now()),
        ] {
            api_token::Entity::update_many()
                .col_expr(column, sea_orm::sea_query::Expr::value(when.fixed_offset()))
                .filter(api_token::Column::TokenHash.eq(sha256_hex(secret.as_bytes())))
                .exec(app.db())
                .await
                .unwrap();
        }
        tokens.push(("expired".into(), None, expired));
        tokens.push(("revoked".into(), None, revoked));
        tokens.push(("bad".into(), None, "sieve_0000".into()));
        tokens.push(("none".into(), None, String::new()));

        let mut checked = 0;
        for (method, path, body, action) in &endpoints {
            for (who, role, token) in &tokens {
                let mut request = match *method {
                    "GET" => app.http.get(app.url(path)),
                    "PUT" => app.http.put(app.url(path)),
                    _ => app.http.post(app.url(path)),
                };
                if !token.is_empty() {
                    request = request.bearer_auth(token);
                }
                if !body.is_null() {
                    request = request.json(body);
                }
                let status = request.send().await.unwrap().status().as_u16();
                let expected = match role {
                    None => Some(401),
                    Some(role) if !allows(*role, *action) => Some(403),
                    Some(_) => None,
                };
                match expected {
                    Some(code) => assert_eq!(status, code, "{method} {path} as {who}"),
                    None => assert!(
                        status != 401 && status != 403,
                        "{method} {path} as {who} was refused with {status}"
                    ),
                }
                checked += 1;
            }
        }
        println!(
            "authorization matrix: {} endpoints x {} callers = {checked} requests",
            endpoints.len(),
            tokens.len()
        );
        assert_eq!(checked, endpoints.len() * tokens.len());
    })
    .await;
}
