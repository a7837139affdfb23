//! Partial updates, where an absent field and an explicit `null` differ:
//! absent leaves a setting as it is, `null` clears it (a policy's target
//! accuracy, a project's rate limit).

use serde::{Deserialize, Deserializer};

/// Deserialize a field as `Some(None)` for an explicit `null`; with
/// `#[serde(default)]` an absent field stays `None`.
pub fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// A CLI flag for an optional setting: absent leaves it as it is, `none`
/// clears it, anything else must parse as `T`; the error names the flag
/// and what it takes.
pub fn optional_flag<T: std::str::FromStr>(
    flag: &str,
    raw: Option<&str>,
    takes: &str,
) -> Result<Option<Option<T>>, crate::error::AppError> {
    match raw {
        None => Ok(None),
        Some("none") => Ok(Some(None)),
        Some(value) => value.parse().map(|v| Some(Some(v))).map_err(|_| {
            crate::error::AppError::Invalid(format!("{flag} {value:?}: {takes}, or none"))
        }),
    }
}
