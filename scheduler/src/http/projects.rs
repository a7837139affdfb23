//! `/projects`: list, create, show; a project's routing policy and box
//! settings.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sieve_shared::kind::TaskKind;
use sieve_shared::messages::ModelArch;
use utoipa::ToSchema;

use super::extract::{Authed, AuthedProject, JsonBody, ManageProjects, Read};
use crate::box_settings::{BoxSettingsChange, InForce};
use crate::context::Context;
use crate::error::{AppError, AppResult, ErrorBody};
use crate::operate::status::{self, ProjectStatus};
use crate::policy::{Policy, PolicyPatch};
use crate::projects::{self, ClassNames, Project, ProjectName};
use crate::{routing, training};

/// The projects the token may see.
#[utoipa::path(
    get,
    path = "/projects",
    tag = "projects",
    responses(
        (status = 200, body = Vec<Project>),
        (status = 401, body = ErrorBody, description = "No valid token"),
    )
)]
pub async fn list(State(ctx): State<Context>, caller: Authed<Read>) -> AppResult<Response> {
    let mut listed = projects::list(&ctx.db).await?;
    listed.retain(|p| caller.who.may_see(p));
    Ok(Json(listed).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    name: String,
    /// Required but for a `deidentify` project (`face`, `plate` when
    /// absent; its first class is `face`).
    #[serde(default)]
    classes: Vec<String>,
    /// The routing policy; absent: the defaults, with a target accuracy of
    /// 0.99 for a `deidentify` project (recall first).
    #[serde(default)]
    policy: Option<Policy>,
    /// `small_cnn` (the default) or `mobilenet_v2`; `null` (constant
    /// answers) only with `measurement_only`; a detection project always
    /// runs `detector` (the default for it).
    #[serde(default)]
    #[schema(value_type = Option<ModelArch>)]
    arch: Option<String>,
    /// A project for measuring sieve itself, which may use the `null`
    /// architecture.
    #[serde(default)]
    measurement_only: bool,
    /// `classification` (the default: one class per image) or `detection`
    /// (boxes, each with a class; its images go to people until a detector
    /// has trained on their boxes).
    #[serde(default)]
    #[schema(value_type = Option<TaskKind>)]
    task_kind: Option<String>,
}

/// Create a project (an `admin` or `ml` token for every project); a
/// classification project's first, untrained model is queued at once, a
/// detection project's images go to people until it has boxes to train on.
#[utoipa::path(
    post,
    path = "/projects",
    tag = "projects",
    request_body = CreateProject,
    responses(
        (status = 201, body = Project),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not create projects"),
        (status = 409, body = ErrorBody, description = "A project has that name"),
        (status = 422, body = ErrorBody, description = "A bad name, class list, policy, or an architecture the task kind cannot run"),
    )
)]
pub async fn create(
    State(ctx): State<Context>,
    caller: Authed<ManageProjects>,
    JsonBody(body): JsonBody<CreateProject>,
) -> AppResult<Response> {
    let who = caller.who;
    who.require_unscoped("create projects")?;
    let name = ProjectName::parse(&body.name)?;
    // Said now, before anything is written: a kind sieve lacks.
    let kind = match body.task_kind.as_deref() {
        Some(kind) => kind.parse::<TaskKind>().map_err(AppError::Invalid)?,
        None => TaskKind::default(),
    };
    let classes = ClassNames::parse_for(kind, &body.classes)?;
    let arch = match body.arch.as_deref() {
        Some(raw) => projects::parse_arch(raw)?,
        None => ModelArch::default(),
    };
    let arch = projects::allow_arch(arch, body.measurement_only)?;
    let project = training::create_project_of_kind(
        &ctx,
        &name,
        &classes,
        &body.policy.unwrap_or_else(|| Policy::default_for(kind)),
        arch,
        kind,
        &who.name,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(project)).into_response())
}

/// A project with its counts, measured accuracy and second opinions.
#[utoipa::path(
    get,
    path = "/projects/{project}",
    tag = "projects",
    params(("project" = String, Path, description = "Project name or id")),
    responses(
        (status = 200, body = ProjectStatus),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
    )
)]
pub async fn show(State(ctx): State<Context>, at: AuthedProject<Read>) -> AppResult<Response> {
    Ok(Json(status::project_status(&ctx, &at.project).await?).into_response())
}

