//! The row formats: CSV with a header, and JSON Lines, with the same
//! columns under the same names. `key` and `label` are an ingest
//! manifest's columns, so an export can be ingested again.
//!
//! COCO is one JSON object written as it streams: `info` and `categories`
//! first, then `images` from a first pass over the rows and `annotations`
//! from a second (ids are the row's number in its pass, from 1, so an
//! image and its annotation share theirs; a category's id is the class
//! index + 1). A classification label is one annotation per labeled image
//! (sharing the image's id), with its `category_id` and the provenance
//! under `attributes`; a detection label is one annotation per box, with
//! its `bbox` (`[x, y, width, height]` in pixels) and `area`, numbered in
//! the order written, and the same provenance. JSON Lines carries a
//! detection label's boxes as `boxes` (class names, corners in pixels).

use std::io::Write as _;

use chrono::Utc;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use sieve_shared::boxes::LabeledBox;

use super::snapshot::Row;
use super::{Format, blur};
use crate::kind::detection::NamedBox;
use crate::operate::status::MeasuredAccuracy;
use crate::projects::Project;

/// The columns, in order.
pub const COLUMNS: [&str; 18] = [
    "item_id",
    "key",
    "source",
    "content_hash",
    "label",
    "label_source",
    "labeled_by",
    "labeled_by_token",
    "model_version",
    "confidence",
    "agreement",
    "audited",
    "machine_accuracy",
    "machine_accuracy_lower",
    "machine_accuracy_upper",
    "machine_audits",
    "state",
    "labeled_at",
];

/// One row, as written. `machine_*`: the audited accuracy of machine
/// labels of the row's class (Wilson interval at the policy's confidence
/// level), on machine-labeled rows only.
#[derive(Serialize)]
struct Record<'a> {
    item_id: Uuid,
    key: &'a str,
    source: &'a str,
    content_hash: &'a str,
    label: Option<&'a str>,
    label_source: Option<&'a str>,
    labeled_by: Option<&'a str>,
    labeled_by_token: Option<Uuid>,
    model_version: Option<i32>,
    confidence: Option<f32>,
    agreement: Option<f32>,
    audited: bool,
    machine_accuracy: Option<f64>,
    machine_accuracy_lower: Option<f64>,
    machine_accuracy_upper: Option<f64>,
    machine_audits: Option<i64>,
    state: &'a str,
    labeled_at: Option<String>,
    /// A detection label's boxes (JSON Lines only; a CSV export of a
    /// detection project is refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    boxes: Option<&'a [NamedBox]>,
}

/// A detection label's boxes, as stored (for COCO's category ids) and with
/// class names (for JSON Lines), in the same order.
#[derive(Clone, Copy)]
pub struct RowBoxes<'a> {
    pub stored: &'a [LabeledBox],
    pub named: &'a [NamedBox],
}

/// Where a row falls: the pass over the rows (COCO makes two), its number
/// in it (from 1), and how many entries the pass has written before it.
#[derive(Clone, Copy, Debug)]
pub struct Position {
    pub pass: u8,
    pub number: u64,
    pub entries: u64,
}

pub fn header(format: Format, project: &Project, out: &mut Vec<u8>) {
    match format {
        Format::Csv | Format::ImageFolder => {
            out.extend_from_slice(COLUMNS.join(",").as_bytes());
            out.push(b'\n');
        }
        Format::Jsonl | Format::Yolo => {}
        Format::Coco | Format::Blurred => {
            let categories: Vec<serde_json::Value> = project
                .class_names
                .iter()
                .enumerate()
                .map(|(i, name)| json!({ "id": i + 1, "name": name, "supercategory": "" }))
                .collect();
            let head = json!({
                "description": format!("sieve export of {}", project.name),
                "date_created": Utc::now().to_rfc3339(),
            });
            let _ = write!(
                out,
                "{{\"info\":{head},\"licenses\":[],\"categories\":{},\"images\":[",
                serde_json::Value::Array(categories)
            );
        }
    }
}

/// Between COCO's images and its annotations.
pub fn between_passes(format: Format, out: &mut Vec<u8>) {
    if format.is_coco() {
        out.extend_from_slice(b"],\"annotations\":[");
    }
}

