//! Object storage for images, training snapshots and model artifacts.
//!
//! Built on the `object_store` crate so that the local directory used by
//! default and an S3-compatible store in production are one code path.
//! Keys are content-addressed where they can be (images by SHA-256), so a
//! second write of the same object is harmless.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};

use crate::settings::{S3Settings, StoreLocation, StoreSettings};

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

/// The file (object) that marks a directory as a sieve store. The
/// scheduler writes it when it opens the store (`sieve migrate` does first);
/// a worker refuses a root without it, so one whose volume is not mounted
/// (an empty mount point) stops at start instead of failing every image.
pub const MARKER: &str = ".sieve-store";

#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The same backend when it is a local directory.
    local: Option<LocalFiles>,
    /// Where the store is in its bucket, when it is sieve's store in S3.
    home: Option<Arc<S3Home>>,
}

/// Sieve's store in an S3 bucket: its keys are the objects under `prefix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Home {
    pub bucket: String,
    /// Without a trailing `/`; empty: the whole bucket.
    pub prefix: String,
}

impl S3Home {
    /// The store's key of the bucket's object `key`, if it lies under the
    /// store's prefix.
    pub fn key_of<'k>(&self, bucket: &str, key: &'k str) -> Option<&'k str> {
        if bucket != self.bucket {
            return None;
        }
        if self.prefix.is_empty() {
            return Some(key);
        }
        key.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
    }
}

/// Blocking access to the objects of a local store, for work on many small
/// objects at once: `object_store` makes every local read two hops to a
/// blocking thread and back, which for an 850-byte image costs more than
/// hashing it. Call these from a blocking thread (`spawn_blocking`), a
/// batch at a time. Keys and file locations are the store's own, so what is
/// written here reads back through [`Store`] and the other way round.
#[derive(Clone, Debug)]
pub struct LocalFiles {
    fs: Arc<LocalFileSystem>,
    /// The store's directory, canonical (as `object_store` resolves it), so
    /// that a canonical file path can be compared with it.
    root: Arc<std::path::Path>,
}

/// An object being written in parts ([`Store::upload`]).
#[derive(Debug)]
pub struct Upload {
    key: String,
    parts: WriteMultipart,
}

/// Parts uploading at once: bounds what an upload holds in memory (a part
/// is 5 MiB) while a remote store gets a few requests in parallel.
const PARTS_IN_FLIGHT: usize = 4;

impl Upload {
    /// Append `bytes`, waiting while too many parts are still uploading.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.parts
            .wait_for_capacity(PARTS_IN_FLIGHT)
            .await
            .map_err(|source| self.failed(source))?;
        self.parts.write(bytes);
        Ok(())
    }

    /// Upload what is left and make the object visible.
    pub async fn finish(self) -> Result<(), StoreError> {
        let key = self.key;
        self.parts
            .finish()
            .await
            .map(|_| ())
            .map_err(|source| StoreError::Backend { key, source })
    }

    /// Give up: remove the parts uploaded so far.
    pub async fn abort(self) -> Result<(), StoreError> {
        let key = self.key;
        self.parts
            .abort()
            .await
            .map_err(|source| StoreError::Backend { key, source })
    }

    fn failed(&self, source: object_store::Error) -> StoreError {
        StoreError::Backend {
            key: self.key.clone(),
            source,
        }
    }
}

/// An object found by [`Store::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
}

impl Store {
    /// The scheduler's store, where the settings put it: a local directory
    /// (created and marked, as [`Store::open`]) or a bucket prefix (marked
    /// with the same [`MARKER`] object when it has none).
    pub async fn connect(store: &StoreSettings, s3: &S3Settings) -> Result<Self, StoreError> {
        match location(store)? {
            StoreLocation::Local(_) => Self::open(store),
            StoreLocation::S3 { bucket, prefix } => {
                let opened = Self::s3_home(s3, &bucket, &prefix)?;
                match opened.size(MARKER).await {
                    Ok(_) => {}
                    Err(StoreError::NotFound(_)) => opened
                        .put(
                            MARKER,
                            Bytes::from_static(
                                b"a sieve object store: images, snapshots, model artifacts\n",
                            ),
                        )
                        .await
                        .map_err(|err| unreachable_bucket(&opened, err))?,
                    Err(err) => return Err(unreachable_bucket(&opened, err)),
                }
                Ok(opened)
            }
        }
    }

