//! Ingest: image files into items, and items into prediction jobs.
//!
//! Images come from a [`Source`]: a folder (every file under it), a
//! manifest (CSV or JSON Lines naming files or store keys, and possibly
//! known labels; see `manifest.rs`), local or in the object store, or an
//! object-store prefix (`store:PREFIX`, `s3://BUCKET/PREFIX`; see
//! `object_prefix.rs`). Each source only produces checked batches; one
//! pipeline inserts and publishes them all. Each image is read, hashed
//! (SHA-256 of its bytes) and checked from its header (format by content,
//! dimensions within the pixel limit) before any decoding. Items are inserted in batches with
//! `ON CONFLICT DO NOTHING` on (project, hash), so ingesting the same images
//! again adds nothing. A file that is not an image still becomes an item,
//! `failed` with the reason, so that nothing handed to sieve disappears
//! silently.
//!
//! An image is copied into sieve's store, under its content-addressed key,
//! only when it is not there already: an object of a `store:` prefix, a
//! manifest's key, and a file read from a folder (or a manifest's root)
//! inside the local store's directory keep their own key, and nothing is
//! written (see [`Reading::file`]); the store owns such a file from then
//! on. A copy is what a folder outside the store, or an S3 bucket, gets.
//!
//! Paths never leave their root: a path with `..` that climbs out of it, an
//! absolute path elsewhere, or a symlink that resolves elsewhere is reported
//! and never read.
//!
//! The work is a pipeline, so that reading, inserting and publishing
//! overlap: a producer task reads and hashes files and stores their bytes,
//! a few batches ahead (each batch shared out among a few blocking tasks, a
//! run of files each; an S3 prefix is read asynchronously, a bounded number
//! of objects at once); the caller's loop inserts each batch, in order, and
//! leaves its publish and commit to a task of its own, a few in flight. Every stage is bounded, so memory
//! stays flat however large the input (a prefix is listed as a stream, a
//! manifest read line by line).
//!
//! A batch is one transaction: it takes its project's row in share mode,
//! reads the active model, inserts the items with `dispatched_at` already
//! set, publishes their jobs, waits for the broker's confirms and only then
//! commits (see `insert_batch`). So an item that exists has its job, with
//! no second write of every row to record it, and a crash at any point
//! leaves no item unpublished: what did not commit never existed, and its
//! jobs, if any went out, are orphans whose results are dropped. Items held
//! back (no model yet, the project paused) are inserted with
//! `dispatched_at` NULL and go out on activation or resume; under a rate
//! limit they are published after the commit, paced, then stamped, and a
//! crash there leaves them NULL for the sweeper.
//!
//! The share lock is what keeps the active model straight. An activation
//! locks the project's row exclusively, so it waits for every batch in
//! flight, and its rescore then sees their items; a batch that starts after
//! it reads the new version. So a model activated during an ingest never
//! leaves items with only jobs for the old version.
//!
//! A known label from a manifest is ground truth from people: it is stored
//! as an `import` label, the item is `human_labeled` (so it is never
//! dispatched, rescored or reviewed) and training snapshots include it.

pub mod annotated;
pub mod annotations;
pub mod manifest;
pub mod prefix;
pub mod runs;
pub mod sources;

use std::future::Future;
use std::io::Cursor;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use chrono::Utc;
use futures_util::{StreamExt, TryStreamExt};
use image::ImageFormat;
use indicatif::{ProgressBar, ProgressStyle};
use sea_orm::{
    ActiveValue::Set, ConnectionTrait, DatabaseTransaction, EntityTrait, FromQueryResult,
    Statement, TransactionTrait,
};
use serde::{Deserialize, Serialize};
use sieve_shared::blocking::map_blocking;
use sieve_shared::ids::ItemId;
use sieve_shared::store::{
    BlockingStore, Listed, LocalFiles, Store, StoreError, image_key, sha256_hex,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::context::Context;
use crate::dispatch;
use crate::entities::item::ItemState;
use crate::entities::label::{self, LabelSource};
use crate::ingest::manifest::{ManifestReader, Row, Target};
use crate::ingest::prefix::Prefix;
use crate::ingest::sources::Allowed;
use crate::kind::{LabelValue, TaskKind, classification};
use crate::projects::Project;

/// Files or objects read and hashed at once: a batch is shared out among
/// this many blocking tasks (see [`on_blocking_threads`]).
const READ_CONCURRENCY: usize = 16;

/// Checked batches waiting for their insert.
const BATCHES_AHEAD: usize = 2;

/// Batches inserted and being published, each holding its transaction (a
/// pooled connection) open until its jobs are confirmed.
const BATCHES_IN_FLIGHT: usize = 4;

/// Objects larger than this are hashed on a blocking thread.
const HASH_INLINE_BYTES: usize = 64 * 1024;

/// Without a terminal, a progress line is logged this often.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);

/// Failures with their reasons passed on to an [`Options::progress`]
/// watcher (and so kept for an HTTP ingest); the counts cover them all.
pub const REPORTED_FAILURES: usize = 1000;

/// What to ingest.
#[derive(Clone, Debug)]
pub enum Source {
    /// Every file under a local folder.
    Folder(PathBuf),
    /// A manifest: a local file (rows name paths under `root`, default the
    /// manifest's directory, or store keys).
    ManifestFile {
        path: PathBuf,
        root: Option<PathBuf>,
    },
    /// A manifest stored in sieve's object store: rows name store keys
    /// (a row naming a path is refused: no server file paths).
    ManifestInStore { key: String },
    /// Every object under an object-store prefix.
    Prefix(Prefix),
    /// The images a box annotation file names (Pascal VOC, CSV, COCO), each
    /// with its boxes (a detection project; see [`annotated`]). Paths are
    /// relative to `root`, default the file's directory (or the VOC folder).
    Annotations {
        path: PathBuf,
        root: Option<PathBuf>,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Folder(dir) => write!(f, "{}", dir.display()),
            Source::ManifestFile { path, .. } => write!(f, "manifest {}", path.display()),
            Source::ManifestInStore { key } => write!(f, "manifest store:{key}"),
            Source::Prefix(prefix) => write!(f, "{prefix}"),
            Source::Annotations { path, .. } => write!(f, "annotations {}", path.display()),
        }
    }
}

/// How an ingest reports, and what may stop it.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// A progress bar (on a terminal); otherwise a log line per interval.
    pub terminal: bool,
    /// Receives the counts, and the first [`REPORTED_FAILURES`] failures,
    /// after every batch.
    pub progress: Option<watch::Sender<IngestSummary>>,
    /// Stops the ingest between batches: jobs of inserted items are still
    /// published (or left for the sweeper), and it ends with an error.
    pub cancel: Option<CancellationToken>,
    /// Why a manifest's labels may not be imported by whoever asked (an
    /// `ops` token: labels are the ML team's); such a row's item is ingested
    /// without its label, and the row is reported with this reason.
    pub labels_refused: Option<String>,
    /// Where the caller may read from, when held to a list (a token scoped
    /// to the project): a manifest
    /// row naming a key outside it is reported and skipped. `None`:
    /// anywhere ingest reads (the CLI, a token for every project).
    pub allowed: Option<Allowed>,
}

impl Options {
    pub fn terminal(terminal: bool) -> Self {
        Self {
            terminal,
            ..Self::default()
        }
    }
}

