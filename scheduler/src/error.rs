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
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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

    fn code(&self) -> ErrorCode {
        match self {
            AppError::NotFound(_) => ErrorCode::NotFound,
            AppError::Invalid(_) => ErrorCode::Invalid,
            AppError::Conflict(_) => ErrorCode::Conflict,
            AppError::Unauthorized => ErrorCode::Unauthorized,
            AppError::Forbidden(_) => ErrorCode::Forbidden,
            AppError::TooLarge(_) => ErrorCode::PayloadTooLarge,
            AppError::Busy(_) => ErrorCode::TooManyRequests,
            AppError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// The body of every error answer of the API.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// What was wrong, for a person to read.
    pub message: String,
}

/// One per HTTP status the API answers errors with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    Invalid,
    Conflict,
    Unauthorized,
    Forbidden,
    PayloadTooLarge,
    TooManyRequests,
    Internal,
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
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message,
            },
        };
        (self.status(), Json(body)).into_response()
    }
}

pub type AppResult<T> = Result<T, AppError>;
