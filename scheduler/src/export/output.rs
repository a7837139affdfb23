//! Where the CLI writes an export: standard output, or a file that appears
//! only complete. The file is written under a temporary name beside it
//! (`.NAME.XXXXXX.partial`), synced and renamed at the end; an error or an
//! interrupt (Ctrl-C, SIGTERM) removes it, so nothing is ever half-written
//! at the path asked for. (A SIGKILL can leave the `.partial` file, never
//! the file itself.)

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::{Export, Summary};

/// Where to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(PathBuf),
}

impl Destination {
    /// `None` or `-`: standard output.
    pub fn parse(out: Option<&str>) -> Self {
        match out {
            None | Some("-") => Self::Stdout,
            Some(path) => Self::File(PathBuf::from(path)),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Stdout => "standard output".into(),
            Self::File(path) => path.display().to_string(),
        }
    }
}

pub struct Options {
    /// Show a progress bar (on standard error).
    pub terminal: bool,
    /// Stop between pages; the export then fails and writes nothing.
    pub cancel: CancellationToken,
}

/// Write every page of `export` to `to`.
pub async fn write(
    mut export: Export,
    to: &Destination,
    options: Options,
) -> anyhow::Result<Summary> {
    let bar = progress(&export, options.terminal);
    let summary = match to {
        Destination::Stdout => {
            let mut stdout = tokio::io::stdout();
            pages(&mut export, &mut stdout, &bar, &options.cancel).await?;
            stdout.flush().await?;
            export.summary().clone()
        }
        Destination::File(path) => to_file(&mut export, path, &bar, &options.cancel).await?,
    };
    bar.finish_and_clear();
    Ok(summary)
}

async fn to_file(
    export: &mut Export,
    path: &Path,
    bar: &ProgressBar,
    cancel: &CancellationToken,
) -> anyhow::Result<Summary> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("--out {} names no file", path.display()))?
        .to_string_lossy()
        .into_owned();
    // Dropped (removed) on every early return below.
    let partial = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let mut file = tokio::fs::File::from_std(partial.as_file().try_clone()?);
    pages(export, &mut file, bar, cancel).await?;
    file.flush().await?;
    file.sync_all().await?;
    drop(file);
    partial
        .persist(path)
        .with_context(|| format!("renaming the export to {}", path.display()))?;
    Ok(export.summary().clone())
}

async fn pages<W: tokio::io::AsyncWrite + Unpin>(
    export: &mut Export,
    out: &mut W,
    bar: &ProgressBar,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let chunk = tokio::select! {
            biased;
            () = cancel.cancelled() => anyhow::bail!("export interrupted; nothing was written"),
            chunk = export.next_chunk() => chunk?,
        };
        let Some(chunk) = chunk else {
            return Ok(());
        };
        out.write_all(&chunk).await?;
        bar.set_position(export.summary().rows);
    }
}

pub(super) fn progress(export: &Export, terminal: bool) -> ProgressBar {
    if !terminal {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(export.summary().expected);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} items {per_sec} {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}
