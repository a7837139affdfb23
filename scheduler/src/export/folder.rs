//! The `imagefolder` export: a directory with one folder per class holding
//! that class's images, and `labels.csv` beside them (the CSV export of the
//! same rows, provenance and all), the layout torchvision's `ImageFolder`
//! and most training scripts read.
//!
//! Each image is `CLASS/ITEM_ID.EXT` (the extension from the image's own
//! header, since store keys have none): the CSV's `item_id` names it. A
//! row without a label (an item in review, asked for with `state`) is in
//! the CSV only. Where the store is a local directory the images are hard
//! links to its files (no bytes copied; a copy where the directory is on
//! another file system); otherwise each is read and written. A class
//! whose name is no usable folder name (`/`, a control character, `.` or
//! `..`) gets one with those characters replaced by `_`, prefixed by its
//! index if that clashes with another class's.
//!
//! Like a file export, the directory appears only complete: it is written
//! as `.NAME.XXXXXX.partial` beside `--out` and renamed at the end; an
//! error or an interrupt removes it. `--out` must not exist, or be an
//! empty directory.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sieve_shared::store::{LocalFiles, Store};
use tokio::io::AsyncWriteExt;

use super::output::{Options, progress};
use super::snapshot::Image;
use super::{Export, Format, Summary};

/// The CSV beside the class folders.
pub const LABELS_FILE: &str = "labels.csv";

/// How the images got there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// Hard links to the local store's files.
    pub linked: u64,
    /// Copies (a remote store, or a local one on another file system).
    pub copied: u64,
}

/// Write `export` (format `imagefolder`) as the directory `dir`.
pub async fn write(
    mut export: Export,
    store: &Store,
    dir: &Path,
    options: Options,
) -> anyhow::Result<(Summary, Placed)> {
    anyhow::ensure!(
        export.summary().format == Format::ImageFolder,
        "not an imagefolder export"
    );
    check_destination(dir)?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = dir
        .file_name()
        .with_context(|| format!("--out {} names no directory", dir.display()))?
        .to_string_lossy()
        .into_owned();
    // Removed on every early return below.
    let partial = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    let root = partial.path().to_owned();
    let folders = class_folders(&export.project().class_names);
    for folder in &folders {
        tokio::fs::create_dir(root.join(folder)).await?;
    }
    let mut csv = tokio::fs::File::create(root.join(LABELS_FILE)).await?;
    let bar = progress(&export, options.terminal);
    let mut placed = Placed::default();
    loop {
        let chunk = tokio::select! {
            biased;
            () = options.cancel.cancelled() => anyhow::bail!("export interrupted; nothing was written"),
            chunk = export.next_chunk() => chunk?,
        };
        let Some(chunk) = chunk else {
            break;
        };
        csv.write_all(&chunk).await?;
        let images = export.take_images();
        let done = place(store, &root, &folders, images).await?;
        placed.linked += done.linked;
        placed.copied += done.copied;
        bar.set_position(export.summary().rows);
    }
    csv.flush().await?;
    csv.sync_all().await?;
    drop(csv);
    bar.finish_and_clear();
    let kept = partial.keep();
    if let Err(err) = std::fs::rename(&kept, dir) {
        std::fs::remove_dir_all(&kept).ok();
        return Err(err).with_context(|| format!("renaming the export to {}", dir.display()));
    }
    Ok((export.summary().clone(), placed))
}

/// `--out` may not be there yet, or be an empty directory (which the
/// rename replaces); anything else is refused before a row is read.
fn check_destination(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => anyhow::ensure!(
            entries.next().is_none(),
            "--out {} is a directory that is not empty: an imagefolder export writes a new one",
            dir.display()
        ),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) if dir.exists() => {
            anyhow::bail!(
                "--out {} exists and is not a directory: an imagefolder export writes a directory",
                dir.display()
            )
        }
        Err(err) => return Err(err).with_context(|| format!("reading {}", dir.display())),
    }
    Ok(())
}