/// The ingest was stopped through [`Options::cancel`].
#[derive(Debug, thiserror::Error)]
#[error("the ingest was stopped before its end; run it again to finish (nothing is added twice)")]
pub struct Stopped;

/// What one ingest did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IngestSummary {
    /// Files (folder) or rows (manifest) looked at.
    pub files_seen: u64,
    pub new_items: u64,
    /// New items whose image stayed where it was, referenced by its own
    /// key (a file under the store's directory, an object of a `store:`
    /// prefix or a manifest's key) rather than copied under its
    /// content-addressed key; the other new items were copied.
    #[serde(default)]
    pub in_place: u64,
    pub duplicates: u64,
    /// Files or rows that became `failed` items or no item at all.
    pub failed: u64,
    pub dispatched: u64,
    /// New items that came with a known label (stored as `import` labels).
    pub imported_labels: u64,
    /// Each failure: file or row, and reason. A row whose label is not one
    /// of the project's classes is here too, though its item was created.
    pub failures: Vec<FileFailure>,
}

impl IngestSummary {
    /// Whether anything failed (the CLI then exits with status 2).
    pub fn has_failures(&self) -> bool {
        self.failed > 0 || !self.failures.is_empty()
    }

    /// The counts alone, without the failures.
    pub fn clone_counts(&self) -> Self {
        Self {
            failures: Vec::new(),
            ..*self
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileFailure {
    pub path: String,
    /// The manifest line, for a manifest ingest.
    pub line: Option<u64>,
    pub reason: String,
}

impl std::fmt::Display for FileFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.path, self.reason),
            None => write!(f, "{}: {}", self.path, self.reason),
        }
    }
}

/// A directory that paths are resolved within; canonical, so that a
/// resolved path can be compared with it.
#[derive(Clone, Debug)]
pub struct Root(PathBuf);

impl Root {
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let canonical =
            std::fs::canonicalize(dir).with_context(|| format!("cannot open {}", dir.display()))?;
        if !canonical.is_dir() {
            anyhow::bail!("{} is not a directory", dir.display());
        }
        Ok(Self(canonical))
    }

    /// The real path of `path` (relative to the root, or absolute), or why
    /// it may not be read: it climbs out of the root, or a symlink on the
    /// way resolves outside it.
    pub fn resolve(&self, path: &Path) -> Result<PathBuf, String> {
        let mut lexical = self.0.clone();
        for component in path.components() {
            match component {
                Component::Prefix(_) | Component::RootDir => {
                    lexical = PathBuf::from(component.as_os_str());
                }
                Component::CurDir => {}
                Component::ParentDir => {
                    lexical.pop();
                }
                Component::Normal(part) => lexical.push(part),
            }
        }
        if !lexical.starts_with(&self.0) {
            return Err(format!(
                "path escapes the root {}; refused",
                self.0.display()
            ));
        }
        let real = std::fs::canonicalize(&lexical).map_err(|err| format!("cannot read: {err}"))?;
        if !real.starts_with(&self.0) {
            return Err(format!(
                "symlink resolves outside the root {}; refused",
                self.0.display()
            ));
        }
        Ok(real)
    }
}

/// An image after reading and checking (and, for a file, storing).
enum Checked {
    Image {
        hash: String,
        size: u64,
        width: u32,
        height: u32,
    },
    /// Readable, so it has a hash and becomes a `failed` item.
    NotAnImage {
        hash: String,
        size: u64,
        reason: String,
    },
    /// Not even readable (or not allowed): reported, no item.
    Unreadable { reason: String },
}

impl Checked {
    /// Hash and check `bytes`; an image's bytes come back for storing.
    fn from_bytes(bytes: Bytes, max_pixels: u64) -> (Self, Option<Bytes>) {
        let hash = sha256_hex(&bytes);
        let size = bytes.len() as u64;
        if bytes.is_empty() {
            let reason = "empty file (zero bytes)".into();
            return (Checked::NotAnImage { hash, size, reason }, None);
        }
        match header_dimensions(&bytes, max_pixels) {
            Ok((width, height)) => (
                Checked::Image {
                    hash,
                    size,
                    width,
                    height,
                },
                Some(bytes),
            ),
            Err(reason) => (Checked::NotAnImage { hash, size, reason }, None),
        }
    }
}

fn too_big(len: u64, max_bytes: u64) -> Option<String> {
    (len > max_bytes).then(|| {
        format!("file is {len} bytes, over the limit of {max_bytes} (ingest.max_file_bytes)")
    })
}

/// Read `path` within the size limit: a file over it is refused from its
/// size before reading, and at most `max_bytes` + 1 bytes are ever read, so
/// a file that grew after the check, or a device that never ends, is
/// refused too. (A named pipe is read like a file, as `cat` would: a
/// producer can stream an image in, and a test uses one to hold an ingest
/// mid-way.)
fn check_file(path: &Path, max_pixels: u64, max_bytes: u64) -> (Checked, Option<Bytes>) {
    use std::io::Read as _;
    let unreadable = |reason: String| (Checked::Unreadable { reason }, None);
    let cannot = |err: std::io::Error| unreadable(format!("cannot read: {err}"));
    let metadata = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(err) => return cannot(err),
    };
    if let Some(reason) = too_big(metadata.len(), max_bytes) {
        return unreadable(reason);
    }
    let capacity = usize::try_from(metadata.len().min(max_bytes)).unwrap_or(0);
    let mut bytes = Vec::with_capacity(capacity);
    let read = std::fs::File::open(path).and_then(|file| {
        file.take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
    });
    if let Err(err) = read {
        return cannot(err);
    }
    if let Some(reason) = too_big(bytes.len() as u64, max_bytes) {
        return unreadable(reason);
    }
    Checked::from_bytes(Bytes::from(bytes), max_pixels)
}

/// What the reading stage needs on a blocking thread. A batch is read by
/// [`READ_CONCURRENCY`] blocking tasks, each taking a run of its files or
/// rows (read, hash, header check, store), rather than by a task per file:
/// for small images the hops between threads cost more than the work.
#[derive(Clone)]
struct Reading {
    store: BlockingStore,
    /// Set when the files are read from a root inside the local store's
    /// directory: they are referenced where they are (see [`Reading::file`]).
    in_place: Option<LocalFiles>,
    project_id: String,
    class_names: Vec<String>,
    project_name: String,
    kind: TaskKind,
    /// See [`Options::labels_refused`].
    labels_refused: Option<String>,
    /// See [`Options::allowed`].
    allowed: Option<Allowed>,
    max_pixels: u64,
    max_bytes: u64,
}

impl Reading {
    /// Call within the runtime (see [`Store::blocking`]). `root`: the
    /// folder (or a manifest's root) that files are read from, if any.
    fn new(ctx: &Context, project: &Project, root: Option<&Root>) -> Self {
        let in_place = match (ctx.store.local_files(), root) {
            (Some(files), Some(root)) if root.0.starts_with(files.root()) => Some(files),
            _ => None,
        };
        Self {
            store: ctx.store.blocking(),
            in_place,
            project_id: project.id.to_string(),
            class_names: project.class_names.clone(),
            project_name: project.name.clone(),
            kind: project.task_kind,
            labels_refused: None,
            allowed: None,
            max_pixels: ctx.settings.ingest.max_pixels,
            max_bytes: ctx.settings.ingest.max_file_bytes,
        }
    }

