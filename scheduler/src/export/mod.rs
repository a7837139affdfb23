//! Export: a project's labeled dataset out, one row per item, with the
//! provenance that makes the labels usable — who or what gave each one
//! (a reviewer's token, a model version, an import), how sure the
//! prediction behind it was, whether the item was audited, and how accurate
//! audits measured machine labels of its class (Wilson interval).
//!
//! An export is one read-only REPEATABLE READ transaction
//! ([`snapshot`]): the rows, the measured accuracy and the counts of what
//! was left out are all of one instant. Rows come from a server-side cursor
//! a page at a time and are encoded a page at a time ([`write`]), so memory
//! stays flat whatever the project's size. The CLI writes the pages to a
//! temporary file renamed at the end ([`output`]); the API streams them as
//! the response body.
//!
//! By default only labeled items are exported (`auto_labeled`,
//! `human_labeled`); items in review, failed or not yet predicted are left
//! out and counted, and `state` asks for them.
//!
//! An exported CSV or JSON Lines file is an ingest manifest: its `key` and
//! `label` columns are what the manifest reader takes (the other columns
//! are ignored), so ingesting it into another project recreates the items
//! with their labels as `import` labels.

pub mod blur;
pub mod folder;
pub mod output;
pub mod snapshot;
pub mod write;

use std::fmt;

use chrono::{DateTime, Utc};
use sea_orm::{ActiveEnum, Iterable};
use serde::Serialize;

use crate::entities::item::ItemState;
use crate::entities::label::LabelSource;
use crate::error::{AppError, AppResult};
use crate::kind::classification;
use crate::projects::Project;

pub use snapshot::{Export, Summary};

/// What an export is written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Jsonl,
    /// COCO JSON: images, categories, one annotation per labeled image
    /// (its `category_id`, the provenance under `attributes`), or per box
    /// of a detection label (with its `bbox` and `area`).
    Coco,
    /// A directory: one folder per class holding its images, and the CSV
    /// beside them (`labels.csv`). Written by the CLI only ([`folder`]).
    ImageFolder,
    /// A directory in the layout YOLO trainers read: `images/`, one
    /// `labels/ITEM_ID.txt` per image (a line per box: class, centre,
    /// width and height, as fractions of the image), `classes.txt` and
    /// `data.yaml`, and the JSON Lines export beside them
    /// (`labels.jsonl`). Detection projects; written by the CLI only
    /// ([`folder`]).
    Yolo,
    /// A directory for delivery after de-identification: `images/` with
    /// every box of each image blurred ([`blur`]), the original bytes
    /// never, and the COCO export of the same rows beside them
    /// (`annotations.json`). Box projects, labeled items only; written by
    /// the CLI only ([`folder`]).
    Blurred,
}

impl Format {
    pub const NAMES: [&str; 6] = ["csv", "jsonl", "coco", "imagefolder", "yolo", "blurred"];

