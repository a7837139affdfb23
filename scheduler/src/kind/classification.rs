//! Classification: one class per image, from the project's class list.
//!
//! What the kind is, layer by layer:
//! - **label**: a class index into `Project::class_names`
//!   (`labels.class_index`), given as text by name (a reviewer may also
//!   type its number: [`parse_class`]; a manifest and a filter name it:
//!   [`class_by_name`]), shown by name ([`class_name`]);
//! - **prediction**: the committee's mean probabilities, each member's vote
//!   and the top class (`predictions.probabilities`, `member_votes`,
//!   `top_class`), scored by `sieve_shared::scores`;
//! - **routing evidence**: the top class and its confidence; a prediction
//!   is right when the label is its top class
//!   (`sieve_shared::messages::HoldoutEvaluation::is_correct`);
//! - **review view**: the model's proposal in class names ([`Proposal`]);
//! - **training example**: `SnapshotExample::class_index`;
//! - **export row**: the label's class name; in COCO one category per class.

use crate::error::{AppError, AppResult};
use crate::projects::Project;

/// The name of class `index` of `classes`, if it has one.
pub fn class_name(classes: &[String], index: i32) -> Option<&str> {
    classes
        .get(usize::try_from(index).ok()?)
        .map(String::as_str)
}

/// The index of the class named `name`, if `classes` has it.
pub fn class_by_name(classes: &[String], name: &str) -> Option<i32> {
    classes
        .iter()
        .position(|c| c == name)
        .and_then(|i| i32::try_from(i).ok())
}

/// A class of `project` given by name, or by number when no class has that
/// name (a class may be named "3": the name wins). The error names the
/// classes there are.
pub fn parse_class(project: &Project, text: &str) -> AppResult<i32> {
    if let Some(index) = class_by_name(&project.class_names, text) {
        return Ok(index);
    }
    match text.parse::<i32>() {
        Ok(index) if class_name(&project.class_names, index).is_some() => Ok(index),
        _ => Err(unknown_class(project, text)),
    }
}

/// 422 for a class `project` does not have, naming those it has.
pub fn unknown_class(project: &Project, text: &str) -> AppError {
    AppError::Invalid(format!(
        "unknown class {text:?}: {} has {}",
        project.name,
        project.class_names.join(", ")
    ))
}

/// What the model proposed for an item, in the project's class names: the
/// part of a review task that depends on the kind.
#[derive(Debug, Default, PartialEq)]
pub struct Proposal {
    pub predicted_class: Option<String>,
    pub probabilities: Option<Vec<f32>>,
    pub member_votes: Option<Vec<u32>>,
    pub confidence: Option<f32>,
}

impl Proposal {
    /// From a prediction's columns.
    pub fn from_columns(
        project: &Project,
        top_class: i32,
        probabilities: &serde_json::Value,
        member_votes: &serde_json::Value,
        confidence: f32,
    ) -> Self {
        Self {
            predicted_class: class_name(&project.class_names, top_class).map(str::to_owned),
            probabilities: serde_json::from_value(probabilities.clone()).ok(),
            member_votes: serde_json::from_value(member_votes.clone()).ok(),
            confidence: Some(confidence),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Vec<String> {
        ["boot", "3", "sandal"].map(String::from).to_vec()
    }

    #[test]
    fn classes_by_name_and_index_never_out_of_range() {
        let classes = classes();
        assert_eq!(class_name(&classes, 2), Some("sandal"));
        assert_eq!(class_name(&classes, 3), None);
        assert_eq!(class_name(&classes, -1), None);
        assert_eq!(class_by_name(&classes, "boot"), Some(0));
        assert_eq!(class_by_name(&classes, "Boot"), None);
    }
}
