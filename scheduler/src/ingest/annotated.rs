//! Box annotation files into a detection project (`sieve ingest PROJECT
//! --annotations FILE`): each image the file names is ingested with its
//! boxes as an `import` label.
//!
//! The file is read whole ([`super::annotations`] parses Pascal VOC, CSV
//! and COCO) and every box checked before anything is written: a class the
//! project lacks, a box of zero size or outside its image (against the
//! size the file states, or the image's own header where it states none),
//! an image that cannot be found. Any such problem refuses the whole file,
//! with every problem listed by line (or COCO entry), so nothing is half
//! imported. The images then go through the manifest path: read, hash,
//! stored, inserted with their label, each box checked once more against
//! the image as read.

use std::path::Path;

use sieve_shared::boxes::LabeledBox;

use super::annotations::{self, AnnotatedImage};
use super::manifest::{Row, Target};
use super::{Checked, Root};
use crate::kind::{LabelValue, classification};
use crate::projects::Project;

/// Problems listed in a refusal; the count covers them all.
const LISTED_PROBLEMS: usize = 50;

/// The rows of an annotation file, every box checked; or why nothing may
/// be imported.
pub(super) fn prepare(path: &Path, root: &Root, project: &Project) -> anyhow::Result<Vec<Row>> {
    let images = match annotations::read(path) {
        Ok((_, images)) => images,
        Err(errors) => {
            let problems: Vec<String> = errors.iter().map(ToString::to_string).collect();
            return Err(refusal(path, &problems));
        }
    };
    let mut problems = Vec::new();
    let mut rows = Vec::with_capacity(images.len());
    for (n, image) in images.into_iter().enumerate() {
        match row(root, project, n, image) {
            Ok(row) => rows.push(row),
            Err(mut found) => problems.append(&mut found),
        }
    }
    if !problems.is_empty() {
        return Err(refusal(path, &problems));
    }
    Ok(rows)
}

fn refusal(path: &Path, problems: &[String]) -> anyhow::Error {
    let listed: Vec<&str> = problems
        .iter()
        .take(LISTED_PROBLEMS)
        .map(String::as_str)
        .collect();
    let more = problems.len().saturating_sub(LISTED_PROBLEMS);
    let tail = if more > 0 {
        format!("\n  … and {more} more")
    } else {
        String::new()
    };
    anyhow::anyhow!(
        "{}: {} problem(s); nothing was imported:\n  {}{tail}",
        path.display(),
        problems.len(),
        listed.join("\n  ")
    )
}

/// One image of the file as a row, its boxes checked; every problem found
/// (each named by the file it is in: a VOC folder has one per image).
fn row(
    root: &Root,
    project: &Project,
    ordinal: usize,
    image: AnnotatedImage,
) -> Result<Row, Vec<String>> {
    let file = image.file.display().to_string();
    let at = |where_: &dyn std::fmt::Display, what: String| format!("{file}, {where_}: {what}");
    let real = root
        .resolve(Path::new(&image.path))
        .map_err(|reason| vec![at(&image.at, format!("image {}: {reason}", image.path))])?;
    let (width, height) = match image.size {
        Some(size) => size,
        None => image::image_dimensions(&real).map_err(|e| {
            vec![at(
                &image.at,
                format!("image {}: cannot read its size: {e}", image.path),
            )]
        })?,
    };
    let mut problems = Vec::new();
    let mut boxes = Vec::with_capacity(image.boxes.len());
    for b in &image.boxes {
        let Some(class) = classification::class_by_name(&project.class_names, &b.label) else {
            problems.push(at(
                &b.at,
                format!(
                    "class {:?} is not one of {}'s classes ({})",
                    b.label,
                    project.name,
                    project.class_names.join(", ")
                ),
            ));
            continue;
        };
        if let Err(problem) = annotations::check_box(b, width, height) {
            problems.push(at(&b.at, problem));
            continue;
        }
        boxes.push(LabeledBox {
            class: class as u32,
            x_min: b.x_min as f32,
            y_min: b.y_min as f32,
            x_max: b.x_max as f32,
            y_max: b.y_max as f32,
        });
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Row {
        line: image.at.line().unwrap_or(ordinal as u64 + 1),
        target: Target::Path(image.path),
        label: None,
        external_id: None,
        boxes: Some(boxes),
    })
}

/// An image read with its boxes: the label to import, or, where a box does
/// not fit the image as read, no item at all (never an item without the
/// boxes it came with).
pub(super) fn with_boxes(
    checked: Checked,
    boxes: Vec<LabeledBox>,
    classes: usize,
) -> (Checked, Option<LabelValue>) {
    match checked {
        Checked::Image { width, height, .. } => {
            match sieve_shared::boxes::check(&boxes, classes, width, height) {
                Ok(()) => (checked, Some(LabelValue::Boxes(boxes))),
                Err(problem) => (
                    Checked::Unreadable {
                        reason: format!("{problem}; the image is not ingested without its boxes"),
                    },
                    None,
                ),
            }
        }
        other => (other, None),
    }
}