pub fn footer(format: Format, out: &mut Vec<u8>) {
    if format.is_coco() {
        out.extend_from_slice(b"]}\n");
    }
}

/// Write `row`; how many entries it made (COCO's annotations skip
/// unlabeled rows, and a detection label makes one per box). `accuracy`:
/// `None` for a row whose label is not a machine label; `Some(None)` for a
/// machine label of a class never audited.
pub fn row(
    format: Format,
    at: Position,
    row: &Row,
    label: (Option<&str>, Option<RowBoxes<'_>>),
    accuracy: Option<Option<&MeasuredAccuracy>>,
    out: &mut Vec<u8>,
) -> u64 {
    let (class, boxes) = label;
    let measured = accuracy.flatten();
    let record = Record {
        item_id: row.item_id,
        key: &row.object_key,
        source: &row.source,
        content_hash: &row.content_hash,
        label: class,
        label_source: row.label_source.as_deref(),
        labeled_by: row.reviewer.as_deref(),
        labeled_by_token: row.reviewer_token,
        model_version: row.model_version,
        confidence: row.confidence,
        agreement: row.agreement,
        audited: row.audited,
        machine_accuracy: measured.map(|m| m.accuracy),
        machine_accuracy_lower: measured.map(|m| m.lower),
        machine_accuracy_upper: measured.map(|m| m.upper),
        machine_audits: accuracy.map(|m| m.map_or(0, |m| m.audited)),
        state: &row.state,
        labeled_at: row.labeled_at.map(|t| t.to_rfc3339()),
        boxes: boxes.map(|b| b.named),
    };
    match format {
        Format::Csv | Format::ImageFolder => {
            csv(&record, out);
            1
        }
        Format::Jsonl | Format::Yolo => {
            // Writing to a Vec fails only for a value serde cannot encode,
            // and a Record has none.
            if serde_json::to_writer(&mut *out, &record).is_ok() {
                out.push(b'\n');
            }
            1
        }
        Format::Coco | Format::Blurred => match (at.pass, boxes) {
            (0, _) | (_, None) => {
                // A delivery names its own image files; other COCO exports the stored one.
                let file_name = if format == Format::Blurred {
                    std::borrow::Cow::Owned(blur::delivered_name(row.item_id, &row.source))
                } else {
                    std::borrow::Cow::Borrowed(row.object_key.as_str())
                };
                u64::from(coco(at, row, &record, &file_name, out))
            }
            (_, Some(boxes)) => coco_boxes(at, boxes.stored, &record, out),
        },
    }
}

/// The provenance of a COCO annotation: the record without what the image
/// or the annotation already says.
fn attributes(record: &Record<'_>) -> serde_json::Value {
    let mut attributes = serde_json::to_value(record).unwrap_or_default();
    if let Some(map) = attributes.as_object_mut() {
        for key in ["item_id", "key", "content_hash", "label", "boxes"] {
            map.remove(key);
        }
    }
    attributes
}

/// One COCO annotation per box of a detection label (second pass), ids
/// running on from the entries already written.
fn coco_boxes(at: Position, boxes: &[LabeledBox], record: &Record<'_>, out: &mut Vec<u8>) -> u64 {
    let attributes = attributes(record);
    for (k, b) in boxes.iter().enumerate() {
        if at.entries + k as u64 > 0 {
            out.push(b',');
        }
        let value = json!({
            "id": at.entries + k as u64 + 1,
            "image_id": at.number,
            "category_id": b.class + 1,
            "bbox": [b.x_min, b.y_min, b.width(), b.height()],
            "area": b.width() * b.height(),
            "iscrowd": 0,
            "attributes": attributes,
        });
        let _ = serde_json::to_writer(&mut *out, &value);
    }
    boxes.len() as u64
}

/// One COCO image (first pass) or annotation (second pass; none for an
/// image without a label).
fn coco(at: Position, row: &Row, record: &Record<'_>, file_name: &str, out: &mut Vec<u8>) -> bool {
    let value = if at.pass == 0 {
        json!({
            "id": at.number,
            "file_name": file_name,
            "width": row.width,
            "height": row.height,
            "sieve_item_id": record.item_id,
            "content_hash": record.content_hash,
        })
    } else {
        let Some(class) = row.class_index else {
            return false;
        };
        let attributes = attributes(record);
        json!({
            "id": at.number,
            "image_id": at.number,
            "category_id": class + 1,
            "attributes": attributes,
        })
    };
    // Annotations skip unlabeled rows: a comma goes before every entry but
    // the first one written in the pass.
    if at.entries > 0 {
        out.push(b',');
    }
    let _ = serde_json::to_writer(&mut *out, &value);
    true
}

fn csv(r: &Record<'_>, out: &mut Vec<u8>) {
    fn text(out: &mut Vec<u8>, value: &str) {
        // RFC 4180: quote a field with a separator, a quote or a line end
        // (or surrounding spaces, which a reader may trim).
        if value.contains([',', '"', '\n', '\r']) || value.starts_with(' ') || value.ends_with(' ')
        {
            out.push(b'"');
            out.extend_from_slice(value.replace('"', "\"\"").as_bytes());
            out.push(b'"');
        } else {
            out.extend_from_slice(value.as_bytes());
        }
    }
    fn opt<T: std::fmt::Display>(out: &mut Vec<u8>, value: Option<T>) {
        if let Some(v) = value {
            let _ = write!(out, "{v}");
        }
    }
    let _ = write!(out, "{},", r.item_id);
    text(out, r.key);
    out.push(b',');
    text(out, r.source);
    out.push(b',');
    text(out, r.content_hash);
    out.push(b',');
    if let Some(label) = r.label {
        text(out, label);
    }
    out.push(b',');
    opt(out, r.label_source);
    out.push(b',');
    if let Some(who) = r.labeled_by {
        text(out, who);
    }
    out.push(b',');
    opt(out, r.labeled_by_token);
    out.push(b',');
    opt(out, r.model_version);
    out.push(b',');
    opt(out, r.confidence);
    out.push(b',');
    opt(out, r.agreement);
    out.push(b',');
    let _ = write!(out, "{},", r.audited);
    opt(out, r.machine_accuracy);
    out.push(b',');
    opt(out, r.machine_accuracy_lower);
    out.push(b',');
    opt(out, r.machine_accuracy_upper);
    out.push(b',');
    opt(out, r.machine_audits);
    out.push(b',');
    out.extend_from_slice(r.state.as_bytes());
    out.push(b',');
    opt(out, r.labeled_at.as_deref());
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Position = Position {
        pass: 0,
        number: 1,
        entries: 0,
    };

    fn sample() -> Row {
        Row {
            item_id: Uuid::nil(),
            source: "photos/a, \"b\".png".into(),
            object_key: "incoming/a.png".into(),
            content_hash: "ab".into(),
            state: "auto_labeled".into(),
            width: Some(28),
            height: Some(28),
            class_index: Some(1),
            boxes: None,
            label_source: Some("machine".into()),
            reviewer: None,
            labeled_at: None,
            reviewer_token: None,
            model_version: Some(3),
            confidence: Some(0.97),
            agreement: Some(1.0),
            audited: false,
        }
    }

    #[test]
    fn csv_rows_have_every_column_and_quote_what_needs_it() {
        let mut out = Vec::new();
        out.extend_from_slice(COLUMNS.join(",").as_bytes());
        out.push(b'\n');
        row(
            Format::Csv,
            FIRST,
            &sample(),
            (Some("boot"), None),
            Some(None),
            &mut out,
        );
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0].split(',').count(), COLUMNS.len());
        assert_eq!(
            lines[1],
            "00000000-0000-0000-0000-000000000000,incoming/a.png,\"photos/a, \"\"b\"\".png\",ab,boot,machine,,,3,0.97,1,false,,,,0,auto_labeled,"
        );
    }

    #[test]
    fn json_lines_use_the_same_names() {
        let mut out = Vec::new();
        row(
            Format::Jsonl,
            FIRST,
            &sample(),
            (Some("boot"), None),
            None,
            &mut out,
        );
        let value: serde_json::Value = serde_json::from_slice(&out).expect("json");
        let object = value.as_object().expect("object");
        assert_eq!(object.keys().count(), COLUMNS.len());
        for column in COLUMNS {
            assert!(object.contains_key(column), "{column}");
        }
        assert_eq!(value["label"], "boot");
        assert_eq!(value["machine_audits"], serde_json::Value::Null);
    }
}
