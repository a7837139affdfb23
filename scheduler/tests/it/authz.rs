//! The authorization matrix on the real services: every `/api/v1` endpoint ×
//! every role, plus no token, a bad token, an expired and a revoked one.
//! Missing or invalid credentials give 401, a role without the right gives
//! 403, and a role with it gets past authorization (whatever the endpoint
//! then says about its input). A token scoped to one project acts only
//! there.

#![allow(clippy::unwrap_used)]

use chrono::{Duration, Utc};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{Value, json};
use sieve_scheduler::auth::{self, Action, allows};
use sieve_scheduler::entities::api_token::{self, Role};
use sieve_scheduler::entities::review_task::TaskState;
use sieve_shared::store::sha256_hex;
use sieve_testkit::with_app;

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
            (
                "POST",
                format!("/api/v1/projects/{p}/ingest"),
                serde_json::json!({"prefix": "store:nothing/here"}),
                Action::Operate,
            ),
            (
                "GET",
                format!("/api/v1/ingests/{}", uuid::Uuid::now_v7()),
                serde_json::Value::Null,
                Action::Operate,
            ),
            (
                "GET",
                format!("/api/v1/projects/{p}/ingests"),
                serde_json::Value::Null,
                Action::Operate,
            ),
            (
                "POST",
                format!("/api/v1/projects/{p}/pause"),
                serde_json::Value::Null,
                Action::Operate,
            ),
            (
                "POST",
                format!("/api/v1/projects/{p}/resume"),
                serde_json::Value::Null,
                Action::Operate,
            ),
            (
                "GET",
                format!("/api/v1/projects/{p}/dispatch"),
                serde_json::Value::Null,
                Action::Read,
            ),
            (
                "PUT",
                format!("/api/v1/projects/{p}/dispatch"),
                serde_json::json!({"priority": 1}),
                Action::Operate,
            ),
            (
                "PATCH",
                format!("/api/v1/projects/{p}/policy"),
                serde_json::json!({"confidence_threshold": 7.0}),
                Action::ManageProjects,
            ),
            (
                "GET",
                format!("/api/v1/projects/{p}/export?format=nope"),
                serde_json::Value::Null,
                Action::Export,
            ),
            (
                "GET",
                format!("/api/v1/projects/{p}/items"),
                serde_json::Value::Null,
                Action::Read,
            ),
            (
                "GET",
                format!("/api/v1/items/{item}"),
                serde_json::Value::Null,
                Action::Read,
            ),
            (
                "GET",
                format!("/api/v1/projects/{p}/reviewers"),
                serde_json::Value::Null,
                Action::ReadReviewerFigures,
            ),
            (
                "POST",
                format!("/api/v1/items/{item}/reopen"),
                serde_json::json!({"reason": "looks wrong"}),
                Action::Review,
            ),
            (
                "GET",
                "/api/v1/tokens".into(),
                serde_json::Value::Null,
                Action::ManageTokens,
            ),
            (
                "POST",
                "/api/v1/tokens".into(),
                serde_json::json!({"name": "x", "role": "nobody"}),
                Action::ManageTokens,
            ),
            (
                "POST",
                format!("/api/v1/tokens/{}/revoke", uuid::Uuid::now_v7()),
                serde_json::Value::Null,
                Action::ManageTokens,
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
                    "PATCH" => app.http.patch(app.url(path)),
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

/// A token scoped to one project acts only there: other projects, and their
/// tasks and items, answer 404 as if they did not exist; what spans every
/// project answers 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_tokens_act_only_on_their_project() {
    with_app(60, |app| async move {
        let mine = app.seed("mine", &["cat", "dog"], 2).await;
        let theirs = app.seed("theirs", &["cat", "dog"], 2).await;
        let scoped = |name: &'static str, role: Role| {
            let app = app.clone();
            let project = mine.project.clone();
            async move {
                auth::create_scoped_token(app.db(), name, role, Some(&project))
                    .await
                    .unwrap()
            }
        };
        let reviewer = scoped("scoped-reviewer", Role::Reviewer).await;
        let ml = scoped("scoped-ml", Role::Ml).await;
        let admin = scoped("scoped-admin", Role::Admin).await;
        let ops = scoped("scoped-ops", Role::Ops).await;
        let global = app.token("global-admin", Role::Admin).await;
        // An ingest of each project, started by a global token.
        let ingest_of = |project: &'static str| {
            let (app, global) = (app.clone(), global.clone());
            async move {
                let (status, run) = app
                    .post(
                        &format!("/api/v1/projects/{project}/ingest"),
                        &global,
                        json!({"prefix": "store:nothing/here"}),
                    )
                    .await;
                assert_eq!(status, 202, "{run}");
                run["id"].as_str().unwrap().to_owned()
            }
        };
        let my_ingest = ingest_of("mine").await;
        let their_ingest = ingest_of("theirs").await;
        assert_eq!(
            app.get(&format!("/api/v1/ingests/{my_ingest}"), &ops)
                .await
                .0,
            200
        );
        assert_eq!(
            app.post("/api/v1/projects/mine/pause", &ops, Value::Null)
                .await
                .0,
            200
        );

        // Its own project works as for any token of its role.
        let (status, claimed) = app
            .post("/api/v1/projects/mine/review/next", &reviewer, json!({}))
            .await;
        assert_eq!(status, 200, "{claimed}");
        let task = claimed["task_id"].as_str().unwrap().to_owned();
        assert_eq!(
            app.get(&format!("/api/v1/review/{task}"), &reviewer)
                .await
                .0,
            200
        );
        let (status, listed) = app.get("/api/v1/projects", &reviewer).await;
        assert_eq!(status, 200);
        let names: Vec<&str> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["mine"], "other projects are not listed");
        let (_, all) = app.get("/api/v1/projects", &global).await;
        assert_eq!(all.as_array().unwrap().len(), 2);
        assert_eq!(app.get("/api/v1/projects/mine/policy", &ml).await.0, 200);

        // Another project, its tasks and its items: 404, nothing written.
        let their_task = theirs.tasks[0].task_id;
        let their_item = theirs.tasks[0].item_id;
        for (method, path, body, token) in [
            (
                "POST",
                "/api/v1/projects/theirs/review/next".to_owned(),
                json!({}),
                &reviewer,
            ),
            (
                "GET",
                "/api/v1/projects/theirs".to_owned(),
                Value::Null,
                &reviewer,
            ),
            (
                "GET",
                "/api/v1/projects/theirs/policy".to_owned(),
                Value::Null,
                &ml,
            ),
            (
                "PUT",
                "/api/v1/projects/theirs/policy".to_owned(),
                json!({"confidence_threshold": 0.5}),
                &ml,
            ),
            (
                "GET",
                "/api/v1/projects/theirs/models".to_owned(),
                Value::Null,
                &ml,
            ),
            (
                "POST",
                "/api/v1/projects/theirs/retrain".to_owned(),
                Value::Null,
                &admin,
            ),
            (
                "GET",
                format!("/api/v1/review/{their_task}"),
                Value::Null,
                &reviewer,
            ),
            (
                "POST",
                format!("/api/v1/review/{their_task}/submit"),
                json!({"fencing_token": 1, "class": "cat"}),
                &reviewer,
            ),
            (
                "POST",
                format!("/api/v1/review/{their_task}/release"),
                json!({"fencing_token": 1}),
                &reviewer,
            ),
            (
                "POST",
                format!("/api/v1/review/{their_task}/renew"),
                json!({"fencing_token": 1}),
                &reviewer,
            ),
            (
                "POST",
                format!("/api/v1/review/{their_task}/skip"),
                json!({"fencing_token": 1, "reason": "x"}),
                &reviewer,
            ),
            (
                "POST",
                format!("/api/v1/review/{their_task}/undo"),
                json!({"fencing_token": 1}),
                &reviewer,
            ),
            (
                "GET",
                format!("/api/v1/items/{their_item}/image"),
                Value::Null,
                &reviewer,
            ),
            (
                "POST",
                "/api/v1/projects/theirs/ingest".to_owned(),
                json!({"prefix": "store:nothing/here"}),
                &ops,
            ),
            (
                "GET",
                format!("/api/v1/ingests/{their_ingest}"),
                Value::Null,
                &ops,
            ),
            (
                "GET",
                "/api/v1/projects/theirs/ingests".to_owned(),
                Value::Null,
                &ops,
            ),
            (
                "POST",
                "/api/v1/projects/theirs/pause".to_owned(),
                Value::Null,
                &ops,
            ),
            (
                "POST",
                "/api/v1/projects/theirs/resume".to_owned(),
                Value::Null,
                &admin,
            ),
            (
                "GET",
                "/api/v1/projects/theirs/dispatch".to_owned(),
                Value::Null,
                &reviewer,
            ),
            (
                "PUT",
                "/api/v1/projects/theirs/dispatch".to_owned(),
                json!({"priority": 2}),
                &ops,
            ),
            (
                "GET",
                "/api/v1/projects/theirs/export?format=csv".to_owned(),
                Value::Null,
                &ml,
            ),
            (
                "GET",
                "/api/v1/projects/theirs/items".to_owned(),
                Value::Null,
                &reviewer,
            ),
            (
                "GET",
                format!("/api/v1/items/{their_item}"),
                Value::Null,
                &reviewer,
            ),
            (
                "POST",
                format!("/api/v1/items/{their_item}/reopen"),
                json!({"reason": "looks wrong"}),
                &reviewer,
            ),
            (
                "GET",
                "/api/v1/projects/theirs/reviewers".to_owned(),
                Value::Null,
                &ops,
            ),
            (
                "GET",
                "/api/v1/projects/theirs/reviewers?since=1h".to_owned(),
                Value::Null,
                &ml,
            ),
        ] {
            let mut request = match method {
                "GET" => app.http.get(app.url(&path)),
                "PUT" => app.http.put(app.url(&path)),
                _ => app.http.post(app.url(&path)),
            };
            request = request.bearer_auth(token);
            if !body.is_null() {
                request = request.json(&body);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let answer: Value = response.json().await.unwrap_or_default();
            assert_eq!(status, 404, "{method} {path}: {answer}");
            assert_eq!(answer["error"]["code"], "not_found", "{method} {path}");
        }
        // The same 404 as an ingest or a project that does not exist:
        // nothing to learn.
        let nobody = uuid::Uuid::now_v7();
        let (_, missing) = app.get(&format!("/api/v1/ingests/{nobody}"), &ops).await;
        let (_, hidden) = app
            .get(&format!("/api/v1/ingests/{their_ingest}"), &ops)
            .await;
        assert_eq!(
            missing["error"]["message"]
                .as_str()
                .unwrap()
                .replace(&nobody.to_string(), &their_ingest),
            hidden["error"]["message"].as_str().unwrap()
        );
        let (_, missing) = app
            .post("/api/v1/projects/nowhere/review/next", &reviewer, json!({}))
            .await;
        let (_, hidden) = app
            .post("/api/v1/projects/theirs/review/next", &reviewer, json!({}))
            .await;
        assert_eq!(
            missing["error"]["message"]
                .as_str()
                .unwrap()
                .replace("nowhere", "theirs"),
            hidden["error"]["message"].as_str().unwrap()
        );
        let untouched = app.task(their_task).await;
        assert_eq!(untouched.state, TaskState::Open);
        assert_eq!(untouched.fencing_token, 0);

        // What spans every project: 403 even for a scoped admin.
        let (status, body) = app
            .post(
                "/api/v1/projects",
                &admin,
                json!({"name": "new", "classes": ["a", "b"]}),
            )
            .await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(app.get("/api/v1/status", &admin).await.0, 403);
        // The role still limits a scoped token within its project.
        assert_eq!(
            app.post("/api/v1/projects/mine/retrain", &reviewer, Value::Null)
                .await
                .0,
            403
        );
    })
    .await;
}