    /// A store that must be there already (what a worker opens): a local
    /// directory as [`Store::open_existing`], or a bucket prefix holding the
    /// [`MARKER`] the scheduler wrote. A bucket that cannot be reached, or a
    /// prefix without the marker (a typo, another deployment's bucket), is
    /// refused at start rather than failing every image.
    pub async fn connect_existing(
        store: &StoreSettings,
        s3: &S3Settings,
    ) -> Result<Self, StoreError> {
        match location(store)? {
            StoreLocation::Local(_) => Self::open_existing(store),
            StoreLocation::S3 { bucket, prefix } => {
                let opened = Self::s3_home(s3, &bucket, &prefix)?;
                match opened.size(MARKER).await {
                    Ok(_) => Ok(opened),
                    Err(StoreError::NotFound(_)) => Err(StoreError::Open {
                        root: opened.describe(),
                        reason: format!(
                            "no {MARKER} object under it: not a sieve store (the scheduler marks the store when it first opens it: run `sieve migrate` with the same store.url)"
                        ),
                    }),
                    Err(err) => Err(unreachable_bucket(&opened, err)),
                }
            }
        }
    }

    /// A client for a whole `bucket` from the `s3.*` settings (an ingest
    /// source). The secret goes to the client and nowhere else
    /// (`object_store` redacts it in its own output).
    pub fn s3_bucket(s3: &S3Settings, bucket: &str) -> Result<Self, StoreError> {
        Ok(Self::from_backend(s3_client(s3, bucket)?))
    }

