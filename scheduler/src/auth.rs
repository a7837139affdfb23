//! API tokens and roles.
//!
//! A token is shown once, when created; only its SHA-256 is stored. Lookup
//! is by hash, so no secret is ever compared byte by byte. Tokens are never
//! logged.
//!
//! A token may be scoped to one project. It then acts only there: another
//! project, or a task or item of one, answers 404 exactly as if it did not
//! exist (a scoped token learns nothing about other projects, not even
//! their names), and what spans every project (creating projects, fleet
//! status) answers 403: the token is valid but not for that.

use chrono::Utc;
use rand::RngCore;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
};
use sieve_shared::store::sha256_hex;
use uuid::Uuid;

use crate::entities::api_token::{self, Role};
use crate::entities::review_task;
use crate::error::{AppError, AppResult};
use crate::projects::Project;

/// What a caller wants to do; each role is allowed a set of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read projects, items and models.
    Read,
    /// Claim and submit review tasks.
    Review,
    /// Create projects and change policies.
    ManageProjects,
    /// Trigger retraining, promote, roll back.
    Train,
    /// Ingest, fleet operations, dead letters.
    Operate,
    /// Label an item that people already labeled (`force` on a submit).
    ForceLabel,
    /// Take a project's labeled dataset out (`export`): every item, its
    /// label and who gave it.
    Export,
    /// List, create and revoke API tokens (admin only).
    ManageTokens,
    /// Bring labels in with an ingest (a manifest's `label` column): ground
    /// truth, the ML team's to give, not operations'.
    ImportLabels,
    /// Read per-reviewer figures (labels, pace, agreement): figures about
    /// people, for the ML team (label quality) and operations (staffing),
    /// never for reviewers themselves, who would see their colleagues'.
    ReadReviewerFigures,
}

pub fn allows(role: Role, action: Action) -> bool {
    use Action::*;
    match role {
        Role::Admin => true,
        Role::Reviewer => matches!(action, Read | Review),
        Role::Ml => matches!(
            action,
            Read | Review
                | ManageProjects
                | Train
                | ForceLabel
                | Export
                | ImportLabels
                | ReadReviewerFigures
        ),
        Role::Ops => matches!(action, Read | Operate | ReadReviewerFigures),
    }
}

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The token's id: who the caller is, where people are compared.
    pub token_id: Uuid,
    /// The token's name: what is shown and recorded.
    pub name: String,
    pub role: Role,
    /// The only project this caller may act on; `None`: every project.
    pub project: Option<Uuid>,
}

impl Caller {
    /// This caller as a reviewer: known by the token's id, shown by name.
    pub fn reviewer(&self) -> crate::review::Reviewer<'_> {
        crate::review::Reviewer {
            name: &self.name,
            token: Some(self.token_id),
        }
    }

    /// Refuse (403) unless this caller's role allows `action` too.
    pub fn require(&self, action: Action) -> AppResult<()> {
        if allows(self.role, action) {
            Ok(())
        } else {
            Err(forbidden(self.role, action))
        }
    }

    /// Whether this caller may see `project` at all.
    pub fn may_see(&self, project: &Project) -> bool {
        self.project.is_none_or(|p| p == project.id.as_uuid())
    }

    /// Refuse a project outside this caller's scope as if it did not exist.
    pub fn check_project(&self, project: &Project) -> AppResult<()> {
        if self.may_see(project) {
            Ok(())
        } else {
            Err(AppError::NotFound(format!(
                "no project named {:?}; `sieve project list` shows the projects",
                project.name
            )))
        }
    }

    /// Refuse what spans every project to a caller scoped to one (403).
    pub fn require_unscoped(&self, what: &str) -> AppResult<()> {
        match self.project {
            None => Ok(()),
            Some(_) => Err(AppError::Forbidden(format!(
                "this token is scoped to one project and may not {what}"
            ))),
        }
    }

    /// Refuse a review task of another project as if it did not exist.
    pub async fn check_task(&self, db: &DatabaseConnection, task_id: Uuid) -> AppResult<()> {
        let Some(scope) = self.project else {
            return Ok(());
        };
        match review_task::Entity::find_by_id(task_id).one(db).await? {
            Some(task) if task.project_id == scope => Ok(()),
            _ => Err(AppError::NotFound(format!("no review task {task_id}"))),
        }
    }

    /// Refuse an item of another project as if it did not exist.
    pub fn check_item_project(&self, item_id: Uuid, project_id: Uuid) -> AppResult<()> {
        match self.project {
            Some(scope) if scope != project_id => {
                Err(AppError::NotFound(format!("no item {item_id}")))
            }
            _ => Ok(()),
        }
    }
}

