//! Ingest: image files into items, and items into prediction jobs.
//!
//! Images come from a folder (every file under it) or from a manifest (CSV
//! or JSON Lines naming files or store keys, and possibly known labels; see
//! `manifest.rs`). Each image is read, hashed (SHA-256 of its bytes) and
//! checked from its header (format by content, dimensions within the pixel
//! limit) before any decoding. Items are inserted in batches with
//! `ON CONFLICT DO NOTHING` on (project, hash), so ingesting the same images
//! again adds nothing. A file that is not an image still becomes an item,
//! `failed` with the reason, so that nothing handed to sieve disappears
//! silently.
//!
//! Paths never leave their root: a path with `..` that climbs out of it, an
//! absolute path elsewhere, or a symlink that resolves elsewhere is reported
//! and never read.
//!
//! A known label from a manifest is ground truth from people: it is stored
//! as an `import` label, the item is `human_labeled` (so it is never
//! dispatched, rescored or reviewed) and training snapshots include it.

use std::io::Cursor;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use chrono::Utc;
use futures_util::StreamExt;
use image::ImageFormat;
use indicatif::{ProgressBar, ProgressStyle};
use sea_orm::{ActiveValue::Set, EntityTrait, TransactionTrait, TryInsertResult};
use serde::Serialize;
use sieve_shared::ids::ItemId;
use sieve_shared::messages::ModelRef;
use sieve_shared::store::{StoreError, image_key, sha256_hex};
use uuid::Uuid;

use crate::app::Context;
use crate::dispatch;
use crate::entities::item::{self, ItemState};
use crate::entities::label::{self, LabelSource};
use crate::manifest::{ManifestReader, Row, Target};
use crate::projects::Project;

/// Files read and hashed at once.
const READ_CONCURRENCY: usize = 8;

/// Without a terminal, a progress line is logged this often.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);

/// What one ingest did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct IngestSummary {
    /// Files (folder) or rows (manifest) looked at.
    pub files_seen: u64,
    pub new_items: u64,
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
}

#[derive(Clone, Debug, PartialEq, Serialize)]
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

/// An image after reading and checking.
enum Checked {
    Image {
        hash: String,
        bytes: Bytes,
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
    fn from_bytes(bytes: Vec<u8>, max_pixels: u64) -> Self {
        let hash = sha256_hex(&bytes);
        let size = bytes.len() as u64;
        if bytes.is_empty() {
            return Checked::NotAnImage {
                hash,
                size,
                reason: "empty file (zero bytes)".into(),
            };
        }
        match header_dimensions(&bytes, max_pixels) {
            Ok((width, height)) => Checked::Image {
                hash,
                bytes: Bytes::from(bytes),
                width,
                height,
            },
            Err(reason) => Checked::NotAnImage { hash, size, reason },
        }
    }
}

fn too_big(len: u64, max_bytes: u64) -> Option<String> {
    (len > max_bytes).then(|| {
        format!("file is {len} bytes, over the limit of {max_bytes} (ingest.max_file_bytes)")
    })
}

fn check_file(path: &Path, max_pixels: u64, max_bytes: u64) -> Checked {
    let unreadable = |err: std::io::Error| Checked::Unreadable {
        reason: format!("cannot read: {err}"),
    };
    let metadata = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(err) => return unreadable(err),
    };
    if let Some(reason) = too_big(metadata.len(), max_bytes) {
        return Checked::Unreadable { reason };
    }
    match std::fs::read(path) {
        Ok(bytes) => Checked::from_bytes(bytes, max_pixels),
        Err(err) => unreadable(err),
    }
}