    /// Read, hash and check a file (a canonical path, as [`Root`] gives),
    /// and see that the image is in the store; returns the key to use
    /// instead of the content-addressed one, if any.
    ///
    /// A file under a root inside the local store's directory is already
    /// an object of the store: it is referenced by its own key (its path
    /// below the store root), as a `store:` prefix is, and nothing is
    /// written. The store owns it from then on (see `docs/architecture.md`,
    /// ingest). Any other file, and one whose path is not a key ingest may
    /// use (see [`prefix::refuse_key`]; sieve's own area is
    /// copied, not referenced), has its bytes stored under their
    /// content-addressed key: storing the same image twice is a no-op, and
    /// an item never exists without its bytes.
    ///
    /// Either way an item is one per (project, hash), and the first
    /// ingested keeps it: of two files with the same bytes, the first in
    /// the folder's sorted order (or the manifest's) is the item's key,
    /// and an image already ingested, copied or in place, keeps the key it
    /// has.
    fn file(&self, path: &Path) -> Result<(Checked, Option<String>), StoreError> {
        let (checked, bytes) = check_file(path, self.max_pixels, self.max_bytes);
        let own_key = self
            .in_place
            .as_ref()
            .and_then(|files| files.key_of(path))
            .filter(|key| prefix::refuse_key(key).is_none());
        if own_key.is_none()
            && let (Checked::Image { hash, .. }, Some(bytes)) = (&checked, bytes)
        {
            let key = image_key(&self.project_id, hash);
            self.store.put_content_addressed(&key, bytes)?;
        }
        Ok((checked, own_key))
    }

    /// Read and check an object of sieve's own area (another project's
    /// image, named by an exported manifest) and store its bytes under this
    /// project's content-addressed key: the new item owns a copy, as a file
    /// from outside the store gets one.
    fn copied_object(&self, key: &str) -> Result<Checked, StoreError> {
        let bytes = match self.store.get_at_most(key, self.max_bytes) {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(reason)) => return Ok(Checked::Unreadable { reason }),
            Err(err) => return object_failure(err).map(|reason| Checked::Unreadable { reason }),
        };
        let (checked, image) = Checked::from_bytes(bytes, self.max_pixels);
        if let (Checked::Image { hash, .. }, Some(bytes)) = (&checked, image) {
            self.store
                .put_content_addressed(&image_key(&self.project_id, hash), bytes)?;
        }
        Ok(checked)
    }

    /// Read and check an object already in sieve's store.
    /// The size is checked before anything is read, and a local store's
    /// link that leads out of its directory is refused, not followed.
    fn stored_object(&self, key: &str) -> Result<Checked, StoreError> {
        match self.store.get_at_most(key, self.max_bytes) {
            Ok(Ok(bytes)) => Ok(Checked::from_bytes(bytes, self.max_pixels).0),
            Ok(Err(reason)) => Ok(Checked::Unreadable { reason }),
            Err(err) => object_failure(err).map(|reason| Checked::Unreadable { reason }),
        }
    }

    /// A folder's file, or the failure found when listing it.
    fn folder_entry(&self, file: Result<PathBuf, FileFailure>) -> Result<Entry, StoreError> {
        let (path, (checked, object_key)) = match file {
            Ok(path) => (path.display().to_string(), self.file(&path)?),
            Err(failure) => (
                failure.path,
                (
                    Checked::Unreadable {
                        reason: failure.reason,
                    },
                    None,
                ),
            ),
        };
        Ok(Entry {
            source: path.clone(),
            object_key,
            checked,
            label: None,
            path,
            line: None,
        })
    }

    /// Read and check what one manifest row points at; a label that is not
    /// one of the project's classes comes back as a failure beside the
    /// entry. Without a `root` (a manifest in the store) a row naming a path
    /// is refused.
    fn manifest_row(
        &self,
        root: Option<&Root>,
        row: Row,
    ) -> Result<(Entry, Option<FileFailure>), StoreError> {
        let mut refused = None;
        let label = match &row.label {
            None => None,
            Some(name) if self.kind != TaskKind::Classification => {
                refused = Some(FileFailure {
                    path: row.target.to_string(),
                    line: Some(row.line),
                    reason: format!(
                        "label {name:?} names a class, but {} is a {} project (import its boxes with `sieve ingest --annotations`); the item is ingested without it",
                        self.project_name, self.kind
                    ),
                });
                None
            }
            Some(name) if self.labels_refused.is_some() => {
                refused = Some(FileFailure {
                    path: row.target.to_string(),
                    line: Some(row.line),
                    reason: format!(
                        "label {name:?} not imported: {}; the item is ingested without it",
                        self.labels_refused.as_deref().unwrap_or_default()
                    ),
                });
                None
            }
            Some(name) => match classification::class_by_name(&self.class_names, name) {
                Some(index) => Some(LabelValue::Class(index)),
                None => {
                    refused = Some(FileFailure {
                        path: row.target.to_string(),
                        line: Some(row.line),
                        reason: format!(
                            "label {name:?} is not one of the project's classes ({}); the item is ingested without it",
                            self.class_names.join(", ")
                        ),
                    });
                    None
                }
            },
        };
        let (object_key, checked) = match (&row.target, root) {
            (Target::Path(path), Some(root)) => match root.resolve(Path::new(path)) {
                Ok(real) => {
                    let (checked, own_key) = self.file(&real)?;
                    (own_key, checked)
                }
                Err(reason) => (None, Checked::Unreadable { reason }),
            },
            (Target::Path(_), None) => {
                let reason = "a manifest in the object store names images by `key`; a `path` is refused (no server file paths)".to_owned();
                (None, Checked::Unreadable { reason })
            }
            // A local manifest (`sieve ingest --manifest FILE`, run with the
            // store's own authority) may name images of sieve's own area, as
            // an export does: they are copied into this project's area. A
            // manifest in the store (the API) may not: a scoped token must
            // not reach another project's images.
            (Target::Key(key), Some(_)) if prefix::in_own_area(key) => {
                (None, self.copied_object(key)?)
            }
            (Target::Key(key), _) => {
                let outside = self
                    .allowed
                    .as_ref()
                    .filter(|allowed| !allowed.covers_key(key))
                    .map(|allowed| allowed.outside(&format!("key {key}")));
                let checked = match outside.or_else(|| prefix::refuse_key(key)) {
                    Some(reason) => Checked::Unreadable { reason },
                    // Already stored: only hashed and checked.
                    None => self.stored_object(key)?,
                };
                (Some(key.clone()), checked)
            }
        };
        let target = row.target.to_string();
        let (checked, label) = match row.boxes {
            Some(boxes) => annotated::with_boxes(checked, boxes, self.class_names.len()),
            None => (checked, label),
        };
        let entry = Entry {
            source: match &row.external_id {
                Some(id) => format!("{target} (external_id {id})"),
                None => target.clone(),
            },
            object_key,
            checked,
            label,
            path: target,
            line: Some(row.line),
        };
        Ok((entry, refused))
    }
}