/// A project's routing policy and its version.
#[derive(Serialize, ToSchema)]
pub struct VersionedPolicy {
    /// Bumped by every change.
    version: i32,
    policy: Policy,
}

impl From<Project> for VersionedPolicy {
    fn from(project: Project) -> Self {
        Self {
            version: project.policy_version,
            policy: project.policy,
        }
    }
}

#[utoipa::path(
    get,
    path = "/projects/{project}/policy",
    tag = "projects",
    params(("project" = String, Path, description = "Project name or id")),
    responses(
        (status = 200, body = VersionedPolicy),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
    )
)]
pub async fn get_policy(at: AuthedProject<Read>) -> AppResult<Response> {
    Ok(Json(VersionedPolicy::from(at.project)).into_response())
}

/// `PUT` (and `PATCH`): the fields named change, the others stay; `null`
/// clears an optional one. A change that leaves the policy as it was makes
/// no new version. A new version re-routes the items waiting for review in
/// the background (`routing::reroute`).
#[utoipa::path(
    method(put, patch),
    path = "/projects/{project}/policy",
    tag = "projects",
    params(("project" = String, Path, description = "Project name or id")),
    request_body = PolicyPatch,
    responses(
        (status = 200, body = VersionedPolicy),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not change policies"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
        (status = 422, body = ErrorBody, description = "A value out of range or an unknown field"),
    )
)]
pub async fn change_policy(
    State(ctx): State<Context>,
    at: AuthedProject<ManageProjects>,
    JsonBody(patch): JsonBody<PolicyPatch>,
) -> AppResult<Response> {
    let project = routing::calibration::patch_policy(&ctx.db, &at.project, &patch).await?;
    if project.policy_version != at.project.policy_version {
        // The items waiting for review move under the new policy within
        // seconds; the answer does not wait for them.
        routing::reroute::spawn(ctx.db.clone(), project.id.as_uuid());
    }
    Ok(Json(VersionedPolicy::from(project)).into_response())
}

/// A detection or deidentify project's tile size and proposal threshold,
/// the defaults filled in.
#[utoipa::path(
    get,
    path = "/projects/{project}/boxes",
    tag = "projects",
    params(("project" = String, Path, description = "Project name or id")),
    responses(
        (status = 200, body = InForce),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
        (status = 422, body = ErrorBody, description = "A project that draws no boxes"),
    )
)]
pub async fn get_boxes(at: AuthedProject<Read>) -> AppResult<Response> {
    Ok(Json(at.project.box_settings()?).into_response())
}

/// A change of box settings: an absent field stays as it is, `null` puts
/// the default back.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BoxSettingsPatch {
    /// Tile side in pixels, a multiple of 32 from 64 to 1024.
    #[serde(default, deserialize_with = "crate::patch::present")]
    #[schema(value_type = Option<u32>)]
    tile_size: Option<Option<u32>>,
    /// Confidence from which an object is proposed, 0.1 to 0.95.
    #[serde(default, deserialize_with = "crate::patch::present")]
    #[schema(value_type = Option<f32>)]
    proposal_threshold: Option<Option<f32>>,
}

/// `PUT` (and `PATCH`): the settings apply from the project's next training
/// run; the active version keeps the ones it was trained with.
#[utoipa::path(
    method(put, patch),
    path = "/projects/{project}/boxes",
    tag = "projects",
    params(("project" = String, Path, description = "Project name or id")),
    request_body = BoxSettingsPatch,
    responses(
        (status = 200, body = InForce),
        (status = 401, body = ErrorBody, description = "No valid token"),
        (status = 403, body = ErrorBody, description = "The token may not change projects"),
        (status = 404, body = ErrorBody, description = "No such project (or not the token's)"),
        (status = 422, body = ErrorBody, description = "A value out of range, an unknown field, or a project that draws no boxes"),
    )
)]
pub async fn change_boxes(
    State(ctx): State<Context>,
    at: AuthedProject<ManageProjects>,
    JsonBody(patch): JsonBody<BoxSettingsPatch>,
) -> AppResult<Response> {
    let change = BoxSettingsChange {
        tile_size: patch.tile_size,
        proposal_threshold: patch.proposal_threshold,
    };
    Ok(Json(projects::set_box_settings(&ctx.db, &at.project, change).await?).into_response())
}
