//! The scheduler serving HTTP on port 0 on a [`Sandbox`], and what tests
//! do with it: tokens, seeded review tasks, JSON requests.

use std::future::Future;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;

use bytes::Bytes;
use chrono::Utc;
use futures_util::FutureExt;
use sea_orm::{
    ActiveValue::Set, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, Statement,
};
use sieve_scheduler::auth;
use sieve_scheduler::context::Context;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::review_task::{self, TaskReason, TaskState};
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_shared::Settings;
use sieve_shared::messages::ModelArch;
use sieve_shared::store::{image_key, sha256_hex};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::fixtures::png;
use crate::sandbox::Sandbox;

/// What a test body gets: cheap to clone, so the body can own it.
#[derive(Clone)]
pub struct App {
    pub settings: Settings,
    pub ctx: Context,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// `http://127.0.0.1:PORT` of the `/metrics` listener, when
    /// `http.metrics_bind` was set.
    pub metrics_base: Option<String>,
    pub http: reqwest::Client,
}

/// A running scheduler (`server::serve_on`: HTTP and every loop) on its own
/// sandbox. Dropping it stops the server and removes the sandbox;
/// [`TestApp::shutdown`] stops it gracefully and checks it ended well.
pub struct TestApp {
    pub app: App,
    stop: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    // Declared last: dropped after the server is told to stop.
    sandbox: Sandbox,
}

impl Deref for TestApp {
    type Target = App;

    fn deref(&self) -> &App {
        &self.app
    }
}

impl TestApp {
    /// A sandbox with settings changed by `configure`, and the scheduler
    /// serving on it. A `http.metrics_bind` that `configure` sets is bound
    /// (port 0 picks one) and replaced by the address bound.
    pub async fn start(configure: impl FnOnce(&mut Settings)) -> Self {
        let mut sandbox = Sandbox::start(configure).await;
        let settings = &mut sandbox.settings;
        let listener = TcpListener::bind(settings.http.bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        settings.http.api_url = format!("http://{addr}");
        let metrics = match settings.http.metrics_bind {
            Some(bind) => {
                let metrics = TcpListener::bind(bind).await.unwrap();
                settings.http.metrics_bind = Some(metrics.local_addr().unwrap());
                Some(metrics)
            }
            None => None,
        };
        let settings = settings.clone();
        let metrics_base = settings.http.metrics_bind.map(|a| format!("http://{a}"));
        let ctx = Context::connect(settings.clone()).await.unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let server = tokio::spawn(sieve_scheduler::server::serve_on(
            ctx.clone(),
            listener,
            metrics,
            async move { s.cancelled().await },
        ));
        Self {
            app: App {
                settings,
                ctx,
                base: format!("http://{addr}"),
                metrics_base,
                http: reqwest::Client::new(),
            },
            stop,
            server: Some(server),
            sandbox,
        }
    }

    /// The token that stops the server; whatever else a test starts beside
    /// it (workers) can stop with it.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// The object-store directory.
    pub fn store(&self) -> &std::path::Path {
        self.sandbox.store.path()
    }

    /// Stop the server, wait until it drained, assert it ended without an
    /// error; then remove the sandbox.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        self.app.ctx.db.clone().close().await.ok();
        self.app.ctx.claims.clone().close().await.ok();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Start a scheduler with review leases of `lease_seconds`, run `test`,
/// then stop it and remove its sandbox, whatever happened; a panic in
/// `test` is raised again after.
pub async fn with_app<F, Fut>(lease_seconds: u64, test: F)
where
    F: FnOnce(App) -> Fut,
    Fut: Future<Output = ()>,
{
    with_app_configured(lease_seconds, |_| {}, test).await;
}

/// [`with_app`] with settings changed by `configure` first.
pub async fn with_app_configured<C, F, Fut>(lease_seconds: u64, configure: C, test: F)
where
    C: FnOnce(&mut Settings),
    F: FnOnce(App) -> Fut,
    Fut: Future<Output = ()>,
{
    let app = TestApp::start(|settings| {
        settings.review.lease_seconds = lease_seconds;
        configure(settings);
    })
    .await;
    let outcome = AssertUnwindSafe(test(app.app.clone())).catch_unwind().await;
    match outcome {
        Ok(()) => app.shutdown().await,
        Err(panic) => {
            drop(app);
            std::panic::resume_unwind(panic);
        }
    }
}

/// A seeded project: its tasks in the order the queue hands them out.
pub struct Seeded {
    pub project: Project,
    pub tasks: Vec<SeededTask>,
}

#[derive(Clone, Debug)]
pub struct SeededTask {
    pub task_id: Uuid,
    pub item_id: Uuid,
    pub source: String,
    /// The class index the model proposed.
    pub proposed: usize,
}

impl App {
    pub fn db(&self) -> &DatabaseConnection {
        &self.ctx.db
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn token(&self, name: &str, role: Role) -> String {
        auth::create_token(self.db(), name, role).await.unwrap()
    }

    /// A project with `tasks` open review tasks, each on an item whose PNG
    /// is in the store and with a prediction by a registered model version.
    /// Task `i` proposes class `i % classes.len()` and is handed out `i`-th.
    pub async fn seed(&self, name: &str, classes: &[&str], tasks: usize) -> Seeded {
        self.seed_on(ModelArch::SmallCnn, name, classes, tasks)
            .await
    }

    /// [`App::seed`] for a project on `arch`.
    pub async fn seed_on(
        &self,
        arch: ModelArch,
        name: &str,
        classes: &[&str],
        tasks: usize,
    ) -> Seeded {
        let db = self.db();
        let classes: Vec<String> = classes.iter().map(|c| (*c).to_owned()).collect();
        let project = projects::create(
            db,
            &ProjectName::parse(name).unwrap(),
            &ClassNames::parse(&classes).unwrap(),
            &Policy::default(),
            arch,
            sieve_shared::kind::TaskKind::Classification,
        )
        .await
        .unwrap();
        let version = Uuid::now_v7();
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO model_versions (id, project_id, version, status) VALUES ($1, $2, 1, 'candidate')",
            [version.into(), project.id.as_uuid().into()],
        ))
        .await
        .unwrap();

        let now = Utc::now().fixed_offset();
        let mut seeded = Vec::new();
        for i in 0..tasks {
            let bytes = png(i);
            let hash = sha256_hex(&bytes);
            let key = image_key(name, &hash);
            self.ctx
                .store
                .put(&key, Bytes::from(bytes.clone()))
                .await
                .unwrap();
            let item_id = Uuid::now_v7();
            let source = format!("photos/item-{i}.png");
            item::Entity::insert(item::ActiveModel {
                id: Set(item_id),
                project_id: Set(project.id.as_uuid()),
                object_key: Set(key),
                source: Set(source.clone()),
                content_hash: Set(hash),
                size_bytes: Set(bytes.len() as i64),
                width: Set(Some(28)),
                height: Set(Some(28)),
                state: Set(ItemState::InReview),
                attempts: Set(0),
                last_error: Set(None),
                dispatched_at: Set(None),
                created_at: Set(now),
                updated_at: Set(now),
            })
            .exec_without_returning(db)
            .await
            .unwrap();

            let k = classes.len();
            let proposed = i % k;
            let mut probabilities = vec![0.4 / (k - 1) as f32; k];
            probabilities[proposed] = 0.6;
            let votes = vec![
                proposed as u32,
                proposed as u32,
                ((proposed + 1) % k) as u32,
            ];
            let prediction = Uuid::now_v7();
            db.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                r#"INSERT INTO predictions (id, item_id, model_version_id, job_id, worker_id,
                       probabilities, member_votes, top_class, confidence, margin, entropy,
                       disagreement, mutual_information, routed_to)
                   VALUES ($1, $2, $3, $4, 'test', $5, $6, $7, 0.6, 0.4, 0.9, 0.33, 0.1, 'review')"#,
                [
                    prediction.into(),
                    item_id.into(),
                    version.into(),
                    Uuid::now_v7().into(),
                    serde_json::json!(probabilities).into(),
                    serde_json::json!(votes).into(),
                    (proposed as i32).into(),
                ],
            ))
            .await
            .unwrap();