/// Why one object could not be read, when that is the object's failure (it
/// is missing, its key is bad, access is denied); a backend that keeps
/// failing (after the client's retries) is the ingest's, and comes back as
/// the error.
fn object_failure(err: StoreError) -> Result<String, StoreError> {
    match err {
        err @ (StoreError::NotFound(_) | StoreError::InvalidKey { .. }) => Ok(err.to_string()),
        StoreError::Backend {
            source:
                source @ (object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }),
            ..
        } => Ok(format!("cannot read: {source}")),
        err => Err(err),
    }
}

/// `work` over `inputs` on [`READ_CONCURRENCY`] blocking tasks (see
/// [`map_blocking`]); the first store failure is the batch's.
async fn on_blocking_threads<T, R, W>(inputs: Vec<T>, work: W) -> anyhow::Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    W: Fn(T) -> Result<R, StoreError> + Clone + Send + 'static,
{
    let results = map_blocking(inputs, READ_CONCURRENCY, work)
        .await
        .context("ingest read task panicked")?;
    Ok(results.into_iter().collect::<Result<Vec<R>, _>>()?)
}

/// Format and dimensions from the header only: a decompression bomb is
/// refused before a single pixel is decoded.
pub fn header_dimensions(bytes: &[u8], max_pixels: u64) -> Result<(u32, u32), String> {
    let format =
        image::guess_format(bytes).map_err(|_| "not an image (unknown format)".to_owned())?;
    if !matches!(
        format,
        ImageFormat::Png
            | ImageFormat::Jpeg
            | ImageFormat::WebP
            | ImageFormat::Bmp
            | ImageFormat::Tiff
    ) {
        return Err(format!(
            "unsupported image format {format:?} (PNG, JPEG, WebP, BMP and TIFF are supported)"
        ));
    }
    let reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| format!("corrupt {format:?} header: {e}"))?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(format!(
            "{width}x{height} is {pixels} pixels, over the limit of {max_pixels} (ingest.max_pixels)"
        ));
    }
    if pixels == 0 {
        return Err("image has no pixels".into());
    }
    Ok((width, height))
}

/// Every regular file under `root`, sorted for a stable order; a symlink is
/// followed only when it resolves to a file inside the root (otherwise it
/// is reported), and symlinked directories are not descended into.
fn list_files(root: &Root) -> anyhow::Result<Vec<Result<PathBuf, FileFailure>>> {
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(&root.0).sort_by_file_name() {
        let entry = entry.with_context(|| format!("walking {}", root.0.display()))?;
        if entry.file_type().is_file() {
            files.push(Ok(entry.into_path()));
        } else if entry.path_is_symlink() {
            match root.resolve(entry.path()) {
                Ok(real) if real.is_file() => files.push(Ok(real)),
                Ok(_) => {}
                Err(reason) => files.push(Err(FileFailure {
                    path: entry.path().display().to_string(),
                    line: None,
                    reason,
                })),
            }
        }
    }
    Ok(files)
}

/// The bar on a terminal; otherwise a log line every few seconds. And the
/// counts to a watcher, if there is one.
struct Progress {
    bar: ProgressBar,
    terminal: bool,
    started: Instant,
    last_log: Instant,
    watcher: Option<watch::Sender<IngestSummary>>,
    /// Failures already passed to the watcher.
    reported: usize,
}