    /// Sieve's store under `prefix` of `bucket`.
    fn s3_home(s3: &S3Settings, bucket: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = s3_client(s3, bucket)?;
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            client
        } else {
            Arc::new(PrefixStore::new(client, prefix))
        };
        Ok(Self {
            inner,
            local: None,
            home: Some(Arc::new(S3Home {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            })),
        })
    }

    /// Where this store is in S3, when it is sieve's store there.
    pub fn s3_home_of(&self) -> Option<&S3Home> {
        self.home.as_deref()
    }

    /// The store's location for people: a directory or `s3://BUCKET/PREFIX`.
    pub fn describe(&self) -> String {
        match (&self.local, &self.home) {
            (Some(files), _) => files.root().display().to_string(),
            (None, Some(home)) if home.prefix.is_empty() => format!("s3://{}", home.bucket),
            (None, Some(home)) => format!("s3://{}/{}", home.bucket, home.prefix),
            (None, None) => "an object store".into(),
        }
    }

    pub fn open(settings: &StoreSettings) -> Result<Self, StoreError> {
        let root = match location(settings)? {
            StoreLocation::Local(root) => root.to_string_lossy().into_owned(),
            StoreLocation::S3 { .. } => return Err(not_local(settings)),
        };
        let open = |reason: String| StoreError::Open {
            root: root.clone(),
            reason,
        };
        std::fs::create_dir_all(&root).map_err(|e| open(e.to_string()))?;
        let marker = std::path::Path::new(&root).join(MARKER);
        if !marker.exists() {
            std::fs::write(
                &marker,
                "a sieve object store: images, snapshots, model artifacts\n",
            )
            .map_err(|e| open(format!("writing {}: {e}", marker.display())))?;
        }
        Self::open_at(&root)
    }

    /// Open a store that must be there already: its root exists and holds
    /// the [`MARKER`] the scheduler wrote. What a worker opens: a root that
    /// is missing or unmarked is a volume not mounted (or a wrong path), and
    /// every image read from it would fail.
    pub fn open_existing(settings: &StoreSettings) -> Result<Self, StoreError> {
        let root = match location(settings)? {
            StoreLocation::Local(root) => root.to_string_lossy().into_owned(),
            StoreLocation::S3 { .. } => return Err(not_local(settings)),
        };
        let refuse = |reason: String| StoreError::Open {
            root: root.clone(),
            reason,
        };
        let dir = std::path::Path::new(&root);
        if !dir.is_dir() {
            return Err(refuse(
                "no such directory (store.root must name the store the scheduler writes; is its volume mounted?)".into(),
            ));
        }
        if !dir.join(MARKER).exists() {
            return Err(refuse(format!(
                "no {MARKER} in it: not a sieve store, or its volume is not mounted (the scheduler marks the store when it first opens it: run `sieve migrate`)"
            )));
        }
        Self::open_at(&root)
    }

    fn open_at(root: &str) -> Result<Self, StoreError> {
        let open = |reason: String| StoreError::Open {
            root: root.to_owned(),
            reason,
        };
        let canonical = std::fs::canonicalize(root).map_err(|e| open(e.to_string()))?;
        let fs = Arc::new(
            LocalFileSystem::new_with_prefix(&canonical).map_err(|e| open(e.to_string()))?,
        );
        Ok(Self {
            inner: fs.clone(),
            local: Some(LocalFiles {
                fs,
                root: canonical.into(),
            }),
            home: None,
        })
    }

    /// A store over any `object_store` backend (an S3 bucket that ingest
    /// reads from, say).
    pub fn from_backend(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            local: None,
            home: None,
        }
    }

    /// Blocking file access, when this store is a local directory.
    pub fn local_files(&self) -> Option<LocalFiles> {
        self.local.clone()
    }

    /// This store for blocking threads: local files directly, any other
    /// backend through the current runtime. Call it within the runtime.
    pub fn blocking(&self) -> BlockingStore {
        match self.local_files() {
            Some(files) => BlockingStore::Local(files),
            None => BlockingStore::Remote(self.clone(), tokio::runtime::Handle::current()),
        }
    }

    /// Whether `key` may name an object: relative, without `.`, `..` or
    /// empty segments, and valid for the backend.
    pub fn check_key(key: &str) -> Result<(), StoreError> {
        Self::path(key).map(|_| ())
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

    /// Start writing `key` in parts, for an object too large to hold whole
    /// (a snapshot's embedding table). Nothing is visible under `key` until
    /// [`Upload::finish`]; an upload dropped or aborted leaves nothing.
    pub async fn upload(&self, key: &str) -> Result<Upload, StoreError> {
        let path = Self::path(key)?;
        let upload =
            self.inner
                .put_multipart(&path)
                .await
                .map_err(|source| StoreError::Backend {
                    key: key.to_owned(),
                    source,
                })?;
        Ok(Upload {
            key: key.to_owned(),
            parts: WriteMultipart::new(upload),
        })
    }

    /// Remove an object; one that is not there is not an error (a delete
    /// retried after a crash finds it gone).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = Self::path(key)?;
        match self.inner.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(StoreError::Backend {
                key: key.to_owned(),
                source,
            }),
        }
    }

    /// An object's size in bytes, without reading it.
    pub async fn size(&self, key: &str) -> Result<u64, StoreError> {
        let path = Self::path(key)?;
        match self.inner.head(&path).await {
            Ok(meta) => Ok(meta.size),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::NotFound(key.to_owned())),
            Err(source) => Err(StoreError::Backend {
                key: key.to_owned(),
                source,
            }),
        }
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

    /// An object's bytes as they arrive, for reading a large object (a
    /// manifest) without holding it whole.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        let path = Self::path(key)?;
        let owned = key.to_owned();
        let found = self.inner.get(&path).await.map_err(|source| match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound(owned.clone()),
            source => StoreError::Backend {
                key: owned.clone(),
                source,
            },
        })?;
        Ok(found
            .into_stream()
            .map_err(move |source| StoreError::Backend {
                key: owned.clone(),
                source,
            })
            .boxed())
    }

    /// Every object under `prefix` (whole segments: `a/b` holds `a/b/c`,
    /// not `a/bc`), as a stream: the backend pages through the listing, so
    /// memory does not grow with its length. The order is the backend's.
    pub fn list(&self, prefix: &str) -> BoxStream<'static, Result<Listed, StoreError>> {
        let path = match ObjectPath::parse(prefix) {
            Ok(path) => path,
            Err(err) => {
                let err = StoreError::InvalidKey {
                    key: prefix.to_owned(),
                    reason: err.to_string(),
                };
                return futures_util::stream::once(async move { Err(err) }).boxed();
            }
        };
        let owned = prefix.to_owned();
        self.inner
            .list(Some(&path))
            .map(move |listed| match listed {
                Ok(meta) => Ok(Listed {
                    key: meta.location.to_string(),
                    size: meta.size,
                }),
                Err(source) => Err(StoreError::Backend {
                    key: owned.clone(),
                    source,
                }),
            })
            .boxed()
    }
}

