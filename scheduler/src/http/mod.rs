//! The HTTP API (`/api/v1`), the review page (`/review`), health and
//! metrics.
//!
//! Handlers are thin: authorize, parse, call the same domain function the CLI
//! calls, serialize. Errors become JSON bodies through [`AppError`].

mod review_page;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sea_orm::{DatabaseConnection, EntityTrait};
use serde::Deserialize;
use serde_json::json;
use sieve_shared::ids::TaskId;
use sieve_shared::messages::ModelArch;
use uuid::Uuid;

use crate::auth::{self, Action, Caller};
use crate::context::Context;
use crate::entities::item;
use crate::error::{AppError, AppResult};
use crate::ingest::Source;
use crate::ingest::prefix::Prefix;
use crate::operate::status;
use crate::policy::Policy;
use crate::projects::{self, ClassNames, Project, ProjectName};
use crate::training::RetrainRequest;
use crate::training::registry;
use crate::{dispatch, ingest, review, routing, training};

pub fn router(ctx: Context) -> Router {
    let body_limit = ctx.settings.http.body_limit;
    let api = Router::new()
        .route("/projects", get(list_projects).post(create_project))
        .route("/projects/{project}", get(show_project))
        .route(
            "/projects/{project}/policy",
            get(get_policy).put(put_policy),
        )
        .route("/projects/{project}/review/next", post(claim_next))
        .route("/projects/{project}/retrain", post(retrain))
        .route("/projects/{project}/retrain/cancel", post(cancel_retrain))
        .route("/projects/{project}/models", get(list_models))
        .route("/projects/{project}/models/{version}", get(show_model))
        .route("/projects/{project}/ingest", post(start_ingest))
        .route("/projects/{project}/ingests", get(list_ingests))
        .route("/projects/{project}/pause", post(pause))
        .route("/projects/{project}/resume", post(resume))
        .route(
            "/projects/{project}/dispatch",
            get(get_dispatch).put(put_dispatch),
        )
        .route("/ingests/{ingest}", get(show_ingest))
        .route("/status", get(fleet_status))
        .route("/review/{task}", get(show_task))
        .route("/review/{task}/submit", post(submit))
        .route("/review/{task}/release", post(release))
        .route("/review/{task}/renew", post(renew))
        .route("/review/{task}/skip", post(skip))
        .route("/review/{task}/undo", post(undo))
        .route("/items/{item}/image", get(item_image));
    Router::new()
        .nest("/api/v1", api)
        .merge(review_page::routes())
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .layer(middleware::from_fn_with_state(body_limit, limit_body))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(ctx)
}

/// Read the whole body, up to `http.body_limit`, before any handler runs: a
/// larger one gets 413 whether its length was declared or it came chunked,
/// and whether or not the endpoint reads a body, so nothing acts on it.
async fn limit_body(State(limit): State<usize>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(_) => too_large(limit).into_response(),
    }
}

fn too_large(limit: usize) -> AppError {
    AppError::TooLarge(format!(
        "the request body is over the limit of {limit} bytes (http.body_limit)"
    ))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

async fn caller(ctx: &Context, headers: &HeaderMap, action: Action) -> AppResult<Caller> {
    auth::authorize(&ctx.db, bearer(headers), action).await
}

/// JSON bodies whose parse errors come back as our JSON error (422).
struct JsonBody<T>(T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(
                AppError::TooLarge("the request body is over http.body_limit".into()),
            ),
            Err(rejection) => Err(AppError::Invalid(format!(
                "bad request body: {}",
                rejection.body_text()
            ))),
        }
    }
}

async fn healthz(State(ctx): State<Context>) -> Response {
    match ctx.db.ping().await {
        Ok(()) => Json(json!({ "status": "ok" })).into_response(),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "database": err.to_string() })),
        )
            .into_response(),
    }
}

async fn metrics_text(State(ctx): State<Context>) -> impl IntoResponse {
    // Gauges read from the database are refreshed at the scrape; if that
    // fails the rest is still served (with the accuracy gauges as they were).
    if let Err(err) = status::record_accuracy_metrics(&ctx).await {
        tracing::warn!(error = %err, "machine-label accuracy gauges not refreshed");
    }
    if let Err(err) = status::record_second_opinion_metrics(&ctx).await {
        tracing::warn!(error = %err, "second-opinion gauges not refreshed");
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        sieve_shared::telemetry::prometheus().render(),
    )
}

