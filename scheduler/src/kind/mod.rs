//! The task-kind axis of the scheduler: what a kind's label, prediction,
//! routing evidence, review view, training example and export row are, in
//! one module per kind. The stages (`ingest`, `routing`, `review`,
//! `training`, `export`, `items`) call the kind's module for anything that
//! depends on what a label is, and keep the rest (leases, snapshots,
//! pagination, transactions) kind-neutral.
//!
//! A project's kind is [`TaskKind`], read from `projects.task_kind` into
//! [`crate::projects::Project::task_kind`]. A stage that differs by kind
//! matches on it (the compiler lists those places when a kind is added);
//! what a label of either kind holds is a [`LabelValue`].

pub mod classification;
pub mod detection;

use sieve_shared::boxes::LabeledBox;
pub use sieve_shared::kind::TaskKind;

use crate::error::AppError;
use crate::projects::Project;

/// A label's payload, whatever the kind: what `labels` stores in
/// `class_index` (classification) or `boxes` (detection).
#[derive(Clone, Debug, PartialEq)]
pub enum LabelValue {
    Class(i32),
    Boxes(Vec<LabeledBox>),
}

impl LabelValue {
    /// The `labels.class_index` column.
    pub fn class_index(&self) -> Option<i32> {
        match self {
            LabelValue::Class(index) => Some(*index),
            LabelValue::Boxes(_) => None,
        }
    }

    /// The `labels.boxes` column.
    pub fn boxes_json(&self) -> Option<serde_json::Value> {
        match self {
            LabelValue::Class(_) => None,
            LabelValue::Boxes(boxes) => Some(detection::to_json(boxes)),
        }
    }
}

/// 422 for a label of the wrong kind sent to `project`, naming both.
pub fn wrong_kind(project: &Project, sent: TaskKind, what: &str) -> AppError {
    AppError::Invalid(format!(
        "project {} is a {} project; {what} is a {sent} label; nothing was written",
        project.name, project.task_kind
    ))
}