/// A [`Store`] used from a blocking thread (`spawn_blocking`): the
/// thread handles a batch of objects, one hop for all of them.
#[derive(Clone, Debug)]
pub enum BlockingStore {
    Local(LocalFiles),
    /// A remote backend: each call waits on the runtime.
    Remote(Store, tokio::runtime::Handle),
}

impl BlockingStore {
    pub fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        match self {
            BlockingStore::Local(files) => files.get(key),
            BlockingStore::Remote(store, runtime) => runtime.block_on(store.get(key)),
        }
    }

    /// An object's bytes if it is at most `max_bytes` long, its size checked
    /// before anything is read; and, in a local store, only a file that
    /// lies inside the store's directory once links are followed. The inner
    /// error is the object's refusal (too large, a link out of the store).
    pub fn get_at_most(
        &self,
        key: &str,
        max_bytes: u64,
    ) -> Result<Result<Bytes, String>, StoreError> {
        let too_large = |size: u64| {
            Err(format!(
                "{size} bytes, over the limit of {max_bytes} (ingest.max_file_bytes); not read"
            ))
        };
        match self {
            BlockingStore::Local(files) => {
                let file = files.file(key)?;
                let real =
                    std::fs::canonicalize(&file).map_err(|e| LocalFiles::io_error(key, e))?;
                if !real.starts_with(files.root()) {
                    return Ok(Err(format!(
                        "a link to {} outside the store; not read",
                        real.display()
                    )));
                }
                let size = std::fs::metadata(&real)
                    .map_err(|e| LocalFiles::io_error(key, e))?
                    .len();
                if size > max_bytes {
                    return Ok(too_large(size));
                }
                files.get(key).map(Ok)
            }
            BlockingStore::Remote(store, runtime) => {
                let size = runtime.block_on(store.size(key))?;
                if size > max_bytes {
                    return Ok(too_large(size));
                }
                runtime.block_on(store.get(key)).map(Ok)
            }
        }
    }

    /// Store `bytes` under a content-addressed key (see
    /// [`LocalFiles::put_content_addressed`]).
    pub fn put_content_addressed(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        match self {
            BlockingStore::Local(files) => files.put_content_addressed(key, &bytes),
            BlockingStore::Remote(store, runtime) => runtime.block_on(store.put(key, bytes)),
        }
    }
}

impl LocalFiles {
    /// The store's directory, canonical.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    /// The key under which this store reads `file` (a canonical path), if
    /// it has one: the file lies under the root, its relative path joined
    /// with `/` is a valid key, and that key leads back to this very file.
    /// The last check matters: `object_store`'s local backend decodes
    /// percent escapes and keeps names ending in `#DIGITS` for its staging
    /// files, so some names have no key of their own.
    pub fn key_of(&self, file: &std::path::Path) -> Option<String> {
        let relative = file.strip_prefix(&self.root).ok()?;
        let mut parts = Vec::new();
        for component in relative.components() {
            match component {
                std::path::Component::Normal(part) => parts.push(part.to_str()?),
                _ => return None,
            }
        }
        let key = parts.join("/");
        (self.file(&key).ok()? == file).then_some(key)
    }

