//! `sieve ingest` and `sieve ingests`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use sieve_shared::Settings;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::ingest::{self, prefix::Prefix};
use crate::projects;

/// Ingest `source` (or `manifest`) into `project` in this process, with a
/// progress bar on a terminal; exit status 2 when some files failed.
pub async fn ingest(
    settings: Settings,
    source: Option<String>,
    project: String,
    manifest: Option<String>,
    annotations: Option<PathBuf>,
    root: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let source = match annotations {
        Some(path) => ingest::Source::Annotations { path, root },
        None => ingest_source(source, manifest, root)?,
    };
    let ctx = Context::connect(settings).await?;
    let project = projects::get(&ctx.db, &project).await?;
    // Ctrl-C or SIGTERM stops between batches; the row says where.
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        sieve_shared::shutdown::signal().await;
        stop.cancel();
    });
    let options = ingest::Options {
        terminal: std::io::stderr().is_terminal(),
        progress: None,
        cancel: Some(cancel),
        // The CLI acts with the database's authority.
        labels_refused: None,
        allowed: None,
    };
    let requested_by = format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    );
    let (id, summary) =
        ingest::runs::run_here(&ctx, &project, &source, &requested_by, options).await?;
    for failure in &summary.failures {
        eprintln!("failed: {failure}");
    }
    let what = match source {
        ingest::Source::Folder(_) => "file(s)",
        ingest::Source::Prefix(_) => "object(s)",
        ingest::Source::Annotations { .. } => "image(s)",
        _ => "row(s)",
    };
    println!(
        "ingest {id}: {} {} into {}: {} new ({} referenced in place), {} duplicate, {} failed, {} with imported labels, {} dispatched",
        summary.files_seen,
        what,
        project.name,
        summary.new_items,
        summary.in_place,
        summary.duplicates,
        summary.failed,
        summary.imported_labels,
        summary.dispatched
    );
    if summary.has_failures() {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(
    settings: Settings,
    project: String,
    limit: u64,
    json: bool,
) -> anyhow::Result<()> {
    let ctx = Context::connect(settings).await?;
    let project = projects::get(&ctx.db, &project).await?;
    let runs = ingest::runs::list(&ctx.db, &project, limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
    } else if runs.is_empty() {
        println!("no ingests into {}", project.name);
    } else {
        for run in &runs {
            println!(
                "{}  {:<11}  {}  seen={} new={} duplicate={} failed={} dispatched={}  by {}  {}{}",
                run.id,
                format!("{:?}", run.state).to_lowercase(),
                run.created_at.format("%Y-%m-%d %H:%M:%S"),
                run.files_seen,
                run.new_items,
                run.duplicates,
                run.failed,
                run.dispatched,
                run.requested_by,
                run.source,
                run.error
                    .as_deref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default(),
            );
        }
    }
    Ok(())
}

/// What `sieve ingest` was asked to read.
fn ingest_source(
    source: Option<String>,
    manifest: Option<String>,
    root: Option<PathBuf>,
) -> anyhow::Result<ingest::Source> {
    Ok(match (manifest, source) {
        (Some(manifest), _) => match manifest.strip_prefix("store:") {
            Some(key) => {
                if root.is_some() {
                    anyhow::bail!("--root is for a manifest file; a stored manifest names keys");
                }
                ingest::Source::ManifestInStore {
                    key: key.to_owned(),
                }
            }
            None => ingest::Source::ManifestFile {
                path: PathBuf::from(manifest),
                root,
            },
        },
        (None, Some(source)) if ingest::prefix::is_location(&source) => {
            ingest::Source::Prefix(Prefix::parse(&source)?)
        }
        (None, Some(dir)) => {
            if root.is_some() {
                anyhow::bail!("--root is for a manifest or annotation file, not a folder");
            }
            ingest::Source::Folder(PathBuf::from(dir))
        }
        (None, None) => {
            anyhow::bail!("give a folder, store:PREFIX, s3://BUCKET/PREFIX or --manifest FILE")
        }
    })
}
