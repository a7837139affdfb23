//! Object-store prefixes as ingest sources: `store:PREFIX` (sieve's own
//! store) and `s3://BUCKET/PREFIX` (any S3-compatible service, configured
//! by the `s3.*` settings).
//!
//! Both are opened as a [`Store`], so listing and reading are one code path
//! (`object_store` underneath). Workers read only sieve's store: images
//! from a bucket are copied into it, content-addressed, as folder ingest
//! does; images already in sieve's store are used where they are.
//!
//! Sieve's own area of the store (`projects/`: images, training snapshots,
//! model artifacts) is never an ingest source: a prefix or manifest key
//! there is refused, so that ingest cannot reach another project's images.
//! The one exception is a local manifest file read by `sieve ingest`, which
//! has the store's own authority: its keys there (an export of another
//! project) are copied into the project's own area.

use std::fmt;

use sieve_shared::settings::S3Settings;
use sieve_shared::store::Store;

use crate::context::Context;

/// The first segment of every key sieve writes for itself.
const OWN_AREA: &str = "projects";

/// Where the objects of a prefix ingest are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prefix {
    /// Under a prefix of sieve's own store.
    Store { prefix: String },
    /// Under a prefix (possibly empty: the whole bucket) of an S3 bucket.
    S3 { bucket: String, prefix: String },
}

/// A location that is not a prefix sieve can read.
#[derive(Debug, thiserror::Error)]
#[error("{location:?}: {reason}")]
pub struct BadPrefix {
    pub location: String,
    pub reason: String,
}

/// Whether `text` is written as an object-store location rather than a
/// local path.
pub fn is_location(text: &str) -> bool {
    text.starts_with("store:") || text.starts_with("s3://")
}

/// Whether `key` is a well-formed key in sieve's own area of the store
/// (images, snapshots, artifacts of some project).
pub fn in_own_area(key: &str) -> bool {
    Store::check_key(key).is_ok() && key.split('/').next() == Some(OWN_AREA)
}

/// Why a key of sieve's store may not be ingested, if it may not: a bad
/// key, or one in sieve's own area.
pub fn refuse_key(key: &str) -> Option<String> {
    if let Err(err) = Store::check_key(key) {
        return Some(err.to_string());
    }
    (key.split('/').next() == Some(OWN_AREA)).then(|| {
        format!(
            "{key:?} is in sieve's own area of the store ({OWN_AREA}/); ingest reads other keys"
        )
    })
}

impl Prefix {
    /// `store:PREFIX` or `s3://BUCKET[/PREFIX]`; a trailing `/` is optional.
    pub fn parse(text: &str) -> Result<Self, BadPrefix> {
        let bad = |reason: String| BadPrefix {
            location: text.to_owned(),
            reason,
        };
        if let Some(prefix) = text.strip_prefix("store:") {
            let prefix = prefix.trim_end_matches('/');
            if prefix.is_empty() {
                return Err(bad(
                    "name a prefix of the store, e.g. store:incoming/batch1/".into(),
                ));
            }
            if let Some(reason) = refuse_key(prefix) {
                return Err(bad(reason));
            }
            return Ok(Prefix::Store {
                prefix: prefix.to_owned(),
            });
        }
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            check_bucket(bucket).map_err(bad)?;
            let prefix = prefix.trim_end_matches('/');
            if !prefix.is_empty()
                && let Err(err) = Store::check_key(prefix)
            {
                return Err(bad(err.to_string()));
            }
            return Ok(Prefix::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        Err(bad(
            "an object-store location is store:PREFIX or s3://BUCKET/PREFIX".into(),
        ))
    }

    /// The prefix within its store.
    pub fn prefix(&self) -> &str {
        match self {
            Prefix::Store { prefix } | Prefix::S3 { prefix, .. } => prefix,
        }
    }

    /// Whether its objects live outside sieve's store (and are copied in).
    pub fn is_external(&self) -> bool {
        matches!(self, Prefix::S3 { .. })
    }

    /// How an object under it is named for people (an item's source).
    pub fn name_of(&self, key: &str) -> String {
        match self {
            Prefix::Store { .. } => format!("store:{key}"),
            Prefix::S3 { bucket, .. } => format!("s3://{bucket}/{key}"),
        }
    }

    /// The same objects as a prefix of sieve's own store, when they lie in
    /// it (sieve's store is this bucket, and the prefix is under the
    /// store's): read in place, as `store:` prefixes are, not copied.
    pub fn within(&self, store: &Store) -> Prefix {
        if let (Prefix::S3 { bucket, prefix }, Some(home)) = (self, store.s3_home_of())
            && let Some(own) = home.key_of(bucket, prefix)
            && !own.is_empty()
            && refuse_key(own).is_none()
        {
            return Prefix::Store {
                prefix: own.to_owned(),
            };
        }
        self.clone()
    }

    /// The store to list and read.
    pub fn open(&self, ctx: &Context) -> anyhow::Result<Store> {
        match self {
            Prefix::Store { .. } => Ok(ctx.store.clone()),
            Prefix::S3 { bucket, .. } => s3_store(&ctx.settings.s3, bucket),
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prefix::Store { prefix } => write!(f, "store:{prefix}/"),
            Prefix::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}/"),
            Prefix::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}/"),
        }
    }
}

