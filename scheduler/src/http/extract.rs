//! What every handler begins with, as extractors: the caller authorized for
//! the handler's action ([`Authed`]), the project in the path that caller
//! may see ([`AuthedProject`]), the review task in the path that caller may
//! act on ([`AuthedTask`]), and JSON bodies whose errors are our JSON
//! errors ([`JsonBody`]).
//!
//! The action is a type parameter ([`Read`], [`Review`], …), so a handler's
//! signature says what it requires. Authorization runs before the body is
//! read: a caller without a valid token gets 401 whatever it sent.

use std::marker::PhantomData;

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use sieve_shared::ids::TaskId;

use crate::auth::{self, Action, Caller};
use crate::context::Context;
use crate::error::{AppError, AppResult};
use crate::projects::{self, Project};

/// The action a handler requires, as a type.
pub trait Requires {
    const ACTION: Action;
}

macro_rules! requirement {
    ($($(#[$doc:meta])* $name:ident => $action:ident),* $(,)?) => {$(
        $(#[$doc])*
        pub struct $name;
        impl Requires for $name {
            const ACTION: Action = Action::$action;
        }
    )*};
}

requirement! {
    /// Read a project, its policy, models and dispatch control.
    Read => Read,
    /// Claim and label review tasks, see item images.
    Review => Review,
    /// Create projects, change their policy.
    ManageProjects => ManageProjects,
    /// Start and cancel training runs.
    Train => Train,
    /// Ingest, pause, resume, rate-limit; the fleet's status.
    Operate => Operate,
    /// List, create and revoke API tokens.
    ManageTokens => ManageTokens,
    /// Take a project's labeled dataset out.
    Export => Export,
    /// Read per-reviewer figures: `ml`, `ops`, `admin`, never `reviewer`.
    ReviewerFigures => ReadReviewerFigures,
}

/// The `Authorization: Bearer` token, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// The caller, authorized for `A` (401 without a valid token, 403 for a
/// role that may not).
pub struct Authed<A> {
    pub who: Caller,
    action: PhantomData<A>,
}

impl<A: Requires + Send> FromRequestParts<Context> for Authed<A> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, ctx: &Context) -> AppResult<Self> {
        let who = auth::authorize(&ctx.db, bearer(&parts.headers), A::ACTION).await?;
        Ok(Self {
            who,
            action: PhantomData,
        })
    }
}

/// The project named by the path's `{project}` (name or id), which the
/// caller, authorized for `A`, may see: another project's is a 404 to a
/// token scoped elsewhere, as if it did not exist.
pub struct AuthedProject<A> {
    pub who: Caller,
    pub project: Project,
    action: PhantomData<A>,
}

impl<A: Requires + Send> FromRequestParts<Context> for AuthedProject<A> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, ctx: &Context) -> AppResult<Self> {
        let Authed { who, .. } = Authed::<A>::from_request_parts(parts, ctx).await?;
        let name = path_param(parts, ctx, "project").await?;
        let project = project_on(&ctx.db, &who, &name).await?;
        Ok(Self {
            who,
            project,
            action: PhantomData,
        })
    }
}

/// The review task named by the path's `{task}`, which the caller,
/// authorized for `A`, may act on (a task of another project is a 404 to a
/// scoped token). Whether the caller holds its lease is the review
/// module's check, made with the fencing token.
pub struct AuthedTask<A> {
    pub who: Caller,
    pub task: TaskId,
    action: PhantomData<A>,
}

impl<A: Requires + Send> FromRequestParts<Context> for AuthedTask<A> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, ctx: &Context) -> AppResult<Self> {
        let Authed { who, .. } = Authed::<A>::from_request_parts(parts, ctx).await?;
        let raw = path_param(parts, ctx, "task").await?;
        let task: TaskId = raw
            .parse()
            .map_err(|_| AppError::NotFound(format!("no review task {raw:?} (not a task id)")))?;
        who.check_task(&ctx.db, task.as_uuid()).await?;
        Ok(Self {
            who,
            task,
            action: PhantomData,
        })
    }
}

/// The project `name`, read through `db`, if `who` may see it.
pub async fn project_on(
    db: &sea_orm::DatabaseConnection,
    who: &Caller,
    name: &str,
) -> AppResult<Project> {
    let project = projects::get(db, name).await?;
    who.check_project(&project)?;
    Ok(project)
}

async fn path_param(parts: &mut Parts, ctx: &Context, name: &str) -> AppResult<String> {
    let params = RawPathParams::from_request_parts(parts, ctx)
        .await
        .map_err(|e| AppError::Invalid(e.body_text()))?;
    params
        .iter()
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
        .ok_or_else(|| AppError::Invalid(format!("the path names no {{{name}}}")))
}

/// JSON bodies whose parse errors come back as our JSON error (422).
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
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
