//! The scheduler's `/metrics` runs database queries and names every project
//! and class, so it is not open to anyone: on the API port it takes a token
//! with role `ops` or `admin` for every project; with `http.metrics_bind`
//! set it is served only on that listener, and the API port has none.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use sieve_scheduler::auth;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::projects;
use sieve_testkit::{App, with_app, with_app_configured};

const CLASSES: [&str; 2] = ["cat", "dog"];

async fn scrape(app: &App, url: String, token: Option<&str>) -> (u16, String) {
    let mut request = app.http.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Prometheus text that names the seeded project (its gauges are read from
/// the database at the scrape).
fn names_the_project(text: &str) -> bool {
    text.contains("project=\"hidden\"")
}

#[tokio::test]
async fn metrics_on_the_api_port_need_an_ops_or_admin_token() {
    with_app(300, |app| async move {
        app.seed("hidden", &CLASSES, 2).await;
        let url = app.url("/metrics");
        let project = projects::get(app.db(), "hidden").await.unwrap();
        let scoped_ops =
            auth::create_scoped_token(app.db(), "ops-scoped", Role::Ops, Some(&project))
                .await
                .unwrap();
        let reviewer = app.token("rev", Role::Reviewer).await;
        let ml = app.token("ml", Role::Ml).await;
        for (who, token, expected) in [
            ("no token", None, 401),
            ("a bad token", Some("sieve_0000"), 401),
            ("a reviewer", Some(reviewer.as_str()), 403),
            ("ml", Some(ml.as_str()), 403),
            ("ops scoped to one project", Some(scoped_ops.as_str()), 403),
        ] {
            let (status, body) = scrape(&app, url.clone(), token).await;
            assert_eq!(status, expected, "{who}: {body}");
            assert!(!names_the_project(&body), "{who} read the metrics");
            assert!(!body.contains("sieve_"), "{who}: {body}");
        }
        for role in [Role::Ops, Role::Admin] {
            let token = app.token("scraper", role).await;
            let (status, body) = scrape(&app, url.clone(), Some(&token)).await;
            assert_eq!(status, 200, "{role:?}: {body}");
            assert!(names_the_project(&body), "{role:?}: {body}");
        }
    })
    .await;
}

#[tokio::test]
async fn metrics_bind_serves_them_on_their_own_listener_only() {
    with_app_configured(
        300,
        |settings| settings.http.metrics_bind = Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        |app| async move {
            app.seed("hidden", &CLASSES, 2).await;
            let metrics = app.metrics_base.clone().unwrap();
            assert_ne!(metrics, app.base);

            let (status, body) = scrape(&app, format!("{metrics}/metrics"), None).await;
            assert_eq!(status, 200, "{body}");
            assert!(names_the_project(&body), "{body}");

            // The API port has no /metrics at all, whatever the token.
            let admin = app.token("admin", Role::Admin).await;
            for token in [None, Some(admin.as_str())] {
                let (status, body) = scrape(&app, app.url("/metrics"), token).await;
                assert_eq!(status, 404, "{body}");
                assert!(!names_the_project(&body));
            }
            // And the metrics port nothing but /metrics.
            for path in ["/api/v1/projects", "/healthz", "/review"] {
                let (status, _) = scrape(&app, format!("{metrics}{path}"), Some(&admin)).await;
                assert_eq!(status, 404, "{path} on the metrics listener");
            }
            let (status, _) = scrape(&app, app.url("/api/v1/projects"), Some(&admin)).await;
            assert_eq!(status, 200, "the API still answers on its port");
        },
    )
    .await;
}