/// A folder name for each class (see the module's comment).
pub fn class_folders(classes: &[String]) -> Vec<String> {
    let clean: Vec<String> = classes
        .iter()
        .map(|name| {
            let mut folder: String = name
                .chars()
                .map(|c| {
                    if c == '/' || c == '\\' || c.is_control() {
                        '_'
                    } else {
                        c
                    }
                })
                .collect();
            if folder == "." || folder == ".." {
                folder = folder.replace('.', "_");
            }
            folder
        })
        .collect();
    let mut seen = HashSet::new();
    let clashes: HashSet<&String> = clean.iter().filter(|f| !seen.insert(*f)).collect();
    clean
        .iter()
        .enumerate()
        .map(|(i, folder)| {
            if clashes.contains(folder) {
                format!("{i}_{folder}")
            } else {
                folder.clone()
            }
        })
        .collect()
}

/// The images of a page into their class folders: hard links on a local
/// store (on a blocking thread, the page at once), reads and writes
/// otherwise.
async fn place(
    store: &Store,
    root: &Path,
    folders: &[String],
    images: Vec<Image>,
) -> anyhow::Result<Placed> {
    let images: Vec<(Image, PathBuf)> = images
        .into_iter()
        .filter_map(|image| {
            let folder = folders.get(image.class_index?)?;
            let stem = root.join(folder).join(image.item_id.to_string());
            Some((image, stem))
        })
        .collect();
    if images.is_empty() {
        return Ok(Placed::default());
    }
    match store.local_files() {
        Some(files) => tokio::task::spawn_blocking(move || link_all(&files, &images)).await?,
        None => {
            let mut placed = Placed::default();
            for (image, stem) in images {
                let bytes = store
                    .get(&image.key)
                    .await
                    .with_context(|| format!("reading the image of item {}", image.item_id))?;
                tokio::fs::write(with_extension(stem, &bytes), &bytes).await?;
                placed.copied += 1;
            }
            Ok(placed)
        }
    }
}

fn link_all(files: &LocalFiles, images: &[(Image, PathBuf)]) -> anyhow::Result<Placed> {
    use std::io::Read as _;
    let mut placed = Placed::default();
    for (image, stem) in images {
        let source = files.file(&image.key)?;
        let context = || format!("the image of item {} ({})", image.item_id, image.key);
        let mut head = [0u8; 64];
        let mut file = std::fs::File::open(&source).with_context(context)?;
        let n = file.read(&mut head).with_context(context)?;
        let target = with_extension(stem.clone(), &head[..n]);
        match std::fs::hard_link(&source, &target) {
            Ok(()) => placed.linked += 1,
            // Another file system (EXDEV), or one without hard links.
            Err(_) => {
                std::fs::copy(&source, &target).with_context(context)?;
                placed.copied += 1;
            }
        }
    }
    Ok(placed)
}

/// `stem` with the extension of the image format `head` starts with
/// (none if it is not one `image` knows).
fn with_extension(stem: PathBuf, head: &[u8]) -> PathBuf {
    match image::guess_format(head)
        .ok()
        .and_then(|f| f.extensions_str().first())
    {
        Some(ext) => stem.with_extension(ext),
        None => stem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn class_folders_are_usable_names_and_distinct() {
        assert_eq!(
            class_folders(&names(&["boot", "t-shirt/top"])),
            ["boot", "t-shirt_top"]
        );
        assert_eq!(class_folders(&names(&["..", "a"])), ["__", "a"]);
        // "a/b" cleans to "a_b", which another class already is.
        assert_eq!(class_folders(&names(&["a/b", "a_b"])), ["0_a_b", "1_a_b"]);
        assert_eq!(class_folders(&names(&["a/b", "a\\b"])), ["0_a_b", "1_a_b"]);
    }

    #[test]
    fn extensions_come_from_the_header() {
        let png = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0];
        assert_eq!(
            with_extension(PathBuf::from("x/1"), &png),
            PathBuf::from("x/1.png")
        );
        assert_eq!(
            with_extension(PathBuf::from("x/1"), b"hello"),
            PathBuf::from("x/1")
        );
    }
}
