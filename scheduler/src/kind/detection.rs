//! Detection: boxes around the objects in an image, each with a class from
//! the project's class list.
//!
//! What the kind is, layer by layer (what exists today):
//! - **label**: a list of boxes (`labels.boxes`, as
//!   `sieve_shared::boxes::LabeledBox` serializes: the class as an index,
//!   corners in pixels of the original image), possibly empty (nothing to
//!   box). Given and shown with class names ([`NamedBox`]); every box is
//!   checked against the image's stored size before it is written
//!   ([`parse`]);
//! - **prediction**: the detector committee's proposed objects and the
//!   image's box scores (`predictions.detections`, as
//!   `sieve_shared::box_scores::ImageScores` serializes), summarised into
//!   the scalar score columns (`ImageScores::as_scores`) that routing reads;
//! - **routing evidence**: per holdout image, whether the proposal was
//!   right as a whole (every box matched both ways at IoU 0.5) and how sure
//!   the committee was (`HoldoutEvaluation::correct`); a machine-accepted
//!   image's label is the proposal. Until a detector is active, images go
//!   to people (`seed` tasks, in random order);
//! - **training example**: `SnapshotExample::boxes`;
//! - **review view**: the item's newest boxes by people, else the active
//!   model's proposal, to start from;
//! - **export row**: COCO `bbox` annotations, YOLO text files, and the
//!   boxes as JSON in CSV and JSON Lines.

use serde::{Deserialize, Serialize};
use sieve_shared::boxes::{self, LabeledBox};

use crate::error::{AppError, AppResult};
use crate::kind::classification;
use crate::projects::Project;

/// A box as people and files give and read it: its class by name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NamedBox {
    /// One of the project's classes, by name.
    pub class: String,
    pub x_min: f32,
    pub y_min: f32,
    pub x_max: f32,
    pub y_max: f32,
}

/// The `labels.boxes` value of `boxes`.
pub fn to_json(boxes: &[LabeledBox]) -> serde_json::Value {
    serde_json::to_value(boxes).unwrap_or_else(|_| serde_json::Value::Array(Vec::new()))
}

/// Boxes as stored; `None` for a value no writer of sieve makes.
pub fn from_json(value: &serde_json::Value) -> Option<Vec<LabeledBox>> {
    serde_json::from_value(value.clone()).ok()
}

/// Boxes given with class names, checked against the project's classes and
/// the image's size: 422 naming the first bad box.
pub fn parse(
    project: &Project,
    named: &[NamedBox],
    width: u32,
    height: u32,
) -> AppResult<Vec<LabeledBox>> {
    let boxes = parse_named(&project.class_names, named).map_err(|problem| {
        AppError::Invalid(format!(
            "{problem}: {} has {}; nothing was written",
            project.name,
            project.class_names.join(", ")
        ))
    })?;
    boxes::check(&boxes, project.class_names.len(), width, height)
        .map_err(|problem| AppError::Invalid(format!("{problem}; nothing was written")))?;
    Ok(boxes)
}

/// Boxes with their classes by name, as indices into `classes`; the first
/// box of a class `classes` lacks is the error. The corners are not checked
/// here ([`parse`] does, against an image).
pub fn parse_named(classes: &[String], named: &[NamedBox]) -> Result<Vec<LabeledBox>, String> {
    named
        .iter()
        .enumerate()
        .map(|(n, b)| {
            let class = classification::class_by_name(classes, &b.class).ok_or_else(|| {
                format!("box {} of {} has class {:?}", n + 1, named.len(), b.class)
            })?;
            Ok(LabeledBox {
                class: class as u32,
                x_min: b.x_min,
                y_min: b.y_min,
                x_max: b.x_max,
                y_max: b.y_max,
            })
        })
        .collect()
}

pub fn named(classes: &[String], boxes: &[LabeledBox]) -> Vec<NamedBox> {
    boxes
        .iter()
        .map(|b| NamedBox {
            class: classification::class_name(classes, b.class as i32)
                .map_or_else(|| b.class.to_string(), str::to_owned),
            x_min: b.x_min,
            y_min: b.y_min,
            x_max: b.x_max,
            y_max: b.y_max,
        })
        .collect()
}