    pub fn parse(text: &str) -> AppResult<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "csv" => Ok(Self::Csv),
            "jsonl" | "ndjson" => Ok(Self::Jsonl),
            "coco" => Ok(Self::Coco),
            "imagefolder" => Ok(Self::ImageFolder),
            "yolo" => Ok(Self::Yolo),
            "blurred" => Ok(Self::Blurred),
            other => Err(AppError::Invalid(format!(
                "unknown export format {other:?}: use {}",
                Self::NAMES.join(", ")
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Jsonl => "jsonl",
            Self::Coco => "coco",
            Self::ImageFolder => "imagefolder",
            Self::Yolo => "yolo",
            Self::Blurred => "blurred",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Csv | Self::ImageFolder => "text/csv; charset=utf-8",
            Self::Jsonl | Self::Yolo => "application/x-ndjson",
            Self::Coco | Self::Blurred => "application/json",
        }
    }

    /// Whether a detection label's boxes can be written in this format
    /// (a CSV row and a class folder hold one class per image).
    pub fn carries_boxes(self) -> bool {
        matches!(self, Self::Jsonl | Self::Coco | Self::Yolo | Self::Blurred)
    }

    /// Whether this format is a directory of images (`sieve export --out
    /// DIR` only).
    pub fn is_folder(self) -> bool {
        matches!(self, Self::ImageFolder | Self::Yolo | Self::Blurred)
    }

    /// Whether the rows are a COCO document (two passes over them: images,
    /// then annotations).
    pub fn is_coco(self) -> bool {
        matches!(self, Self::Coco | Self::Blurred)
    }

    /// The file name extension of an export in this format.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Csv | Self::ImageFolder => "csv",
            Self::Jsonl | Self::Yolo => "jsonl",
            Self::Coco | Self::Blurred => "json",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an incremental export starts: the labels given from this instant
/// on. Printed by an export for the next one; opaque to its users.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor(DateTime<Utc>);

impl Cursor {
    pub fn new(at: DateTime<Utc>) -> Self {
        Self(at)
    }

    pub fn at(self) -> DateTime<Utc> {
        self.0
    }

    pub fn parse(text: &str) -> AppResult<Self> {
        text.trim()
            .strip_prefix("v1.")
            .and_then(|micros| micros.parse::<i64>().ok())
            .and_then(DateTime::from_timestamp_micros)
            .map(Self)
            .ok_or_else(|| {
                AppError::Invalid(format!(
                    "{text:?} is not an export cursor (pass the `since` an earlier export printed, like v1.1764000000000000)"
                ))
            })
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v1.{}", self.0.timestamp_micros())
    }
}

/// Which items an export takes. Empty lists take everything (`states`:
/// the labeled states, [`DEFAULT_STATES`]).
#[derive(Clone, Debug, Default)]
pub struct Filters {
    /// The current label's source.
    pub sources: Vec<LabelSource>,
    pub states: Vec<ItemState>,
    /// The prediction behind the label at least this confident (a label
    /// without one, an import, is left out).
    pub min_confidence: Option<f32>,
    /// Class names, checked against the project's by [`Filters::classes`].
    pub classes: Vec<String>,
    pub since: Option<Cursor>,
}

/// The states exported unless others are asked for: the items with a label.
pub const DEFAULT_STATES: [ItemState; 2] = [ItemState::AutoLabeled, ItemState::HumanLabeled];

/// One name of `E`'s (a sea-orm string enum), or a 422 naming them all.
fn parse_name<E>(what: &str, text: &str) -> AppResult<E>
where
    E: ActiveEnum<Value = String> + Iterable,
{
    let text = text.trim();
    E::iter().find(|e| e.to_value() == text).ok_or_else(|| {
        let names: Vec<String> = E::iter().map(|e| e.to_value()).collect();
        AppError::Invalid(format!("unknown {what} {text:?}: use {}", names.join(", ")))
    })
}

/// `a,b` and repeated values alike.
fn each(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|v| !v.is_empty())
}

impl Filters {
    pub fn add_source(&mut self, text: &str) -> AppResult<()> {
        for name in each(text) {
            self.sources.push(parse_name("label source", name)?);
        }
        Ok(())
    }

    pub fn add_state(&mut self, text: &str) -> AppResult<()> {
        for name in each(text) {
            self.states.push(parse_name("item state", name)?);
        }
        Ok(())
    }

    pub fn add_class(&mut self, text: &str) {
        self.classes.extend(each(text).map(str::to_owned));
    }

    pub fn set_min_confidence(&mut self, text: &str) -> AppResult<()> {
        match text.trim().parse::<f32>() {
            Ok(x) if (0.0..=1.0).contains(&x) => {
                self.min_confidence = Some(x);
                Ok(())
            }
            _ => Err(AppError::Invalid(format!(
                "min_confidence {text:?} is not a number from 0 to 1"
            ))),
        }
    }

    pub fn set_since(&mut self, text: &str) -> AppResult<()> {
        self.since = Some(Cursor::parse(text)?);
        Ok(())
    }