    /// The file an object is kept in (whether or not it exists).
    pub fn file(&self, key: &str) -> Result<std::path::PathBuf, StoreError> {
        let path = Store::path(key)?;
        self.fs
            .path_to_filesystem(&path)
            .map_err(|source| StoreError::Backend {
                key: key.to_owned(),
                source,
            })
    }

    fn io_error(key: &str, err: std::io::Error) -> StoreError {
        match err.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound(key.to_owned()),
            _ => StoreError::Backend {
                key: key.to_owned(),
                source: object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(err),
                },
            },
        }
    }

    /// An object's bytes (blocking).
    pub fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let file = self.file(key)?;
        std::fs::read(&file)
            .map(Bytes::from)
            .map_err(|err| Self::io_error(key, err))
    }

    /// Store `bytes` under a content-addressed `key` (blocking). Like
    /// `object_store`, the bytes go to a staging file beside it (`KEY#N`,
    /// which listings skip) that is then renamed into place, so a reader
    /// never sees half an object; an object already there is replaced by
    /// the same bytes. (Looking first would cost every new image a lookup
    /// in a large directory to save a write on the rare re-ingest.)
    pub fn put_content_addressed(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        use std::io::Write as _;
        let file = self.file(key)?;
        let failed = |err: std::io::Error| Self::io_error(key, err);
        let mut attempt = 1u32;
        let (mut staged, staging) = loop {
            let mut staging = file.clone().into_os_string();
            staging.push(format!("#{attempt}"));
            let staging = std::path::PathBuf::from(staging);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&staging)
            {
                Ok(staged) => break (staged, staging),
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => attempt += 1,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    let parent = file.parent().unwrap_or(std::path::Path::new("."));
                    std::fs::create_dir_all(parent).map_err(failed)?;
                }
                Err(err) => return Err(failed(err)),
            }
        };
        let written = staged
            .write_all(bytes)
            .and_then(|()| std::fs::rename(&staging, &file));
        if let Err(err) = written {
            let _ = std::fs::remove_file(&staging);
            return Err(failed(err));
        }
        Ok(())
    }
}

fn location(settings: &StoreSettings) -> Result<StoreLocation, StoreError> {
    settings.location().map_err(|reason| StoreError::Open {
        root: settings
            .url
            .clone()
            .unwrap_or_else(|| settings.root.display().to_string()),
        reason,
    })
}

fn not_local(settings: &StoreSettings) -> StoreError {
    StoreError::Open {
        root: settings.url.clone().unwrap_or_default(),
        reason: "not a local directory (open it with Store::connect)".into(),
    }
}

fn unreachable_bucket(store: &Store, err: StoreError) -> StoreError {
    StoreError::Open {
        root: store.describe(),
        reason: format!("cannot reach the bucket (s3.* settings): {err}"),
    }
}