fn forbidden(role: Role, action: Action) -> AppError {
    AppError::Forbidden(format!("role {role:?} may not {action:?}"))
}

/// Create a token for every project; returns the secret, which is not
/// stored anywhere.
pub async fn create_token(db: &DatabaseConnection, name: &str, role: Role) -> AppResult<String> {
    create_scoped_token(db, name, role, None).await
}

/// Create a token that acts only on `project` (every project with `None`).
pub async fn create_scoped_token(
    db: &DatabaseConnection,
    name: &str,
    role: Role,
    project: Option<&Project>,
) -> AppResult<String> {
    create_expiring_token(db, name, role, project, None)
        .await
        .map(|(token, _)| token)
}

/// Create a token, scoped to `project` if given, that stops working after
/// `expires_in` if given. Returns the secret (shown once) and its id.
pub async fn create_expiring_token(
    db: &DatabaseConnection,
    name: &str,
    role: Role,
    project: Option<&Project>,
    expires_in: Option<std::time::Duration>,
) -> AppResult<(String, Uuid)> {
    if expires_in.is_some_and(|d| d.is_zero()) {
        return Err(AppError::Invalid(
            "a token's lifetime must be more than zero".into(),
        ));
    }
    let expires_at = match expires_in {
        Some(d) => Some(
            Utc::now().fixed_offset()
                + chrono::Duration::from_std(d)
                    .map_err(|_| AppError::Invalid(format!("a lifetime of {d:?} is too long")))?,
        ),
        None => None,
    };
    if name.trim().is_empty() {
        return Err(AppError::Invalid(
            "a token needs a name (who or what uses it)".into(),
        ));
    }
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!("sieve_{}", hex::encode(secret));
    let id = Uuid::now_v7();
    api_token::Entity::insert(api_token::ActiveModel {
        id: Set(id),
        name: Set(name.trim().to_owned()),
        token_hash: Set(sha256_hex(token.as_bytes())),
        role: Set(role),
        created_at: Set(Utc::now().fixed_offset()),
        expires_at: Set(expires_at),
        revoked_at: Set(None),
        project_id: Set(project.map(|p| p.id.as_uuid())),
    })
    .exec_without_returning(db)
    .await?;
    Ok((token, id))
}

/// A token as `sieve token list` and `GET /api/v1/tokens` show it: never
/// its secret, which is not stored.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    /// The only project it may act on; `None`: every project.
    pub project_id: Option<Uuid>,
    /// `active`, `expired` or `revoked`.
    pub state: &'static str,
    pub created_at: chrono::DateTime<chrono::FixedOffset>,
    pub expires_at: Option<chrono::DateTime<chrono::FixedOffset>>,
    pub revoked_at: Option<chrono::DateTime<chrono::FixedOffset>>,
}

impl TokenInfo {
    fn from_model(t: api_token::Model) -> Self {
        let now = Utc::now().fixed_offset();
        let state = if t.revoked_at.is_some() {
            "revoked"
        } else if t.expires_at.is_some_and(|e| e <= now) {
            "expired"
        } else {
            "active"
        };
        Self {
            id: t.id,
            name: t.name,
            role: t.role,
            project_id: t.project_id,
            state,
            created_at: t.created_at,
            expires_at: t.expires_at,
            revoked_at: t.revoked_at,
        }
    }
}

