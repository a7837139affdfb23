//! `/projects`: list, create, show; a project's routing policy.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use sieve_shared::messages::ModelArch;

use super::extract::{Authed, AuthedProject, JsonBody, ManageProjects, Read};
use crate::context::Context;
use crate::error::AppResult;
use crate::operate::status;
use crate::policy::{Policy, PolicyPatch};
use crate::projects::{self, ClassNames, ProjectName};
use crate::{routing, training};

pub async fn list(State(ctx): State<Context>, caller: Authed<Read>) -> AppResult<Response> {
    let mut listed = projects::list(&ctx.db).await?;
    listed.retain(|p| caller.who.may_see(p));
    Ok(Json(listed).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    name: String,
    classes: Vec<String>,
    #[serde(default)]
    policy: Option<Policy>,
    /// `small_cnn` (the default) or `mobilenet_v2`.
    #[serde(default)]
    arch: Option<String>,
}

pub async fn create(
    State(ctx): State<Context>,
    caller: Authed<ManageProjects>,
    JsonBody(body): JsonBody<CreateProject>,
) -> AppResult<Response> {
    let who = caller.who;
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

pub async fn show(State(ctx): State<Context>, at: AuthedProject<Read>) -> AppResult<Response> {
    Ok(Json(status::project_status(&ctx, &at.project).await?).into_response())
}

pub async fn get_policy(at: AuthedProject<Read>) -> AppResult<Response> {
    let project = at.project;
    Ok(
        Json(json!({ "version": project.policy_version, "policy": project.policy }))
            .into_response(),
    )
}

/// `PUT` (and `PATCH`): the fields named change, the others stay; `null`
/// clears an optional one. A change that leaves the policy as it was makes
/// no new version.
pub async fn change_policy(
    State(ctx): State<Context>,
    at: AuthedProject<ManageProjects>,
    JsonBody(patch): JsonBody<PolicyPatch>,
) -> AppResult<Response> {
    let project = routing::calibration::patch_policy(&ctx.db, &at.project, &patch).await?;
    Ok(
        Json(json!({ "version": project.policy_version, "policy": project.policy }))
            .into_response(),
    )
}