async fn list_projects(State(ctx): State<Context>, headers: HeaderMap) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Read).await?;
    let mut listed = projects::list(&ctx.db).await?;
    listed.retain(|p| who.may_see(p));
    Ok(Json(listed).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateProject {
    name: String,
    classes: Vec<String>,
    #[serde(default)]
    policy: Option<Policy>,
    /// `small_cnn` (the default) or `mobilenet_v2`.
    #[serde(default)]
    arch: Option<String>,
}

async fn create_project(
    State(ctx): State<Context>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CreateProject>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::ManageProjects).await?;
    who.require_unscoped("create projects")?;
    let name = ProjectName::parse(&body.name)?;
    let classes = ClassNames::parse(&body.classes)?;
    let arch = match body.arch.as_deref() {
        Some(raw) => projects::parse_arch(raw)?,
        None => ModelArch::default(),
    };
    let project = training::create_project(
        &ctx,
        &name,
        &classes,
        &body.policy.unwrap_or_default(),
        arch,
        &who.name,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(project)).into_response())
}

async fn show_project(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Read).await?;
    let project = project_for(&ctx, &who, &project).await?;
    Ok(Json(status::project_status(&ctx, &project).await?).into_response())
}

async fn get_policy(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Read).await?;
    let project = project_for(&ctx, &who, &project).await?;
    Ok(
        Json(json!({ "version": project.policy_version, "policy": project.policy }))
            .into_response(),
    )
}

async fn put_policy(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
    JsonBody(policy): JsonBody<Policy>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::ManageProjects).await?;
    let project = project_for(&ctx, &who, &project).await?;
    let project = routing::calibration::set_policy(&ctx.db, &project, policy).await?;
    Ok(
        Json(json!({ "version": project.policy_version, "policy": project.policy }))
            .into_response(),
    )
}

async fn claim_next(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
) -> AppResult<Response> {
    // Everything a claim reads goes through the claim pool: a reviewer
    // waiting for the next item must not queue behind durable writes.
    let who = auth::authorize(&ctx.claims, bearer(&headers), Action::Review).await?;
    let project = project_on(&ctx.claims, &who, &project).await?;
    let lease = std::time::Duration::from_secs(ctx.settings.review.lease_seconds);
    Ok(
        match review::claim_next(&ctx.claims, &project, &who.name, lease).await? {
            Some(task) => Json(task).into_response(),
            None => StatusCode::NO_CONTENT.into_response(),
        },
    )
}

fn task_id(raw: &str) -> AppResult<TaskId> {
    raw.parse()
        .map_err(|_| AppError::NotFound(format!("no review task {raw:?} (not a task id)")))
}

async fn submit(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(task): Path<String>,
    JsonBody(body): JsonBody<review::Submission>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Review).await?;
    if body.force {
        who.require(Action::ForceLabel)?;
    }
    let task = task_id(&task)?;
    who.check_task(&ctx.db, task.as_uuid()).await?;
    let label = review::submit(&ctx.db, task, &who.name, &body).await?;
    Ok(Json(label).into_response())
}

#[derive(Deserialize)]
struct Release {
    fencing_token: i64,
}

async fn release(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(task): Path<String>,
    JsonBody(body): JsonBody<Release>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Review).await?;
    let task = task_id(&task)?;
    who.check_task(&ctx.db, task.as_uuid()).await?;
    review::release(&ctx.db, task, body.fencing_token).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn lease(ctx: &Context) -> std::time::Duration {
    std::time::Duration::from_secs(ctx.settings.review.lease_seconds)
}

async fn show_task(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(task): Path<String>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Review).await?;
    let task = task_id(&task)?;
    who.check_task(&ctx.db, task.as_uuid()).await?;
    Ok(Json(review::show(&ctx.db, task, &who.name).await?).into_response())
}

/// The body of the steps that only need the claim's token.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fenced {
    fencing_token: i64,
}

