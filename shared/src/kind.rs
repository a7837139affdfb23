//! Task kinds: what a project asks of people and models about each image.
//!
//! Three kinds: `classification` (one class per image, from the project's
//! list), `detection` (a set of boxes per image, each with a class from
//! the list; see [`crate::boxes`]) and `deidentify` (boxes too, around
//! faces and plates, found recall-first by a pretrained face detector, and
//! delivered as blurred images). The kind is stored per project (`projects.task_kind`)
//! and read into the scheduler's `Project`; each layer keeps what a kind
//! is in one module per kind (`docs/architecture.md`, "Where a task kind
//! lives"): the scheduler's `kind/`, the worker's `model/`, the scores in
//! [`crate::scores`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// One class per image, from the project's class list.
    #[default]
    Classification,
    /// Boxes around the objects in each image, each with a class from the
    /// project's class list.
    Detection,
    /// Boxes around what must not be recognisable (faces, by default
    /// plates too), proposed by a pretrained face detector; a miss is a
    /// privacy leak, so routing is recall-first, and the delivery is the
    /// images with every box blurred.
    Deidentify,
}

impl TaskKind {
    pub const ALL: [TaskKind; 3] = [
        TaskKind::Classification,
        TaskKind::Detection,
        TaskKind::Deidentify,
    ];

    /// The name stored in `projects.task_kind` and used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Classification => "classification",
            TaskKind::Detection => "detection",
            TaskKind::Deidentify => "deidentify",
        }
    }

    /// Whether a label of this kind is a set of boxes (`labels.boxes`)
    /// rather than a class (`labels.class_index`).
    pub fn draws_boxes(self) -> bool {
        match self {
            TaskKind::Classification => false,
            TaskKind::Detection | TaskKind::Deidentify => true,
        }
    }

    /// The classes a project of this kind gets when none are named.
    pub fn default_classes(self) -> &'static [&'static str] {
        match self {
            TaskKind::Deidentify => &["face", "plate"],
            TaskKind::Classification | TaskKind::Detection => &[],
        }
    }
}

impl TaskKind {
    /// Whether a project of this kind starts with a model, queued when it
    /// is created. A classification committee can, untrained (it orders
    /// the seed set; the first labels come from its random-order review);
    /// a de-identification project's face detector is pretrained and
    /// proposes faces from the first image; an untrained detector finds
    /// nothing, so a detection project's images go straight to people
    /// (`seed` review tasks) until a detector has trained on their boxes.
    pub fn starts_with_a_model(self) -> bool {
        match self {
            TaskKind::Classification | TaskKind::Deidentify => true,
            TaskKind::Detection => false,
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskKind {
    type Err = String;

    /// A kind by name; the error names the kinds there are.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text.trim())
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown task kind {text:?}: sieve has {}", known.join(", "))
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_reads_back_from_its_name_and_an_unknown_one_names_the_known() {
        for kind in TaskKind::ALL {
            assert_eq!(kind.as_str().parse::<TaskKind>(), Ok(kind));
            assert_eq!(
                serde_json::to_value(kind).ok(),
                Some(serde_json::json!(kind.as_str()))
            );
        }
        assert_eq!(" detection ".parse::<TaskKind>(), Ok(TaskKind::Detection));
        let err = "boxes".parse::<TaskKind>().unwrap_err();
        assert!(
            err.contains("\"boxes\"") && err.contains("classification"),
            "{err}"
        );
    }
}