/// An S3 client for `bucket` from the `s3.*` settings.
fn s3_client(s3: &S3Settings, bucket: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let refuse = |reason: String| StoreError::Open {
        root: format!("s3://{bucket}"),
        reason,
    };
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(&s3.region)
        .with_allow_http(s3.allow_http);
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    match (&s3.access_key_id, &s3.secret_access_key) {
        (Some(id), Some(secret)) => {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret.expose());
        }
        (None, None) => {}
        _ => {
            return Err(refuse(
                "set both s3.access_key_id and s3.secret_access_key, or neither (instance credentials)"
                    .into(),
            ));
        }
    }
    let client = builder
        .build()
        .map_err(|e| refuse(format!("configuring the S3 client (s3.* settings): {e}")))?;
    Ok(Arc::new(client))
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

    /// A local store in a fresh directory (removed when the guard drops).
    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&StoreSettings::local(dir.path())).expect("open");
        (dir, store)
    }

    #[tokio::test]
    async fn round_trips_and_reports_missing_objects() {
        let (_dir, store) = temp_store();
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
        let (_dir, store) = temp_store();
        for key in ["../etc/passwd", "a/../../b", "", "a//b"] {
            let err = store.get(key).await.expect_err(key);
            assert!(matches!(err, StoreError::InvalidKey { .. }), "{key}: {err}");
        }
    }

    #[tokio::test]
    async fn lists_a_prefix_by_whole_segments_and_streams_objects() {
        let (_dir, store) = temp_store();
        for key in ["in/a/1.bin", "in/a/sub/2.bin", "in/ab/3.bin", "out/4.bin"] {
            store
                .put(key, Bytes::from_static(b"1234"))
                .await
                .expect("put");
        }
        let mut listed: Vec<Listed> = store.list("in/a/").try_collect().await.expect("list");
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&str> = listed.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(keys, ["in/a/1.bin", "in/a/sub/2.bin"]);
        assert!(listed.iter().all(|l| l.size == 4));
        let missing: Vec<Listed> = store.list("nowhere").try_collect().await.expect("list");
        assert!(missing.is_empty());

        let chunks: Vec<Bytes> = store
            .get_stream("out/4.bin")
            .await
            .expect("get")
            .try_collect()
            .await
            .expect("read");
        assert_eq!(chunks.concat(), b"1234");
        assert!(matches!(
            store.get_stream("out/5.bin").await.err(),
            Some(StoreError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn local_files_read_and_write_what_the_store_does() {
        let (dir, store) = temp_store();
        let files = store.local_files().expect("a local store");
        store
            .put("x/1.bin", Bytes::from_static(b"one"))
            .await
            .expect("put");
        assert_eq!(files.get("x/1.bin").expect("get"), "one");
        files
            .put_content_addressed("y/z/2.bin", b"two")
            .expect("put");
        assert_eq!(store.get("y/z/2.bin").await.expect("get"), "two");
        // A second write of the key (the same image again) is harmless.
        files
            .put_content_addressed("y/z/2.bin", b"two")
            .expect("put again");
        assert_eq!(files.get("y/z/2.bin").expect("get"), "two");
        // No staging file is left for a listing to see.
        let listed: Vec<Listed> = store.list("y").try_collect().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(
            std::fs::read_dir(dir.path().join("y/z"))
                .expect("dir")
                .count(),
            1
        );
        assert!(matches!(files.get("x/none"), Err(StoreError::NotFound(_))));
        assert!(matches!(
            files.get("../escape"),
            Err(StoreError::InvalidKey { .. })
        ));
    }

    #[tokio::test]
    async fn a_file_under_the_root_has_the_key_that_reads_it_back() {
        let (dir, store) = temp_store();
        let files = store.local_files().expect("a local store");
        let root = std::fs::canonicalize(dir.path()).expect("canonical");
        assert_eq!(files.root(), root);
        for name in ["in/a b/c.png", "in/100%.png", "in/x#y.png"] {
            let file = root.join(name);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(&file, name).expect("write");
            let key = files.key_of(&file).expect(name);
            assert_eq!(key, name);
            assert_eq!(store.get(&key).await.expect(name), name.as_bytes());
        }
        for (file, why) in [
            (root.join("in/x.png#1"), "a staging file's name"),
            (root.join("in/tab\there.png"), "a control character"),
            (root.clone(), "the root itself"),
            (dir.path().join("../elsewhere.png"), "not a canonical path"),
            (
                root.parent().expect("parent").join("x.png"),
                "outside the root",
            ),
        ] {
            assert_eq!(files.key_of(&file), None, "{why}");
        }
    }

    #[test]
    fn a_remote_store_is_used_from_blocking_threads_through_the_runtime() {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let remote = Store::from_backend(Arc::new(object_store::memory::InMemory::new()));
        assert!(remote.local_files().is_none());
        let blocking = runtime.block_on(async { remote.blocking() });
        assert!(matches!(blocking, BlockingStore::Remote(..)));
        let read = runtime.block_on(async move {
            tokio::task::spawn_blocking(move || {
                blocking.put_content_addressed("k/1", Bytes::from_static(b"one"))?;
                blocking.get("k/1")
            })
            .await
            .expect("blocking task")
        });
        assert_eq!(read.expect("round trip"), "one");
    }

    #[test]
    fn hashes_are_hex_sha256() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