impl Progress {
    /// `total` files when known in advance (a folder); otherwise a
    /// spinner counting `unit`s (manifest rows, listed objects).
    fn new(total: Option<u64>, unit: &str, options: &Options) -> Self {
        let terminal = options.terminal;
        let bar = match (terminal, total) {
            (false, _) => ProgressBar::hidden(),
            (true, Some(total)) => ProgressBar::new(total).with_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} files  {per_sec}  ETA {eta}  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
            (true, None) => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template(&format!(
                    "{{spinner}} [{{elapsed_precise}}] {{pos}} {unit}  {{per_sec}}  {{msg}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        let now = Instant::now();
        Self {
            bar,
            terminal,
            started: now,
            last_log: now,
            watcher: options.progress.clone(),
            reported: 0,
        }
    }

    fn advance(&mut self, by: u64, summary: &IngestSummary) {
        if let Some(watcher) = &self.watcher {
            let fresh = &summary.failures[self.reported.min(summary.failures.len())..];
            watcher.send_modify(|shown| {
                let failures = std::mem::take(&mut shown.failures);
                *shown = IngestSummary {
                    failures,
                    ..summary.clone_counts()
                };
                let room = REPORTED_FAILURES.saturating_sub(shown.failures.len());
                shown.failures.extend(fresh.iter().take(room).cloned());
            });
            self.reported = summary.failures.len();
        }
        self.bar.inc(by);
        self.bar.set_message(format!(
            "new {} ({} in place) · duplicate {} · failed {}",
            summary.new_items, summary.in_place, summary.duplicates, summary.failed
        ));
        if !self.terminal && self.last_log.elapsed() >= PROGRESS_LOG_EVERY {
            self.last_log = Instant::now();
            let rate = summary.files_seen as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                seen = summary.files_seen,
                new = summary.new_items,
                in_place = summary.in_place,
                duplicates = summary.duplicates,
                failed = summary.failed,
                per_second = format!("{rate:.0}"),
                "ingest progress"
            );
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// One image ready to become an item.
struct Entry {
    /// For people: the path, or the key, and an external id if given.
    source: String,
    /// Where the item will point; `None`: the content-addressed image key.
    object_key: Option<String>,
    checked: Checked,
    /// A known label: a class, or an image's boxes.
    label: Option<LabelValue>,
    /// Where a failure is reported: the path and (manifest) line.
    path: String,
    line: Option<u64>,
}

/// An item row for the batch insert.
#[derive(Serialize)]
struct NewItem {
    id: Uuid,
    object_key: String,
    source: String,
    content_hash: String,
    size_bytes: i64,
    width: Option<i32>,
    height: Option<i32>,
    state: ItemState,
    last_error: Option<String>,
}

/// What the insert says about each row it added.
#[derive(FromQueryResult)]
struct Inserted {
    id: Uuid,
    content_hash: String,
    state: ItemState,
    object_key: String,
    size_bytes: i64,
}

/// Insert `rows` (skipping hashes the project already has) in one
/// statement; returns the rows added. The rows travel as one JSON
/// parameter rather than thousands of bound values: far less work on both
/// sides for a large batch.
///
/// Queued rows get `dispatched_at` = `dispatched` (`None`: they wait,
/// unpublished, for the first activation, resume or the sweeper).
async fn insert_items(
    db: &impl ConnectionTrait,
    project: &Project,
    now: chrono::DateTime<chrono::FixedOffset>,
    dispatched: Option<chrono::DateTime<chrono::FixedOffset>>,
    rows: &[NewItem],
) -> anyhow::Result<Vec<Inserted>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let json = serde_json::to_string(rows)?;
    let inserted = Inserted::find_by_statement(Statement::from_sql_and_values(
        db.get_database_backend(),
        r#"
        INSERT INTO items (id, project_id, object_key, source, content_hash, size_bytes,
                           width, height, state, attempts, last_error, dispatched_at,
                           created_at, updated_at)
        SELECT r.id, $1, r.object_key, r.source, r.content_hash, r.size_bytes,
               r.width, r.height, r.state, 0, r.last_error,
               CASE WHEN r.state = 'queued' THEN $4::timestamptz END, $2, $2
        FROM jsonb_to_recordset($3::jsonb) AS r(
            id uuid, object_key text, source text, content_hash text, size_bytes bigint,
            width integer, height integer, state text, last_error text)
        ORDER BY r.content_hash
        ON CONFLICT (project_id, content_hash) DO NOTHING
        RETURNING id, content_hash, state, object_key, size_bytes
        "#,
        [
            project.id.as_uuid().into(),
            now.into(),
            json.into(),
            dispatched.into(),
        ],
    ))
    .all(db)
    .await?;
    Ok(inserted)
}

/// Batches in flight: each inserted in its own transaction, which a task
/// then publishes and commits ([`publish_and_commit`]), at most
/// [`BATCHES_IN_FLIGHT`] at once, while later batches are inserted.
#[derive(Default)]
struct InFlight {
    tasks: JoinSet<anyhow::Result<Committed>>,
}

impl InFlight {
    /// Insert `batch` here, in the order batches come (so the first file
    /// with given bytes is the one its item points at), and leave its
    /// publish and commit to a task.
    async fn start(
        &mut self,
        ctx: &Context,
        project: &Project,
        batch: Prepared,
        summary: &mut IngestSummary,
    ) -> anyhow::Result<()> {
        if batch.rows.is_empty() {
            return Ok(());
        }
        while self.tasks.len() >= BATCHES_IN_FLIGHT {
            self.join_one(summary).await?;
        }
        let inserted = insert_batch(ctx, project, batch).await?;
        let (ctx, project) = (ctx.clone(), project.clone());
        self.tasks
            .spawn(async move { publish_and_commit(&ctx, &project, inserted).await });
        Ok(())
    }

    async fn join_one(&mut self, summary: &mut IngestSummary) -> anyhow::Result<()> {
        if let Some(done) = self.tasks.join_next().await {
            summary.add(&done.context("ingest batch task panicked")??);
        }
        Ok(())
    }

    /// Wait for every batch; the first failure is the ingest's.
    async fn finish(mut self, summary: &mut IngestSummary) -> anyhow::Result<()> {
        while !self.tasks.is_empty() {
            self.join_one(summary).await?;
        }
        Ok(())
    }
}

/// A batch's rows, ready for its transaction.
struct Prepared {
    /// Sorted by hash, distinct.
    rows: Vec<NewItem>,
    /// Known labels by hash.
    labels: std::collections::HashMap<String, LabelValue>,
    now: chrono::DateTime<chrono::FixedOffset>,
}

/// What a batch's transaction added to the counts.
#[derive(Default)]
struct Committed {
    new_items: u64,
    in_place: u64,
    duplicates: u64,
    failed: u64,
    dispatched: u64,
    imported_labels: u64,
}

impl IngestSummary {
    fn add(&mut self, batch: &Committed) {
        self.new_items += batch.new_items;
        self.in_place += batch.in_place;
        self.duplicates += batch.duplicates;
        self.failed += batch.failed;
        self.dispatched += batch.dispatched;
        self.imported_labels += batch.imported_labels;
    }
}

/// Check one batch of entries and start its insert and publish.
async fn ingest_batch(
    ctx: &Context,
    project: &Project,
    in_flight: &mut InFlight,
    entries: Vec<Entry>,
    summary: &mut IngestSummary,
) -> anyhow::Result<()> {
    let now = Utc::now().fixed_offset();
    let mut rows = Vec::with_capacity(entries.len());
    let mut labels = std::collections::HashMap::new();
    let mut seen_in_batch = std::collections::HashSet::new();
    for entry in entries {
        summary.files_seen += 1;
        let fail = |reason: String| FileFailure {
            path: entry.path.clone(),
            line: entry.line,
            reason,
        };
        let (hash, size, width, height, state, error) = match entry.checked {
            Checked::Image {
                hash,
                size,
                width,
                height,
            } => {
                let state = if entry.label.is_some() {
                    ItemState::HumanLabeled
                } else if project.task_kind.starts_with_a_model()
                    || project.active_model_version_id.is_some()
                {
                    ItemState::Queued
                } else {
                    // No model to pre-label it yet: straight to people.
                    ItemState::InReview
                };
                (hash, size, Some(width), Some(height), state, None)
            }
            Checked::NotAnImage { hash, size, reason } => {
                summary.failures.push(fail(reason.clone()));
                (hash, size, None, None, ItemState::Failed, Some(reason))
            }
            Checked::Unreadable { reason } => {
                summary.failed += 1;
                summary.failures.push(fail(reason));
                continue;
            }
        };
        if !seen_in_batch.insert(hash.clone()) {
            summary.duplicates += 1;
            continue;
        }
        let object_key = entry
            .object_key
            .unwrap_or_else(|| image_key(&project.id.to_string(), &hash));
        if let (Some(label), ItemState::HumanLabeled) = (entry.label, state) {
            labels.insert(hash.clone(), label);
        }
        rows.push(NewItem {
            id: ItemId::new().as_uuid(),
            object_key,
            source: entry.source,
            content_hash: hash,
            size_bytes: size as i64,
            width: width.map(|w| w as i32),
            height: height.map(|h| h as i32),
            state,
            last_error: error,
        });
    }
    // One lock order for every ingest, so two ingests of overlapping sets
    // wait for each other instead of deadlocking.
    rows.sort_by(|a, b| a.content_hash.cmp(&b.content_hash));
    let batch = Prepared { rows, labels, now };
    in_flight.start(ctx, project, batch, summary).await
}

/// A `seed` review task for each of `items`, in random order: a kind
/// without models sends what it ingests straight to people.
async fn open_seed_tasks(
    txn: &DatabaseTransaction,
    project: &Project,
    items: &[Uuid],
    now: chrono::DateTime<chrono::FixedOffset>,
) -> anyhow::Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let pairs: Vec<[Uuid; 2]> = items.iter().map(|item| [Uuid::now_v7(), *item]).collect();
    txn.execute_raw(Statement::from_sql_and_values(
        txn.get_database_backend(),
        r#"
        INSERT INTO review_tasks (id, project_id, item_id, prediction_id, reason, priority,
                                  state, fencing_token, created_at, updated_at)
        SELECT (r ->> 0)::uuid, $1, (r ->> 1)::uuid, NULL, 'seed', random(), 'open', 0, $2, $2
        FROM jsonb_array_elements($3::jsonb) AS r
        "#,
        [
            project.id.as_uuid().into(),
            now.into(),
            serde_json::to_value(&pairs)?.into(),
        ],
    ))
    .await?;
    Ok(())
}

/// A batch inserted in its still open transaction.
struct Inserting {
    txn: DatabaseTransaction,
    target: dispatch::IngestTarget,
    committed: Committed,
    to_dispatch: Vec<dispatch::JobItem>,
}

/// Insert a batch's items (and import labels) in a transaction of its own,
/// left open for [`publish_and_commit`]. With the jobs published before the
/// commit, an item that exists has its job, and the insert stamps
/// `dispatched_at` itself (no second write of every row). A crash before
/// the commit leaves jobs for items that never existed, whose results are
/// dropped; re-running the ingest inserts and publishes those images afresh.
async fn insert_batch(
    ctx: &Context,
    project: &Project,
    batch: Prepared,
) -> anyhow::Result<Inserting> {
    let Prepared { rows, labels, now } = batch;
    let txn = ctx.db.begin().await?;
    let target = dispatch::lock_for_ingest(&txn, project.id).await?;
    let stamp = target.publishes_in_transaction().then_some(now);
    let inserted = insert_items(&txn, project, now, stamp, &rows).await?;
    let mut committed = Committed {
        duplicates: (rows.len() - inserted.len()) as u64,
        ..Committed::default()
    };
    let imports: Vec<label::ActiveModel> = inserted
        .iter()
        .filter_map(|item| {
            let label = labels.get(&item.content_hash)?;
            Some(label::ActiveModel {
                id: Set(Uuid::now_v7()),
                item_id: Set(item.id),
                class_index: Set(label.class_index()),
                boxes: Set(label.boxes_json()),
                source: Set(LabelSource::Import),
                reviewer: Set(None),
                prediction_id: Set(None),
                model_version_id: Set(None),
                review_task_id: Set(None),
                created_at: Set(now),
            })
        })
        .collect();
    committed.imported_labels = imports.len() as u64;
    if !imports.is_empty() {
        label::Entity::insert_many(imports).exec(&txn).await?;
    }
    let to_review: Vec<Uuid> = inserted
        .iter()
        .filter(|item| item.state == ItemState::InReview)
        .map(|item| item.id)
        .collect();
    open_seed_tasks(&txn, project, &to_review, now).await?;

    let project_id = project.id.to_string();
    let mut to_dispatch: Vec<dispatch::JobItem> = Vec::new();
    for item in inserted {
        if item.state == ItemState::Failed {
            committed.failed += 1;
            continue;
        }
        committed.new_items += 1;
        if item.object_key != image_key(&project_id, &item.content_hash) {
            committed.in_place += 1;
        }
        if item.state == ItemState::Queued {
            to_dispatch.push(dispatch::JobItem {
                id: item.id,
                object_key: item.object_key,
                size_bytes: item.size_bytes,
            });
        }
    }
    Ok(Inserting {
        txn,
        target,
        committed,
        to_dispatch,
    })
}

/// Publish an inserted batch's jobs, wait for the confirms, then commit.
///
/// Held back (no model, paused) the items were inserted unstamped and wait;
/// under a rate limit they are published after the commit, paced, and
/// stamped as they go, so the transaction stays short.
async fn publish_and_commit(
    ctx: &Context,
    project: &Project,
    batch: Inserting,
) -> anyhow::Result<Committed> {
    let Inserting {
        txn,
        target,
        mut committed,
        to_dispatch,
    } = batch;
    let Some(model) = target.model.as_ref().filter(|_| !target.control.paused) else {
        txn.commit().await?;
        return Ok(committed);
    };
    if !target.publishes_in_transaction() {
        txn.commit().await?;
        committed.dispatched =
            dispatch::publish_controlled(ctx, project, model, &to_dispatch, &target.control).await?
                as u64;
        return Ok(committed);
    }
    match dispatch::publish_unstamped(ctx, project, model, &to_dispatch, &target.control).await {
        Ok(published) => {
            txn.commit().await?;
            committed.dispatched = published as u64;
            Ok(committed)
        }
        Err(err) => {
            // Keep what was accepted: unstamped, the items are the
            // sweeper's to publish once the broker is back.
            let ids = to_dispatch.iter().map(|item| item.id).collect();
            dispatch::stamp(&txn, ids, None).await?;
            txn.commit().await?;
            Err(err.context("publishing an ingest batch's jobs; its items wait for the sweeper"))
        }
    }
}

fn finished(project: &Project, source: &Source, summary: &IngestSummary) {
    metrics::counter!("sieve_items_ingested_total").increment(summary.new_items);
    tracing::info!(
        project = %project.name,
        source = %source,
        seen = summary.files_seen,
        new = summary.new_items,
        in_place = summary.in_place,
        duplicates = summary.duplicates,
        failed = summary.failed,
        imported_labels = summary.imported_labels,
        dispatched = summary.dispatched,
        "ingest finished"
    );
}

/// A checked batch on its way from the reading stage to the insert.
struct Batch {
    /// Files, objects or manifest rows it covers (for progress).
    rows: u64,
    entries: Vec<Entry>,
    /// Malformed manifest rows and refused labels.
    failures: Vec<FileFailure>,
    /// Rows that became no entry at all (malformed).
    malformed: u64,
}

impl Batch {
    fn of(entries: Vec<Entry>) -> Self {
        Self {
            rows: entries.len() as u64,
            entries,
            failures: Vec::new(),
            malformed: 0,
        }
    }
}

/// Where a reading stage sends its batches; an error ends the ingest.
type Batches = mpsc::Sender<anyhow::Result<Batch>>;

/// Ingest `source` into `project`: the one entry point behind the CLI, the
/// HTTP API, the demo and the benchmark.
pub async fn ingest(
    ctx: &Context,
    project: &Project,
    source: &Source,
    options: &Options,
) -> anyhow::Result<IngestSummary> {
    let summary = match source {
        Source::Folder(dir) => folder(ctx, project, dir, options).await?,
        Source::ManifestFile { path, root } => {
            let max_line = max_line_bytes(ctx);
            let reader = ManifestReader::open(path, max_line)?;
            let root = match root {
                Some(dir) => Root::new(dir)?,
                None => {
                    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
                    Root::new(parent.unwrap_or(Path::new(".")))?
                }
            };
            manifest(
                ctx,
                project,
                reader,
                Some(root),
                path.display().to_string(),
                options,
            )
            .await?
        }
        Source::ManifestInStore { key } => {
            let reader = stored_manifest(ctx, key).await?;
            manifest(ctx, project, reader, None, format!("store:{key}"), options).await?
        }
        Source::Prefix(prefix) => prefix_objects(ctx, project, prefix, options).await?,
        Source::Annotations { path, root } => {
            annotation_file(ctx, project, path, root.as_deref(), options).await?
        }
    };
    finished(project, source, &summary);
    Ok(summary)
}

/// Ingest every file under `root` into `project`.
pub async fn ingest_folder(
    ctx: &Context,
    project: &Project,
    root: &Path,
    show_progress: bool,
) -> anyhow::Result<IngestSummary> {
    let source = Source::Folder(root.to_owned());
    ingest(ctx, project, &source, &Options::terminal(show_progress)).await
}

/// Ingest the images a manifest names into `project`. Paths are relative to
/// `root` (default: the manifest's directory). A file that is not a
/// manifest is refused before anything is written; a bad row is reported
/// with its line number and the rest goes on.
pub async fn ingest_manifest(
    ctx: &Context,
    project: &Project,
    manifest: &Path,
    root: Option<&Path>,
    show_progress: bool,
) -> anyhow::Result<IngestSummary> {
    let source = Source::ManifestFile {
        path: manifest.to_owned(),
        root: root.map(Path::to_owned),
    };
    ingest(ctx, project, &source, &Options::terminal(show_progress)).await
}

/// The pipeline every source shares: `read` sends checked batches (it
/// runs as a task of its own, a few batches ahead); each is inserted and
/// its jobs published as it lands. Returns when the reader is done and
/// every publish confirmed.
async fn pipeline<F, Fut>(
    ctx: &Context,
    project: &Project,
    mut progress: Progress,
    options: &Options,
    read: F,
) -> anyhow::Result<IngestSummary>
where
    F: FnOnce(Batches) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Aborts the reading stage if this returns early.
    struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            if let Some(task) = &self.0 {
                task.abort();
            }
        }
    }
    let (send, mut batches) = mpsc::channel(BATCHES_AHEAD);
    let mut reader = AbortOnDrop(Some(tokio::spawn(read(send))));
    let cancel = options.cancel.clone().unwrap_or_default();
    let mut in_flight = InFlight::default();
    let mut summary = IngestSummary::default();
    let mut stopped = false;
    loop {
        let batch = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                stopped = true;
                break;
            }
            batch = batches.recv() => batch,
        };
        let Some(batch) = batch else { break };
        let batch = batch?;
        summary.files_seen += batch.malformed;
        summary.failed += batch.malformed;
        summary.failures.extend(batch.failures);
        ingest_batch(ctx, project, &mut in_flight, batch.entries, &mut summary).await?;
        progress.advance(batch.rows, &summary);
    }
    // What was inserted is published even when stopped.
    in_flight.finish(&mut summary).await?;
    progress.advance(0, &summary);
    progress.finish();
    if stopped {
        return Err(Stopped.into());
    }
    // A reading stage that panicked closed the channel early: not an end.
    if let Some(task) = reader.0.take() {
        task.await.context("the reading stage of ingest failed")?;
    }
    Ok(summary)
}