            let task_id = Uuid::now_v7();
            review_task::Entity::insert(review_task::ActiveModel {
                id: Set(task_id),
                project_id: Set(project.id.as_uuid()),
                item_id: Set(item_id),
                prediction_id: Set(Some(prediction)),
                reason: Set(TaskReason::LowConfidence),
                priority: Set((tasks - i) as f32),
                state: Set(TaskState::Open),
                lease_holder: Set(None),
                lease_expires_at: Set(None),
                fencing_token: Set(0),
                created_at: Set(now),
                updated_at: Set(now),
                closed_at: Set(None),
            })
            .exec_without_returning(db)
            .await
            .unwrap();
            seeded.push(SeededTask {
                task_id,
                item_id,
                source,
                proposed,
            });
        }
        Seeded {
            project,
            tasks: seeded,
        }
    }

    pub async fn task(&self, id: Uuid) -> review_task::Model {
        review_task::Entity::find_by_id(id)
            .one(self.db())
            .await
            .unwrap()
            .unwrap()
    }

    /// (skip_count, last_skip_reason, last_skipped_by) of a task.
    pub async fn skips(&self, id: Uuid) -> (i32, Option<String>, Option<String>) {
        let row = self
            .db()
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT skip_count, last_skip_reason, last_skipped_by FROM review_tasks WHERE id = $1",
                [id.into()],
            ))
            .await
            .unwrap()
            .unwrap();
        (
            row.try_get("", "skip_count").unwrap(),
            row.try_get("", "last_skip_reason").unwrap(),
            row.try_get("", "last_skipped_by").unwrap(),
        )
    }

    /// Pretend the lease of a task ran out.
    pub async fn expire_lease(&self, id: Uuid) {
        self.db()
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE review_tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
                [id.into()],
            ))
            .await
            .unwrap();
    }

    /// As a reviewer (`token`), claim the next task of `project` and submit
    /// `class` for it over HTTP, both answered 200; returns the task claimed.
    pub async fn label_next(&self, project: &str, token: &str, class: &str) -> serde_json::Value {
        let (status, task) = self
            .post(
                &format!("/api/v1/projects/{project}/review/next"),
                token,
                serde_json::json!({}),
            )
            .await;
        assert_eq!(status, 200, "{task}");
        let (status, body) = self
            .post(
                &format!(
                    "/api/v1/review/{}/submit",
                    task["task_id"].as_str().unwrap()
                ),
                token,
                serde_json::json!({ "fencing_token": task["fencing_token"], "class": class }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        task
    }

    /// POST a JSON body with a token; the status and the JSON answer
    /// (`Null` when there is none).
    pub async fn post(
        &self,
        path: &str,
        token: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_default())
    }

    pub async fn get(&self, path: &str, token: &str) -> (u16, serde_json::Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_default())
    }
}