/// Every token, oldest first.
pub async fn list_tokens(db: &DatabaseConnection) -> AppResult<Vec<TokenInfo>> {
    Ok(api_token::Entity::find()
        .order_by_asc(api_token::Column::CreatedAt)
        .all(db)
        .await?
        .into_iter()
        .map(TokenInfo::from_model)
        .collect())
}

/// Revoke the token `which` (its id, or its name when one token has it):
/// it gets 401 from its next request on, and a claim it holds can no longer
/// be submitted. Revoking a revoked token changes nothing.
pub async fn revoke_token(db: &DatabaseConnection, which: &str) -> AppResult<TokenInfo> {
    let found = match which.parse::<Uuid>() {
        Ok(id) => api_token::Entity::find_by_id(id).all(db).await?,
        Err(_) => {
            api_token::Entity::find()
                .filter(api_token::Column::Name.eq(which))
                .all(db)
                .await?
        }
    };
    let token = match found.as_slice() {
        [one] => one.clone(),
        [] => return Err(AppError::NotFound(format!("no token {which:?}"))),
        many => {
            return Err(AppError::Conflict(format!(
                "{} tokens are named {which:?}: revoke one by its id (`sieve token list`)",
                many.len()
            )));
        }
    };
    if token.revoked_at.is_some() {
        return Ok(TokenInfo::from_model(token));
    }
    let revoked = api_token::Entity::update(api_token::ActiveModel {
        id: Set(token.id),
        revoked_at: Set(Some(Utc::now().fixed_offset())),
        ..Default::default()
    })
    .exec(db)
    .await?;
    tracing::info!(token = %revoked.id, name = %revoked.name, "token revoked");
    Ok(TokenInfo::from_model(revoked))
}

/// Check a bearer token and the caller's right to `action`.
pub async fn authorize(
    db: &DatabaseConnection,
    token: Option<&str>,
    action: Action,
) -> AppResult<Caller> {
    let token = token.ok_or(AppError::Unauthorized)?;
    let found = api_token::Entity::find()
        .filter(api_token::Column::TokenHash.eq(sha256_hex(token.as_bytes())))
        .one(db)
        .await?
        .ok_or(AppError::Unauthorized)?;
    let now = Utc::now().fixed_offset();
    if found.revoked_at.is_some() || found.expires_at.is_some_and(|e| e <= now) {
        return Err(AppError::Unauthorized);
    }
    if !allows(found.role, action) {
        return Err(forbidden(found.role, action));
    }
    Ok(Caller {
        token_id: found.id,
        name: found.name,
        role: found.role,
        project: found.project_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_what_their_users_need() {
        assert!(allows(Role::Reviewer, Action::Review));
        assert!(!allows(Role::Reviewer, Action::Train));
        assert!(!allows(Role::Reviewer, Action::ManageProjects));
        assert!(allows(Role::Ml, Action::Train));
        assert!(!allows(Role::Ml, Action::Operate));
        assert!(allows(Role::Ops, Action::Operate));
        assert!(!allows(Role::Ops, Action::Review));
        assert!(allows(Role::Ml, Action::ForceLabel));
        assert!(!allows(Role::Reviewer, Action::ForceLabel));
        assert!(!allows(Role::Ops, Action::ForceLabel));
        assert!(allows(Role::Ml, Action::Export));
        assert!(!allows(Role::Reviewer, Action::Export));
        assert!(!allows(Role::Ops, Action::Export));
        assert!(allows(Role::Ml, Action::ImportLabels));
        assert!(!allows(Role::Ops, Action::ImportLabels));
        assert!(allows(Role::Ml, Action::ReadReviewerFigures));
        assert!(allows(Role::Ops, Action::ReadReviewerFigures));
        assert!(!allows(Role::Reviewer, Action::ReadReviewerFigures));
        for action in [
            Action::Read,
            Action::Review,
            Action::ManageProjects,
            Action::Train,
            Action::Operate,
            Action::ForceLabel,
            Action::Export,
            Action::ImportLabels,
            Action::ManageTokens,
            Action::ReadReviewerFigures,
        ] {
            assert!(allows(Role::Admin, action));
        }
    }
}