/// S3's bucket naming rules (3 to 63 lower-case letters, digits, dots and
/// hyphens, starting and ending with a letter or digit).
fn check_bucket(bucket: &str) -> Result<(), String> {
    let edges_ok =
        |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && edges_ok(bucket.chars().next())
        && edges_ok(bucket.chars().last());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{bucket:?} is not a bucket name (3 to 63 lower-case letters, digits, '.' and '-')"
        ))
    }
}

/// A client for `bucket` from the `s3.*` settings (see
/// [`Store::s3_bucket`]).
pub fn s3_store(settings: &S3Settings, bucket: &str) -> anyhow::Result<Store> {
    Ok(Store::s3_bucket(settings, bucket)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sieve_shared::settings::Secret;

    #[test]
    fn parses_store_and_s3_locations() {
        assert_eq!(
            Prefix::parse("store:incoming/batch1/").expect("store"),
            Prefix::Store {
                prefix: "incoming/batch1".into()
            }
        );
        assert_eq!(
            Prefix::parse("s3://photos-2026/a/b").expect("s3"),
            Prefix::S3 {
                bucket: "photos-2026".into(),
                prefix: "a/b".into()
            }
        );
        let whole = Prefix::parse("s3://photos").expect("bucket");
        assert_eq!(whole.prefix(), "");
        assert_eq!(whole.to_string(), "s3://photos/");
        assert_eq!(whole.name_of("x/y.png"), "s3://photos/x/y.png");
        assert!(is_location("store:x") && is_location("s3://b") && !is_location("./store"));
    }

    #[test]
    fn refuses_bad_prefixes_and_sieves_own_area() {
        for (text, expected) in [
            ("store:", "name a prefix"),
            ("store:/", "name a prefix"),
            ("store:../etc", "'..'"),
            ("store:a//b", "empty segments"),
            ("store:projects/1234/images", "own area"),
            ("store:projects", "own area"),
            ("s3://", "not a bucket name"),
            ("s3://Photos/x", "not a bucket name"),
            ("s3://ab/x", "not a bucket name"),
            ("s3://bucket/../x", "'..'"),
            ("/etc/passwd", "store:PREFIX or s3://"),
            ("file:///etc", "store:PREFIX or s3://"),
        ] {
            let err = Prefix::parse(text).expect_err(text).to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
        // A prefix is matched by whole segments: `projectsx` is not the area.
        assert!(Prefix::parse("store:projectsx/a").is_ok());
        assert!(refuse_key("uploads/a.png").is_none());
        assert!(refuse_key("projects/p/images/ab/abcd").is_some());
    }

    #[test]
    fn s3_clients_come_from_the_settings() {
        let mut settings = S3Settings {
            endpoint: Some("http://127.0.0.1:9000".into()),
            allow_http: true,
            access_key_id: Some("minio".into()),
            secret_access_key: Some(Secret::new("minio-secret")),
            ..S3Settings::default()
        };
        let store = s3_store(&settings, "photos").expect("client");
        assert!(!format!("{store:?}").contains("minio-secret"));
        settings.secret_access_key = None;
        let err = s3_store(&settings, "photos").expect_err("half a key pair");
        assert!(err.to_string().contains("s3.secret_access_key"), "{err}");
        settings.access_key_id = None;
        s3_store(&settings, "photos").expect("no keys: instance credentials");
    }
}
