//! Object storage for images, training snapshots and model artifacts.
//!
//! Built on the `object_store` crate so that the local directory used by
//! default and an S3-compatible store in production are one code path.
//! Keys are content-addressed where they can be (images by SHA-256), so a
//! second write of the same object is harmless.

use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use crate::settings::StoreSettings;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {0} does not exist")]
    NotFound(String),
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    #[error("object store error on {key}: {source}")]
    Backend {
        key: String,
        source: object_store::Error,
    },
    #[error("cannot open the object store at {root}: {reason}")]
    Open { root: String, reason: String },
}

impl StoreError {
    /// Whether retrying later could succeed (a timeout, a flaky backend), as
    /// opposed to a missing object or a bad key that will never work.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Backend { .. })
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
}

impl Store {
    pub fn open(settings: &StoreSettings) -> Result<Self, StoreError> {
        let raw = settings.root.to_string_lossy();
        let root = raw.strip_prefix("file://").unwrap_or(&raw).to_owned();
        let open = |reason: String| StoreError::Open {
            root: root.clone(),
            reason,
        };
        std::fs::create_dir_all(&root).map_err(|e| open(e.to_string()))?;
        let local = LocalFileSystem::new_with_prefix(&root).map_err(|e| open(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(local),
        })
    }

    fn path(key: &str) -> Result<ObjectPath, StoreError> {
        let invalid = |reason: &str| StoreError::InvalidKey {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        if key.is_empty() {
            return Err(invalid("empty"));
        }
        if key
            .split('/')
            .any(|part| part == ".." || part == "." || part.is_empty())
        {
            return Err(invalid(
                "keys are relative, without '.', '..' or empty segments",
            ));
        }
        ObjectPath::parse(key).map_err(|e| invalid(&e.to_string()))
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = Self::path(key)?;
        self.inner
            .put(&path, PutPayload::from_bytes(bytes))
            .await
            .map_err(|source| StoreError::Backend {
                key: key.to_owned(),
                source,
            })?;
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = Self::path(key)?;
        let backend = |source: object_store::Error| match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound(key.to_owned()),
            source => StoreError::Backend {
                key: key.to_owned(),
                source,
            },
        };
        self.inner
            .get(&path)
            .await
            .map_err(backend)?
            .bytes()
            .await
            .map_err(backend)
    }
}

/// Hex SHA-256 of some bytes: item identity and artifact checksums.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Where an image with this content hash is stored.
pub fn image_key(project: &str, content_hash: &str) -> String {
    format!(
        "projects/{project}/images/{}/{content_hash}",
        &content_hash[..2.min(content_hash.len())]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_and_reports_missing_objects() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreSettings {
            root: dir.path().to_owned(),
        })
        .expect("open");
        store
            .put("a/b/c.bin", Bytes::from_static(b"hello"))
            .await
            .expect("put");
        assert_eq!(store.get("a/b/c.bin").await.expect("get"), "hello");
        let missing = store.get("a/b/nope").await.expect_err("missing");
        assert!(matches!(missing, StoreError::NotFound(_)));
        assert!(!missing.is_transient());
    }

    #[tokio::test]
    async fn refuses_keys_that_escape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreSettings {
            root: dir.path().to_owned(),
        })
        .expect("open");
        for key in ["../etc/passwd", "a/../../b", "", "a//b"] {
            let err = store.get(key).await.expect_err(key);
            assert!(matches!(err, StoreError::InvalidKey { .. }), "{key}: {err}");
        }
    }

    #[test]
    fn hashes_are_hex_sha256() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
