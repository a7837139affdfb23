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
//! The `yolo` export (detection projects) is the layout YOLO trainers
//! read: `images/ITEM_ID.EXT`, `labels/ITEM_ID.txt` with one line per box
//! (`class x_centre y_centre width height`, the four as fractions of the
//! image's size; an empty file for an image with nothing boxed),
//! `classes.txt` (a class name per line, in index order), `data.yaml`
//! (the same names for Ultralytics) and `labels.jsonl`, the JSON Lines
//! export of the same rows with their provenance.
//!
//! The `blurred` export (de-identification) is the delivery layout:
//! `images/ITEM_ID.EXT` with every box of the item's label blurred
//! ([`Blur`]), decoded and encoded again (never a link to the original,
//! never its bytes), and `annotations.json`, the COCO export of the same
//! rows. An image that does not decode stops the export, naming the item:
//! a delivery does not go out with a hole in it.
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

use super::blur::Blur;
use super::output::{Options, progress};
use super::snapshot::Image;
use super::{Export, Format, Summary};

/// The CSV beside the class folders.
pub const LABELS_FILE: &str = "labels.csv";

/// The export's rows beside the images: the CSV beside the class folders,
/// the JSON Lines beside a YOLO layout.
pub fn labels_file(format: Format) -> &'static str {
    match format {
        Format::Yolo => "labels.jsonl",
        Format::Blurred => "annotations.json",
        _ => LABELS_FILE,
    }
}

/// Where a folder export puts each image, and what else it writes.
enum Layout {
    /// A folder per class (`imagefolder`).
    Classes(Vec<String>),
    /// `images/` and `labels/` (`yolo`).
    Yolo,
    /// `images/`, every box blurred (`blurred`).
    Blurred(Blur),
}

/// How the images got there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// Hard links to the local store's files.
    pub linked: u64,
    /// Copies (a remote store, or a local one on another file system).
    pub copied: u64,
}

/// Write `export` (a folder format: `imagefolder`, `yolo`, or `blurred`
/// with the default [`Blur`]) as the directory `dir`.
pub async fn write(
    export: Export,
    store: &Store,
    dir: &Path,
    options: Options,
) -> anyhow::Result<(Summary, Placed)> {
    write_blurred(export, store, dir, options, Blur::default()).await
}