    /// The states to export.
    pub fn states(&self) -> Vec<ItemState> {
        if self.states.is_empty() {
            DEFAULT_STATES.to_vec()
        } else {
            self.states.clone()
        }
    }

    /// The class filter as indices into `project`'s classes, or a 422
    /// naming the classes it has.
    pub fn classes(&self, project: &Project) -> AppResult<Vec<i32>> {
        self.classes
            .iter()
            .map(|name| {
                classification::class_by_name(&project.class_names, name)
                    .ok_or_else(|| classification::unknown_class(project, name))
            })
            .collect()
    }
}

/// What to export, and how.
#[derive(Clone, Debug)]
pub struct Request {
    pub format: Format,
    pub filters: Filters,
}

impl Request {
    /// The query parameters of `GET /projects/{p}/export`.
    pub const PARAMETERS: [&str; 6] = [
        "format",
        "source",
        "state",
        "min_confidence",
        "class",
        "since",
    ];

    /// From query parameters: `format` (default csv), and the filters,
    /// repeated or comma-separated. An unknown one is a 422 naming those
    /// there are.
    pub fn from_query(pairs: &[(String, String)]) -> AppResult<Self> {
        let mut format = Format::Csv;
        let mut filters = Filters::default();
        for (name, value) in pairs {
            match name.as_str() {
                "format" => format = Format::parse(value)?,
                "source" => filters.add_source(value)?,
                "state" => filters.add_state(value)?,
                "min_confidence" => filters.set_min_confidence(value)?,
                "class" => filters.add_class(value),
                "since" => filters.set_since(value)?,
                other => {
                    return Err(AppError::Invalid(format!(
                        "unknown export parameter {other:?}: use {}",
                        Self::PARAMETERS.join(", ")
                    )));
                }
            }
        }
        Ok(Self { format, filters })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(text: &str) -> AppResult<Request> {
        let pairs: Vec<(String, String)> = text
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Request::from_query(&pairs)
    }

    fn message(result: AppResult<Request>) -> String {
        match result {
            Err(AppError::Invalid(message)) => message,
            Err(other) => panic!("not a 422: {other}"),
            Ok(request) => panic!("accepted: {request:?}"),
        }
    }

    #[test]
    fn parses_filters_repeated_or_comma_separated() {
        let request =
            query("format=jsonl&source=human,import&source=machine&state=in_review&min_confidence=0.9&class=boot&since=v1.1000")
                .expect("valid");
        assert_eq!(request.format, Format::Jsonl);
        assert_eq!(
            request.filters.sources,
            [
                LabelSource::Human,
                LabelSource::Import,
                LabelSource::Machine
            ]
        );
        assert_eq!(request.filters.states(), [ItemState::InReview]);
        assert_eq!(request.filters.min_confidence, Some(0.9));
        assert_eq!(request.filters.classes, ["boot"]);
        assert_eq!(
            request.filters.since.map(|c| c.to_string()).as_deref(),
            Some("v1.1000")
        );
        assert_eq!(
            query("").expect("defaults").filters.states(),
            DEFAULT_STATES
        );
    }

    #[test]
    fn bad_input_names_what_is_allowed() {
        let m = message(query("format=xml"));
        assert!(
            m.contains("xml") && m.contains("csv") && m.contains("jsonl"),
            "{m}"
        );
        let m = message(query("source=robot"));
        assert!(m.contains("human, machine, import"), "{m}");
        let m = message(query("state=lost"));
        assert!(m.contains("in_review") && m.contains("auto_labeled"), "{m}");
        let m = message(query("colour=red"));
        assert!(m.contains("colour") && m.contains("min_confidence"), "{m}");
        assert!(message(query("min_confidence=2")).contains("0 to 1"));
        assert!(message(query("since=yesterday")).contains("cursor"));
    }

    #[test]
    fn cursor_round_trips() {
        let cursor =
            Cursor::new(DateTime::from_timestamp_micros(1_764_000_000_123_456).expect("in range"));
        assert_eq!(Cursor::parse(&cursor.to_string()).expect("parses"), cursor);
    }
}