fn max_line_bytes(ctx: &Context) -> usize {
    usize::try_from(ctx.settings.ingest.max_line_bytes).unwrap_or(usize::MAX)
}

async fn folder(
    ctx: &Context,
    project: &Project,
    root: &Path,
    options: &Options,
) -> anyhow::Result<IngestSummary> {
    let root = Root::new(root)?;
    let files = list_files(&root)?;
    let progress = Progress::new(Some(files.len() as u64), "files", options);
    let batch_size = ctx.settings.ingest.batch_size.max(1);
    let reading = Reading::new(ctx, project, Some(&root));
    pipeline(ctx, project, progress, options, move |send| async move {
        let mut files = files.into_iter();
        loop {
            let chunk: Vec<_> = files.by_ref().take(batch_size).collect();
            if chunk.is_empty() {
                return;
            }
            let reading = reading.clone();
            let entries = on_blocking_threads(chunk, move |file| reading.folder_entry(file))
                .await
                .map(Batch::of);
            let failed = entries.is_err();
            if send.send(entries).await.is_err() || failed {
                return;
            }
        }
    })
    .await
}

/// Hash and check bytes that are already in memory: small ones here,
/// larger ones on a blocking thread.
async fn check_bytes(bytes: Bytes, max_pixels: u64) -> anyhow::Result<(Checked, Option<Bytes>)> {
    if bytes.len() <= HASH_INLINE_BYTES {
        return Ok(Checked::from_bytes(bytes, max_pixels));
    }
    tokio::task::spawn_blocking(move || Checked::from_bytes(bytes, max_pixels))
        .await
        .context("hash task panicked")
}