/// [`write`], with `blur` for a `blurred` export (the others ignore it).
/// A blurred image counts as [`Placed::copied`].
pub async fn write_blurred(
    mut export: Export,
    store: &Store,
    dir: &Path,
    options: Options,
    blur: Blur,
) -> anyhow::Result<(Summary, Placed)> {
    let format = export.summary().format;
    anyhow::ensure!(format.is_folder(), "not a folder export");
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
    let classes = export.project().class_names.clone();
    let layout = match format {
        Format::Yolo => {
            tokio::fs::create_dir(root.join("images")).await?;
            tokio::fs::create_dir(root.join("labels")).await?;
            tokio::fs::write(root.join("classes.txt"), yolo_classes(&classes)).await?;
            tokio::fs::write(root.join("data.yaml"), yolo_data(&classes)).await?;
            Layout::Yolo
        }
        Format::Blurred => {
            tokio::fs::create_dir(root.join("images")).await?;
            Layout::Blurred(blur)
        }
        _ => {
            let folders = class_folders(&classes);
            for folder in &folders {
                tokio::fs::create_dir(root.join(folder)).await?;
            }
            Layout::Classes(folders)
        }
    };
    let mut csv = tokio::fs::File::create(root.join(labels_file(format))).await?;
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
        let done = place(store, &root, &layout, images).await?;
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

/// `classes.txt`: a class name per line, line N (from 0) class N.
fn yolo_classes(classes: &[String]) -> String {
    classes.iter().map(|c| format!("{c}\n")).collect()
}

/// `data.yaml` for Ultralytics: the images (also as the validation set:
/// split them as the training plan needs) and the class names by index.
fn yolo_data(classes: &[String]) -> String {
    let names: String = classes
        .iter()
        .enumerate()
        .map(|(i, c)| format!("  {i}: {}\n", serde_json::Value::String(c.clone())))
        .collect();
    format!("path: .\ntrain: images\nval: images\nnames:\n{names}")
}

/// An image's YOLO label file: one line per box, the centre and size as
/// fractions of the image.
fn yolo_label(boxes: &[sieve_shared::boxes::LabeledBox], (width, height): (u32, u32)) -> String {
    let (w, h) = (width.max(1) as f32, height.max(1) as f32);
    boxes
        .iter()
        .map(|b| {
            format!(
                "{} {:.6} {:.6} {:.6} {:.6}\n",
                b.class,
                (b.x_min + b.x_max) / 2.0 / w,
                (b.y_min + b.y_max) / 2.0 / h,
                b.width() / w,
                b.height() / h
            )
        })
        .collect()
}

/// The images of a page into their folders (a class's, or `images/` with
/// their label files beside): hard links on a local store (on a blocking
/// thread, the page at once), reads and writes otherwise. An image without
/// a label stays out (it is in the rows only).
async fn place(
    store: &Store,
    root: &Path,
    layout: &Layout,
    images: Vec<Image>,
) -> anyhow::Result<Placed> {
    let mut labels = Vec::new();
    let images: Vec<(Image, PathBuf)> = images
        .into_iter()
        .filter_map(|image| {
            let name = image.item_id.to_string();
            let stem = match layout {
                Layout::Classes(folders) => root.join(folders.get(image.class_index?)?).join(name),
                Layout::Yolo => {
                    let text = yolo_label(image.boxes.as_deref()?, image.size?);
                    labels.push((root.join("labels").join(format!("{name}.txt")), text));
                    root.join("images").join(name)
                }
                Layout::Blurred(_) => {
                    image.boxes.as_ref()?;
                    root.join(super::blur::delivered_name(image.item_id, &image.source))
                }
            };
            Some((image, stem))
        })
        .collect();
    for (path, text) in labels {
        tokio::fs::write(path, text).await?;
    }
    if images.is_empty() {
        return Ok(Placed::default());
    }
    if let Layout::Blurred(blur) = layout {
        return blur_all(store, *blur, images).await;
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

/// Each image read from the store, its boxes blurred, written at its
/// delivered name (decoding and blurring on a blocking thread).
async fn blur_all(
    store: &Store,
    blur: Blur,
    images: Vec<(Image, PathBuf)>,
) -> anyhow::Result<Placed> {
    let mut placed = Placed::default();
    for (image, path) in images {
        let bytes = store
            .get(&image.key)
            .await
            .with_context(|| format!("reading the image of item {}", image.item_id))?;
        let boxes = image.boxes.unwrap_or_default();
        let item = image.item_id;
        let format = super::blur::delivered_format(&image.source);
        let blurred =
            tokio::task::spawn_blocking(move || blur.apply_to_bytes(&bytes, &boxes, format))
                .await?
            .with_context(|| {
                format!("item {item}: its image does not decode, so it cannot be blurred; nothing was delivered")
            })?;
        tokio::fs::write(path, &blurred).await?;
        placed.copied += 1;
    }
    Ok(placed)
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
    fn yolo_lines_are_centre_and_size_as_fractions() {
        let b = sieve_shared::boxes::LabeledBox {
            class: 1,
            x_min: 10.0,
            y_min: 20.0,
            x_max: 30.0,
            y_max: 60.0,
        };
        assert_eq!(
            yolo_label(&[b, b], (100, 200)),
            "1 0.200000 0.200000 0.200000 0.200000\n".repeat(2)
        );
        assert_eq!(yolo_label(&[], (100, 200)), "");
        assert_eq!(
            yolo_data(&names(&["tree", "a \"b\""])),
            "path: .\ntrain: images\nval: images\nnames:\n  0: \"tree\"\n  1: \"a \\\"b\\\"\"\n"
        );
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
