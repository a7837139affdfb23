//! Errors at the scheduler's boundaries.
//!
//! Domain operations (review, projects, training...) return [`AppError`],
//! whose variant decides the HTTP status and the CLI's message. Inside an
//! operation, `anyhow` with `.context()` carries unexpected failures up as
//! [`AppError::Internal`]; those are logged once, where they are turned into a
//! response.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The thing named does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but its content is wrong (422).
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the current state: a stale lease, a run
    /// already in progress (409). Nothing was written.
    #[error("{0}")]
    Conflict(String),
    #[error("missing or invalid API token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    /// The request body is over `http.body_limit` (413); nothing was written.
    #[error("{0}")]
    TooLarge(String),
    /// Too much of this is running already (429): try again once some of
    /// it has finished. Nothing was written.
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::Unauthorized => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            AppError::NotFound(_) => "not_found",
            AppError::Invalid(_) => "invalid",
            AppError::Conflict(_) => "conflict",
            AppError::Unauthorized => "unauthorized",
            AppError::Forbidden(_) => "forbidden",
            AppError::TooLarge(_) => "payload_too_large",
            AppError::Busy(_) => "too_many_requests",
            AppError::Internal(_) => "internal",
        }
    }
}

impl From<sea_orm::DbErr> for AppError {
    fn from(err: sea_orm::DbErr) -> Self {
        AppError::Internal(anyhow::Error::new(err).context("database error"))
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let message = match &self {
            AppError::Internal(err) => {
                tracing::error!(error = format!("{err:#}"), "request failed");
                "internal error; the scheduler log has the details".to_owned()
            }
            other => other.to_string(),
        };
        let body = json!({ "error": { "code": self.code(), "message": message } });
        (self.status(), Json(body)).into_response()
    }
}

pub type AppResult<T> = Result<T, AppError>;