/// Read and check an object of a store; a missing or forbidden object is
/// that object's failure, a backend that keeps failing (after the client's
/// retries) is the ingest's.
async fn read_object(
    ctx: &Context,
    store: &Store,
    key: &str,
    size: Option<u64>,
) -> anyhow::Result<(Checked, Option<Bytes>)> {
    let max_bytes = ctx.settings.ingest.max_file_bytes;
    if let Some(reason) = size.and_then(|size| too_big(size, max_bytes)) {
        return Ok((Checked::Unreadable { reason }, None));
    }
    let unreadable = |reason: String| Ok((Checked::Unreadable { reason }, None));
    match store.get(key).await {
        Ok(bytes) => match too_big(bytes.len() as u64, max_bytes) {
            Some(reason) => unreadable(reason),
            None => check_bytes(bytes, ctx.settings.ingest.max_pixels).await,
        },
        Err(err) => match object_failure(err) {
            Ok(reason) => unreadable(reason),
            Err(err) => Err(err).with_context(|| format!("reading {key} from the object store")),
        },
    }
}

/// A manifest stored in sieve's store, opened for streaming: its bytes are
/// read as the rows are, never held whole.
async fn stored_manifest(ctx: &Context, key: &str) -> anyhow::Result<ManifestReader> {
    if let Some(reason) = prefix::refuse_key(key) {
        anyhow::bail!("manifest store:{key}: {reason}");
    }
    let stream = ctx
        .store
        .get_stream(key)
        .await
        .with_context(|| format!("opening manifest store:{key}"))?
        .map_err(std::io::Error::other);
    let bytes = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let name = PathBuf::from(format!("store:{key}"));
    let max_line = max_line_bytes(ctx);
    let reader = tokio::task::spawn_blocking(move || {
        ManifestReader::from_reader(&name, Box::new(std::io::BufReader::new(bytes)), max_line)
    })
    .await
    .context("manifest read task panicked")??;
    Ok(reader)
}

/// Ingest the images a box annotation file names, each with its boxes: the
/// whole file is checked first ([`annotated::prepare`]), then its images go
/// through the manifest path.
async fn annotation_file(
    ctx: &Context,
    project: &Project,
    path: &Path,
    root: Option<&Path>,
    options: &Options,
) -> anyhow::Result<IngestSummary> {
    if !project.task_kind.draws_boxes() {
        anyhow::bail!(
            "project {} is a {} project: box annotations are imported into a detection project (sieve project create NAME --task detection --classes ...)",
            project.name,
            project.task_kind
        );
    }
    let root = match root {
        Some(dir) => Root::new(dir)?,
        None if path.is_dir() => Root::new(path)?,
        None => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            Root::new(parent.unwrap_or(Path::new(".")))?
        }
    };
    let rows = {
        let (path, root, project) = (path.to_owned(), root.clone(), project.clone());
        tokio::task::spawn_blocking(move || annotated::prepare(&path, &root, &project))
            .await
            .context("annotation read task panicked")??
    };
    let progress = Progress::new(Some(rows.len() as u64), "images", options);
    let batch_size = ctx.settings.ingest.batch_size.max(1);
    let reading = Reading::new(ctx, project, Some(&root));
    pipeline(ctx, project, progress, options, move |send| async move {
        let mut rows = rows.into_iter();
        loop {
            let chunk: Vec<Row> = rows.by_ref().take(batch_size).collect();
            if chunk.is_empty() {
                return;
            }
            let (reading, root) = (reading.clone(), root.clone());
            let batch =
                on_blocking_threads(chunk, move |row| reading.manifest_row(Some(&root), row))
                    .await
                    .map(|checked| {
                        let (entries, refused): (Vec<Entry>, Vec<Option<FileFailure>>) =
                            checked.into_iter().unzip();
                        Batch {
                            failures: refused.into_iter().flatten().collect(),
                            ..Batch::of(entries)
                        }
                    });
            let failed = batch.is_err();
            if send.send(batch).await.is_err() || failed {
                return;
            }
        }
    })
    .await
}

