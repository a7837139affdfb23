//! Errors shared by both services.
//!
//! Inside a service, `anyhow` with `.context()` carries errors up; the types
//! here exist where a caller must act on the kind of failure.

use std::fmt;

/// A backing service could not be reached. Its message is the one line an
/// operator needs: which service, at which address (password removed), why.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach {service} at {address}: {reason}")]
pub struct Unreachable {
    pub service: &'static str,
    pub address: String,
    pub reason: String,
}

impl Unreachable {
    pub fn new(service: &'static str, url: &str, reason: impl fmt::Display) -> Self {
        Self {
            service,
            address: redact_url(url),
            reason: reason.to_string(),
        }
    }
}

/// `scheme://user:secret@host/db` -> `scheme://user:***@host/db`, so a URL can
/// be logged or shown without leaking its password.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/sieve"),
            "postgres://postgres@127.0.0.1/sieve"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