async fn renew(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(task): Path<String>,
    JsonBody(body): JsonBody<Fenced>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Review).await?;
    let task = task_id(&task)?;
    who.check_task(&ctx.db, task.as_uuid()).await?;
    let renewed = review::renew(&ctx.db, task, &who.name, body.fencing_token, lease(&ctx)).await?;
    Ok(Json(renewed).into_response())
}

async fn skip(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(task): Path<String>,
    JsonBody(body): JsonBody<review::Skip>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Review).await?;
    let task = task_id(&task)?;
    who.check_task(&ctx.db, task.as_uuid()).await?;
    Ok(Json(review::skip(&ctx.db, task, &who.name, &body).await?).into_response())
}

async fn undo(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(task): Path<String>,
    JsonBody(body): JsonBody<Fenced>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Review).await?;
    let task = task_id(&task)?;
    who.check_task(&ctx.db, task.as_uuid()).await?;
    let reopened = review::undo(&ctx.db, task, &who.name, body.fencing_token, lease(&ctx)).await?;
    Ok(Json(reopened).into_response())
}

async fn retrain(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
    body: axum::body::Bytes,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Train).await?;
    let project = project_for(&ctx, &who, &project).await?;
    // An empty body asks for nothing beyond the project's defaults.
    let asked: RetrainRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RetrainRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| AppError::Invalid(format!("bad request body: {e}")))?
    };
    let params = asked.params(&project)?;
    let run = training::request(&ctx, &project, &who.name, params, false).await?;
    Ok((StatusCode::ACCEPTED, Json(run)).into_response())
}

async fn cancel_retrain(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Train).await?;
    let project = project_for(&ctx, &who, &project).await?;
    let run_id = training::cancel(&ctx, &project, &who.name).await?;
    Ok(Json(serde_json::json!({ "run_id": run_id, "state": "cancelled" })).into_response())
}

async fn fleet_status(State(ctx): State<Context>, headers: HeaderMap) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Operate).await?;
    who.require_unscoped("read the status of every project")?;
    Ok(Json(status::fleet_status(&ctx).await?).into_response())
}

async fn list_models(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Read).await?;
    let project = project_for(&ctx, &who, &project).await?;
    Ok(Json(registry::list(&ctx, &project).await?).into_response())
}

async fn show_model(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path((project, version)): Path<(String, i32)>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Read).await?;
    let project = project_for(&ctx, &who, &project).await?;
    Ok(Json(registry::show(&ctx, &project, version).await?).into_response())
}

async fn item_image(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(item_id): Path<String>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Review).await?;
    let id: Uuid = item_id
        .parse()
        .map_err(|_| AppError::NotFound(format!("no item {item_id:?}")))?;
    let item = item::Entity::find_by_id(id)
        .one(&ctx.db)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no item {id}")))?;
    who.check_item_project(id, item.project_id)?;
    let bytes = ctx
        .store
        .get(&item.object_key)
        .await
        .map_err(|e| AppError::NotFound(e.to_string()))?;
    let content_type = match image::guess_format(&bytes) {
        Ok(image::ImageFormat::Png) => "image/png",
        Ok(image::ImageFormat::Jpeg) => "image/jpeg",
        _ => "application/octet-stream",
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            // The bytes are whatever was ingested: never let a browser guess.
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        bytes,
    )
        .into_response())
}

/// The project named in the path, if the caller may act on it.
async fn project_for(ctx: &Context, who: &Caller, name: &str) -> AppResult<Project> {
    project_on(&ctx.db, who, name).await
}

/// The project `name`, read through `db`, if `who` may see it.
async fn project_on(db: &DatabaseConnection, who: &Caller, name: &str) -> AppResult<Project> {
    let project = projects::get(db, name).await?;
    who.check_project(&project)?;
    Ok(project)
}

/// What to ingest over HTTP: exactly one of a prefix (`store:PREFIX` or
/// `s3://BUCKET/PREFIX`) or a manifest in sieve's store (`store:KEY`).
/// Never a path on the server.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestRequest {
    prefix: Option<String>,
    manifest: Option<String>,
}