/// Ingest the images a manifest names; a bad row is reported with its line
/// number and the rest goes on.
async fn manifest(
    ctx: &Context,
    project: &Project,
    reader: ManifestReader,
    root: Option<Root>,
    manifest_name: String,
    options: &Options,
) -> anyhow::Result<IngestSummary> {
    let batch_size = ctx.settings.ingest.batch_size.max(1);
    let progress = Progress::new(None, "rows", options);
    let mut reading = Reading::new(ctx, project, root.as_ref());
    reading.labels_refused = options.labels_refused.clone();
    reading.allowed = options.allowed.clone();
    let mut summary = pipeline(ctx, project, progress, options, move |send| async move {
        let mut reader = reader;
        loop {
            let batch =
                read_manifest_batch(&reading, root.as_ref(), reader, batch_size, &manifest_name)
                    .await;
            let (batch, back) = match batch {
                Ok((Some(batch), back)) => (Ok(batch), Some(back)),
                Ok((None, _)) => return,
                Err(err) => (Err(err), None),
            };
            if send.send(batch).await.is_err() {
                return;
            }
            match back {
                Some(back) => reader = back,
                None => return,
            }
        }
    })
    .await?;
    // Malformed rows were reported before the batch's other failures.
    summary.failures.sort_by_key(|f| f.line);
    Ok(summary)
}

/// The next batch of a manifest, read and checked; `None` at its end. The
/// reader goes to a blocking thread (file I/O) and comes back.
async fn read_manifest_batch(
    reading: &Reading,
    root: Option<&Root>,
    reader: ManifestReader,
    batch_size: usize,
    manifest_name: &str,
) -> anyhow::Result<(Option<Batch>, ManifestReader)> {
    let (reader, rows) = tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        let rows = reader.next_batch(batch_size);
        (reader, rows)
    })
    .await
    .context("manifest read task panicked")?;
    let rows = rows.with_context(|| format!("reading {manifest_name}"))?;
    if rows.is_empty() {
        return Ok((None, reader));
    }
    let mut batch = Batch {
        rows: rows.len() as u64,
        entries: Vec::with_capacity(rows.len()),
        failures: Vec::new(),
        malformed: 0,
    };
    let mut good = Vec::with_capacity(rows.len());
    for row in rows {
        match row {
            Ok(row) => good.push(row),
            Err(err) => {
                batch.malformed += 1;
                batch.failures.push(FileFailure {
                    path: manifest_name.to_owned(),
                    line: Some(err.line),
                    reason: err.reason,
                });
            }
        }
    }
    let (reading, root) = (reading.clone(), root.cloned());
    let checked = on_blocking_threads(good, move |row| reading.manifest_row(root.as_ref(), row))
        .await
        .with_context(|| format!("reading the images {manifest_name} names"))?;
    for (entry, refused) in checked {
        batch.failures.extend(refused);
        batch.entries.push(entry);
    }
    Ok((Some(batch), reader))
}

/// Ingest every object under an object-store prefix: listed as a stream,
/// read a batch at a time with bounded concurrency.
async fn prefix_objects(
    ctx: &Context,
    project: &Project,
    prefix: &Prefix,
    options: &Options,
) -> anyhow::Result<IngestSummary> {
    let prefix = &prefix.within(&ctx.store);
    let store = prefix.open(ctx)?;
    let progress = Progress::new(None, "objects", options);
    let batch_size = ctx.settings.ingest.batch_size.max(1);
    let (ctx2, project2, prefix2) = (ctx.clone(), project.clone(), prefix.clone());
    pipeline(ctx, project, progress, options, move |send| async move {
        let mut listing = store.list(prefix2.prefix()).chunks(batch_size);
        while let Some(chunk) = listing.next().await {
            let batch = async {
                let listed = chunk
                    .into_iter()
                    .collect::<Result<Vec<Listed>, StoreError>>()
                    .with_context(|| format!("listing {prefix2}"))?;
                let entries = futures_util::stream::iter(listed)
                    // The marker object some tools make for a "folder".
                    .filter(|l| std::future::ready(!(l.size == 0 && l.key == prefix2.prefix())))
                    .map(|l| object_entry(&ctx2, &project2, &store, &prefix2, l))
                    .buffered(READ_CONCURRENCY)
                    .try_collect::<Vec<Entry>>()
                    .await?;
                anyhow::Ok(Batch::of(entries))
            }
            .await;
            let failed = batch.is_err();
            if send.send(batch).await.is_err() || failed {
                return;
            }
        }
    })
    .await
}

/// Read and check one listed object; an image from outside sieve's store
/// is copied into it under its content-addressed key.
async fn object_entry(
    ctx: &Context,
    project: &Project,
    store: &Store,
    prefix: &Prefix,
    listed: Listed,
) -> anyhow::Result<Entry> {
    let name = prefix.name_of(&listed.key);
    let refused = if prefix.is_external() {
        Store::check_key(&listed.key).err().map(|e| e.to_string())
    } else {
        prefix::refuse_key(&listed.key)
    };
    let checked = match refused {
        Some(reason) => Checked::Unreadable { reason },
        None => {
            let (checked, bytes) = read_object(ctx, store, &listed.key, Some(listed.size)).await?;
            if let (true, Checked::Image { hash, .. }, Some(bytes)) =
                (prefix.is_external(), &checked, bytes)
            {
                ctx.store
                    .put(&image_key(&project.id.to_string(), hash), bytes)
                    .await?;
            }
            checked
        }
    };
    Ok(Entry {
        source: name.clone(),
        // Sieve's own objects stay where they are; copies are content-addressed.
        object_key: (!prefix.is_external()).then_some(listed.key),
        checked,
        label: None,
        path: name,
        line: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = image::GrayImage::new(width, height);
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).expect("encode");
        out.into_inner()
    }

    #[test]
    fn files_are_read_within_the_size_limit_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("a.png");
        std::fs::write(&image, png(28, 28)).expect("write");
        let size = std::fs::metadata(&image).expect("stat").len();
        let (checked, bytes) = check_file(&image, 1_000, size);
        assert!(matches!(checked, Checked::Image { width: 28, .. }));
        assert_eq!(bytes.map(|b| b.len() as u64), Some(size));

        let (checked, _) = check_file(&image, 1_000, size - 1);
        assert!(
            matches!(&checked, Checked::Unreadable { reason } if reason.contains("over the limit")),
            "a byte over the limit"
        );
        let (checked, _) = check_file(dir.path(), 1_000, 1 << 20);
        assert!(
            matches!(&checked, Checked::Unreadable { reason } if reason.starts_with("cannot read")),
            "a directory"
        );
        // A device that never ends is cut off at the limit.
        let (checked, _) = check_file(Path::new("/dev/zero"), 1_000, size);
        assert!(
            matches!(&checked, Checked::Unreadable { reason } if reason.contains("over the limit")),
            "/dev/zero"
        );
        let (checked, _) = check_file(&dir.path().join("none.png"), 1_000, size);
        assert!(
            matches!(&checked, Checked::Unreadable { reason } if reason.starts_with("cannot read"))
        );
    }

    #[test]
    fn reads_dimensions_from_the_header() {
        assert_eq!(header_dimensions(&png(28, 14), 1_000), Ok((28, 14)));
    }

    #[test]
    fn refuses_too_many_pixels_before_decoding() {
        let err = header_dimensions(&png(100, 100), 9_999).expect_err("over limit");
        assert!(err.contains("over the limit"), "{err}");
    }

    #[test]
    fn refuses_non_images_and_truncated_headers() {
        assert!(header_dimensions(b"hello world", 1_000).is_err());
        let truncated = &png(28, 28)[..12];
        assert!(header_dimensions(truncated, 1_000).is_err());
    }
}