/// Format and dimensions from the header only: a decompression bomb is
/// refused before a single pixel is decoded.
pub fn header_dimensions(bytes: &[u8], max_pixels: u64) -> Result<(u32, u32), String> {
    let format =
        image::guess_format(bytes).map_err(|_| "not an image (unknown format)".to_owned())?;
    if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg) {
        return Err(format!(
            "unsupported image format {format:?} (PNG and JPEG are supported)"
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

/// The bar on a terminal; otherwise a log line every few seconds.
struct Progress {
    bar: ProgressBar,
    terminal: bool,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    fn new(total: Option<u64>, terminal: bool) -> Self {
        let bar = match (terminal, total) {
            (false, _) => ProgressBar::hidden(),
            (true, Some(total)) => ProgressBar::new(total).with_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} files  {per_sec}  ETA {eta}  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
            (true, None) => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {pos} rows  {per_sec}  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        let now = Instant::now();
        Self {
            bar,
            terminal,
            started: now,
            last_log: now,
        }
    }

    fn advance(&mut self, by: u64, summary: &IngestSummary) {
        self.bar.inc(by);
        self.bar.set_message(format!(
            "new {} · duplicate {} · failed {}",
            summary.new_items, summary.duplicates, summary.failed
        ));
        if !self.terminal && self.last_log.elapsed() >= PROGRESS_LOG_EVERY {
            self.last_log = Instant::now();
            let rate = summary.files_seen as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                seen = summary.files_seen,
                new = summary.new_items,
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
    /// Class index of a known label.
    label: Option<i32>,
    /// Where a failure is reported: the path and (manifest) line.
    path: String,
    line: Option<u64>,
}

/// Store, insert and dispatch one batch of entries.
async fn ingest_batch(
    ctx: &Context,
    project: &Project,
    model: Option<&ModelRef>,
    entries: Vec<Entry>,
    summary: &mut IngestSummary,
) -> anyhow::Result<()> {
    let now = Utc::now().fixed_offset();
    let mut rows = Vec::with_capacity(entries.len());
    let mut labels_by_hash = std::collections::HashMap::new();
    let mut seen_in_batch = std::collections::HashSet::new();
    for entry in entries {
        summary.files_seen += 1;
        let fail = |reason: String| FileFailure {
            path: entry.path.clone(),
            line: entry.line,
            reason,
        };
        let (hash, size, width, height, state, error, bytes) = match entry.checked {
            Checked::Image {
                hash,
                bytes,
                width,
                height,
            } => {
                let state = if entry.label.is_some() {
                    ItemState::HumanLabeled
                } else {
                    ItemState::Queued
                };
                let size = bytes.len() as u64;
                (
                    hash,
                    size,
                    Some(width),
                    Some(height),
                    state,
                    None,
                    Some(bytes),
                )
            }
            Checked::NotAnImage { hash, size, reason } => {
                summary.failures.push(fail(reason.clone()));
                (
                    hash,
                    size,
                    None,
                    None,
                    ItemState::Failed,
                    Some(reason),
                    None,
                )
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
        let object_key = match entry.object_key {
            Some(key) => key,
            None => {
                let key = image_key(&project.id.to_string(), &hash);
                if let Some(bytes) = bytes {
                    // Content-addressed: storing the same image twice is a no-op.
                    ctx.store.put(&key, bytes).await?;
                }
                key
            }
        };
        if let (Some(class), ItemState::HumanLabeled) = (entry.label, state) {
            labels_by_hash.insert(hash.clone(), class);
        }
        rows.push(item::ActiveModel {
            id: Set(ItemId::new().as_uuid()),
            project_id: Set(project.id.as_uuid()),
            object_key: Set(object_key),
            source: Set(entry.source),
            content_hash: Set(hash),
            size_bytes: Set(size as i64),
            width: Set(width.map(|w| w as i32)),
            height: Set(height.map(|h| h as i32)),
            state: Set(state),
            attempts: Set(0),
            last_error: Set(error),
            dispatched_at: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        });
    }

    let attempted = rows.len() as u64;
    // Items and their import labels land together, or not at all.
    let txn = ctx.db.begin().await?;
    let inserted = if rows.is_empty() {
        Vec::new()
    } else {
        match item::Entity::insert_many(rows)
            .on_conflict_do_nothing_on([item::Column::ProjectId, item::Column::ContentHash])
            .exec_with_returning_many(&txn)
            .await?
        {
            TryInsertResult::Inserted(models) => models,
            TryInsertResult::Empty | TryInsertResult::Conflicted => Vec::new(),
        }
    };
    let labels: Vec<label::ActiveModel> = inserted
        .iter()
        .filter_map(|item| {
            let class = labels_by_hash.get(&item.content_hash)?;
            Some(label::ActiveModel {
                id: Set(Uuid::now_v7()),
                item_id: Set(item.id),
                class_index: Set(*class),
                source: Set(LabelSource::Import),
                reviewer: Set(None),
                prediction_id: Set(None),
                model_version_id: Set(None),
                review_task_id: Set(None),
                created_at: Set(now),
            })
        })
        .collect();
    summary.imported_labels += labels.len() as u64;
    if !labels.is_empty() {
        label::Entity::insert_many(labels).exec(&txn).await?;
    }
    txn.commit().await?;

    summary.duplicates += attempted - inserted.len() as u64;
    let mut to_dispatch: Vec<(Uuid, String)> = Vec::new();
    for item in &inserted {
        match item.state {
            ItemState::Failed => summary.failed += 1,
            ItemState::Queued => {
                summary.new_items += 1;
                to_dispatch.push((item.id, item.object_key.clone()));
            }
            _ => summary.new_items += 1,
        }
    }
    if let Some(model) = model {
        summary.dispatched +=
            dispatch::publish_jobs(ctx, project, model, &to_dispatch).await? as u64;
    }
    Ok(())
}

fn finished(project: &Project, summary: &IngestSummary) {
    metrics::counter!("sieve_items_ingested_total").increment(summary.new_items);
    tracing::info!(
        project = %project.name,
        seen = summary.files_seen,
        new = summary.new_items,
        duplicates = summary.duplicates,
        failed = summary.failed,
        imported_labels = summary.imported_labels,
        dispatched = summary.dispatched,
        "ingest finished"
    );
}

/// Ingest every file under `root` into `project`.
pub async fn ingest_folder(
    ctx: &Context,
    project: &Project,
    root: &Path,
    show_progress: bool,
) -> anyhow::Result<IngestSummary> {
    let root = Root::new(root)?;
    let files = list_files(&root)?;
    let mut progress = Progress::new(Some(files.len() as u64), show_progress);
    let model = dispatch::active_model(ctx, project).await?;
    let mut summary = IngestSummary::default();
    let max_pixels = ctx.settings.ingest.max_pixels;
    let max_bytes = ctx.settings.ingest.max_file_bytes;

    for chunk in files.chunks(ctx.settings.ingest.batch_size.max(1)) {
        let entries: Vec<Entry> = futures_util::stream::iter(chunk.iter().cloned())
            .map(|file| async move {
                let (path, checked) = match file {
                    Ok(path) => {
                        let read = path.clone();
                        let checked = tokio::task::spawn_blocking(move || {
                            check_file(&read, max_pixels, max_bytes)
                        })
                        .await
                        .context("file check task panicked")?;
                        (path.display().to_string(), checked)
                    }
                    Err(failure) => (
                        failure.path,
                        Checked::Unreadable {
                            reason: failure.reason,
                        },
                    ),
                };
                anyhow::Ok(Entry {
                    source: path.clone(),
                    object_key: None,
                    checked,
                    label: None,
                    path,
                    line: None,
                })
            })
            .buffered(READ_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        ingest_batch(ctx, project, model.as_ref(), entries, &mut summary).await?;
        progress.advance(chunk.len() as u64, &summary);
    }
    progress.finish();
    finished(project, &summary);
    Ok(summary)
}

/// Read and check what one manifest row points at; a label that is not
/// one of the project's classes comes back as a failure beside the entry.
async fn check_row(
    ctx: &Context,
    project: &Project,
    root: &Root,
    row: Row,
) -> anyhow::Result<(Entry, Option<FileFailure>)> {
    let max_pixels = ctx.settings.ingest.max_pixels;
    let max_bytes = ctx.settings.ingest.max_file_bytes;
    let mut refused = None;
    let label = match &row.label {
        None => None,
        Some(name) => match project.class_names.iter().position(|c| c == name) {
            Some(index) => Some(index as i32),
            None => {
                refused = Some(FileFailure {
                    path: row.target.to_string(),
                    line: Some(row.line),
                    reason: format!(
                        "label {name:?} is not one of the project's classes ({}); the item is ingested without it",
                        project.class_names.join(", ")
                    ),
                });
                None
            }
        },
    };
    let (object_key, checked) = match &row.target {
        Target::Path(path) => {
            let root = root.clone();
            let path = PathBuf::from(path);
            let checked = tokio::task::spawn_blocking(move || match root.resolve(&path) {
                Ok(real) => check_file(&real, max_pixels, max_bytes),
                Err(reason) => Checked::Unreadable { reason },
            })
            .await
            .context("file check task panicked")?;
            (None, checked)
        }
        Target::Key(key) => {
            let checked = match ctx.store.get(key).await {
                Ok(bytes) => match too_big(bytes.len() as u64, max_bytes) {
                    Some(reason) => Checked::Unreadable { reason },
                    None => Checked::from_bytes(bytes.to_vec(), max_pixels),
                },
                Err(err @ (StoreError::NotFound(_) | StoreError::InvalidKey { .. })) => {
                    Checked::Unreadable {
                        reason: err.to_string(),
                    }
                }
                Err(err) => return Err(err).context("reading the object store"),
            };
            (Some(key.clone()), checked)
        }
    };
    let target = row.target.to_string();
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
    let max_line = usize::try_from(ctx.settings.ingest.max_line_bytes).unwrap_or(usize::MAX);
    let mut reader = ManifestReader::open(manifest, max_line)?;
    let root = match root {
        Some(dir) => Root::new(dir)?,
        None => {
            let parent = manifest.parent().filter(|p| !p.as_os_str().is_empty());
            Root::new(parent.unwrap_or(Path::new(".")))?
        }
    };
    let batch_size = ctx.settings.ingest.batch_size.max(1);
    let mut progress = Progress::new(None, show_progress);
    let model = dispatch::active_model(ctx, project).await?;
    let mut summary = IngestSummary::default();
    let manifest_name = manifest.display().to_string();

    loop {
        // Reading is blocking file I/O: the reader goes to a blocking thread
        // and comes back with the batch.
        let (back, batch) = tokio::task::spawn_blocking(move || {
            let batch = reader.next_batch(batch_size);
            (reader, batch)
        })
        .await
        .context("manifest read task panicked")?;
        reader = back;
        let batch = batch.with_context(|| format!("reading {manifest_name}"))?;
        if batch.is_empty() {
            break;
        }
        let rows = batch.len() as u64;
        let mut good = Vec::with_capacity(batch.len());
        for row in batch {
            match row {
                Ok(row) => good.push(row),
                Err(err) => {
                    summary.files_seen += 1;
                    summary.failed += 1;
                    summary.failures.push(FileFailure {
                        path: manifest_name.clone(),
                        line: Some(err.line),
                        reason: err.reason,
                    });
                }
            }
        }
        let root = &root;
        let checked: Vec<(Entry, Option<FileFailure>)> = futures_util::stream::iter(good)
            .map(|row| check_row(ctx, project, root, row))
            .buffered(READ_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        let mut entries = Vec::with_capacity(checked.len());
        for (entry, refused) in checked {
            summary.failures.extend(refused);
            entries.push(entry);
        }
        ingest_batch(ctx, project, model.as_ref(), entries, &mut summary).await?;
        progress.advance(rows, &summary);
    }
    progress.finish();
    // Malformed rows were reported before the batch's other failures.
    summary.failures.sort_by_key(|f| f.line);
    finished(project, &summary);
    Ok(summary)
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
