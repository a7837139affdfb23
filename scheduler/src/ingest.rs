//! Ingest: image files into items, and items into prediction jobs.
//!
//! Each file is read, hashed (SHA-256 of its bytes) and checked from its
//! header (format by content, dimensions within the pixel limit) before any
//! decoding. Items are inserted in batches with `ON CONFLICT DO NOTHING` on
//! (project, hash), so ingesting the same images again adds nothing. A file
//! that is not an image still becomes an item, `failed` with the reason, so
//! that nothing handed to sieve disappears silently.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use bytes::Bytes;
use chrono::Utc;
use futures_util::StreamExt;
use image::ImageFormat;
use indicatif::{ProgressBar, ProgressStyle};
use sea_orm::{ActiveValue::Set, EntityTrait, TryInsertResult};
use serde::Serialize;
use sieve_shared::ids::ItemId;
use sieve_shared::store::{image_key, sha256_hex};
use uuid::Uuid;

use crate::app::Context;
use crate::dispatch;
use crate::entities::item::{self, ItemState};
use crate::projects::Project;

/// Files read and hashed at once.
const READ_CONCURRENCY: usize = 8;

/// What one ingest did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct IngestSummary {
    pub files_seen: u64,
    pub new_items: u64,
    pub duplicates: u64,
    /// Files that became `failed` items or could not be read at all.
    pub failed: u64,
    pub dispatched: u64,
    /// Path and reason of each failure.
    pub failures: Vec<FileFailure>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FileFailure {
    pub path: String,
    pub reason: String,
}

/// A file after reading and checking.
enum Checked {
    Image {
        path: PathBuf,
        hash: String,
        bytes: Bytes,
        width: u32,
        height: u32,
    },
    /// Readable, so it has a hash and becomes a `failed` item.
    NotAnImage {
        path: PathBuf,
        hash: String,
        size: u64,
        reason: String,
    },
    /// Not even readable: reported, no item.
    Unreadable { path: PathBuf, reason: String },
}

fn check_file(path: PathBuf, max_pixels: u64, max_bytes: u64) -> Checked {
    let metadata = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(err) => {
            return Checked::Unreadable {
                reason: format!("cannot read: {err}"),
                path,
            };
        }
    };
    if metadata.len() > max_bytes {
        return Checked::Unreadable {
            reason: format!(
                "file is {} bytes, over the limit of {max_bytes} (ingest.max_file_bytes)",
                metadata.len()
            ),
            path,
        };
    }
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(err) => {
            return Checked::Unreadable {
                reason: format!("cannot read: {err}"),
                path,
            };
        }
    };
    let hash = sha256_hex(&bytes);
    let size = bytes.len() as u64;
    let not_image = |reason: String| Checked::NotAnImage {
        path: path.clone(),
        hash: hash.clone(),
        size,
        reason,
    };
    if bytes.is_empty() {
        return not_image("empty file (zero bytes)".into());
    }
    match header_dimensions(&bytes, max_pixels) {
        Ok((width, height)) => Checked::Image {
            path,
            hash,
            bytes: Bytes::from(bytes),
            width,
            height,
        },
        Err(reason) => not_image(reason),
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

/// Every regular file under `root`, sorted for a stable order.
fn list_files(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !root.is_dir() {
        anyhow::bail!("{} is not a directory", root.display());
    }
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
        let entry = entry.with_context(|| format!("walking {}", root.display()))?;
        if entry.file_type().is_file() {
            files.push(entry.into_path());
        }
    }
    Ok(files)
}

fn progress_bar(total: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} files  {per_sec}  ETA {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Ingest every file under `root` into `project`.
pub async fn ingest_folder(
    ctx: &Context,
    project: &Project,
    root: &Path,
    show_progress: bool,
) -> anyhow::Result<IngestSummary> {
    let files = list_files(root)?;
    let bar = progress_bar(files.len() as u64, show_progress);
    let model = dispatch::active_model(ctx, project).await?;
    let mut summary = IngestSummary::default();
    let max_pixels = ctx.settings.ingest.max_pixels;
    let max_bytes = ctx.settings.ingest.max_file_bytes;

    for chunk in files.chunks(ctx.settings.ingest.batch_size.max(1)) {
        let checked: Vec<Checked> = futures_util::stream::iter(chunk.iter().cloned())
            .map(|path| async move {
                tokio::task::spawn_blocking(move || check_file(path, max_pixels, max_bytes))
                    .await
                    .context("file check task panicked")
            })
            .buffered(READ_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;

        let now = Utc::now().fixed_offset();
        let mut rows = Vec::with_capacity(checked.len());
        let mut seen_in_chunk = std::collections::HashSet::new();
        for file in checked {
            summary.files_seen += 1;
            let (path, hash, size, width, height, state, error) = match file {
                Checked::Image {
                    path,
                    hash,
                    bytes,
                    width,
                    height,
                } => {
                    // Content-addressed: storing the same image twice is a no-op.
                    let key = image_key(&project.id.to_string(), &hash);
                    let size = bytes.len() as u64;
                    ctx.store.put(&key, bytes).await?;
                    (
                        path,
                        hash,
                        size,
                        Some(width),
                        Some(height),
                        ItemState::Queued,
                        None,
                    )
                }
                Checked::NotAnImage {
                    path,
                    hash,
                    size,
                    reason,
                } => {
                    summary.failures.push(FileFailure {
                        path: path.display().to_string(),
                        reason: reason.clone(),
                    });
                    (
                        path,
                        hash,
                        size,
                        None,
                        None,
                        ItemState::Failed,
                        Some(reason),
                    )
                }
                Checked::Unreadable { path, reason } => {
                    summary.failed += 1;
                    summary.failures.push(FileFailure {
                        path: path.display().to_string(),
                        reason,
                    });
                    continue;
                }
            };
            if !seen_in_chunk.insert(hash.clone()) {
                summary.duplicates += 1;
                continue;
            }
            rows.push(item::ActiveModel {
                id: Set(ItemId::new().as_uuid()),
                project_id: Set(project.id.as_uuid()),
                object_key: Set(image_key(&project.id.to_string(), &hash)),
                source: Set(path.display().to_string()),
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
        let inserted = match item::Entity::insert_many(rows)
            .on_conflict_do_nothing_on([item::Column::ProjectId, item::Column::ContentHash])
            .exec_with_returning_many(&ctx.db)
            .await?
        {
            TryInsertResult::Inserted(models) => models,
            TryInsertResult::Empty | TryInsertResult::Conflicted => Vec::new(),
        };
        summary.duplicates += attempted - inserted.len() as u64;
        let mut to_dispatch: Vec<(Uuid, String)> = Vec::new();
        for model in &inserted {
            match model.state {
                ItemState::Failed => summary.failed += 1,
                _ => {
                    summary.new_items += 1;
                    to_dispatch.push((model.id, model.object_key.clone()));
                }
            }
        }
        if let Some(model) = &model {
            summary.dispatched +=
                dispatch::publish_jobs(ctx, project, model, &to_dispatch).await? as u64;
        }
        bar.inc(chunk.len() as u64);
        bar.set_message(format!(
            "new {} · duplicate {} · failed {}",
            summary.new_items, summary.duplicates, summary.failed
        ));
    }
    bar.finish_and_clear();
    metrics::counter!("sieve_items_ingested_total").increment(summary.new_items);
    tracing::info!(
        project = %project.name,
        files = summary.files_seen,
        new = summary.new_items,
        duplicates = summary.duplicates,
        failed = summary.failed,
        dispatched = summary.dispatched,
        "ingest finished"
    );
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