impl IngestRequest {
    fn source(self) -> AppResult<Source> {
        match (self.prefix, self.manifest) {
            (Some(prefix), None) => Prefix::parse(&prefix)
                .map(Source::Prefix)
                .map_err(|e| AppError::Invalid(e.to_string())),
            (None, Some(manifest)) => match manifest.strip_prefix("store:") {
                Some(key) => Ok(Source::ManifestInStore {
                    key: key.to_owned(),
                }),
                None => Err(AppError::Invalid(format!(
                    "manifest {manifest:?}: name a manifest uploaded to sieve's object store as store:KEY"
                ))),
            },
            _ => Err(AppError::Invalid(
                "give exactly one of \"prefix\" (store:PREFIX or s3://BUCKET/PREFIX) or \"manifest\" (store:KEY)"
                    .into(),
            )),
        }
    }
}

async fn start_ingest(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
    JsonBody(body): JsonBody<IngestRequest>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Operate).await?;
    let project = project_for(&ctx, &who, &project).await?;
    let source = body.source()?;
    if let Source::Prefix(prefix) = &source {
        // A bucket the settings cannot reach is said now, not in the run.
        prefix
            .open(&ctx)
            .map_err(|e| AppError::Invalid(format!("{e:#}")))?;
    }
    let run = ingest::runs::start(&ctx, &project, source, &who.name).await?;
    let location = format!("/api/v1/ingests/{}", run.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(run),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<u64>,
}

async fn list_ingests(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Operate).await?;
    let Query(query) = query.map_err(|e| AppError::Invalid(e.body_text()))?;
    let project = project_for(&ctx, &who, &project).await?;
    let limit = query.limit.unwrap_or(20).min(1000);
    let runs = ingest::runs::list(&ctx.db, &project, limit).await?;
    Ok(Json(json!({ "ingests": runs })).into_response())
}

async fn show_ingest(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Operate).await?;
    // One answer for "no such ingest" and "another project's", so a
    // scoped token learns nothing from it.
    let missing = || AppError::NotFound(format!("no ingest {id:?}"));
    let uuid: Uuid = id.parse().map_err(|_| missing())?;
    let run = match ingest::runs::show(&ctx.db, uuid).await {
        Err(AppError::NotFound(_)) => return Err(missing()),
        found => found?,
    };
    if who.project.is_some_and(|scope| scope != run.project_id) {
        return Err(missing());
    }
    Ok(Json(run).into_response())
}

async fn pause(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Operate).await?;
    let project = project_for(&ctx, &who, &project).await?;
    Ok(Json(dispatch::pause(&ctx, &project).await?).into_response())
}

async fn resume(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Operate).await?;
    let project = project_for(&ctx, &who, &project).await?;
    let published = dispatch::resume(&ctx, &project).await?;
    let control = dispatch::control(&ctx.db, project.id).await?;
    Ok(Json(json!({ "control": control, "published": published })).into_response())
}

async fn get_dispatch(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Read).await?;
    let project = project_for(&ctx, &who, &project).await?;
    Ok(Json(dispatch::control(&ctx.db, project.id).await?).into_response())
}

/// A change of rate limit and priority; an absent field stays as it is,
/// `"rate_limit": null` lifts the limit. Pausing has its own endpoints,
/// since resuming also publishes what waited.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DispatchChange {
    #[serde(default, deserialize_with = "present")]
    rate_limit: Option<Option<f64>>,
    priority: Option<i16>,
}

/// `Some(None)` for an explicit `null`, as opposed to an absent field.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

async fn put_dispatch(
    State(ctx): State<Context>,
    headers: HeaderMap,
    Path(project): Path<String>,
    JsonBody(body): JsonBody<DispatchChange>,
) -> AppResult<Response> {
    let who = caller(&ctx, &headers, Action::Operate).await?;
    let project = project_for(&ctx, &who, &project).await?;
    let change = dispatch::ControlChange {
        paused: None,
        rate_limit: body.rate_limit,
        priority: body.priority,
    };
    let control = dispatch::set_control(&ctx.db, project.id, &change).await?;
    tracing::info!(project = %project.name, by = %who.name, ?control, "dispatch control changed");
    Ok(Json(control).into_response())
}
