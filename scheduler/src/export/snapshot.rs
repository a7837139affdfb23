//! One export as one snapshot: a read-only REPEATABLE READ transaction
//! that reads the counts, the measured accuracy and then every row through a
//! server-side cursor, a page at a time.
//!
//! The item's label is its newest human or import label, else its newest
//! machine label (the newest human label wins, as everywhere in sieve). The
//! "prediction behind it" is the label's own prediction: the one a machine
//! label was made from, or the one the reviewer was shown.
//!
//! The cursor an export prints is the snapshot's start, set back to the
//! oldest transaction still writing then and by [`CURSOR_MARGIN`]: a
//! label's time is taken by the process that writes it, a moment before its
//! transaction begins, so a label committed after this snapshot may carry
//! an earlier time. An incremental export (`since`) takes the items whose
//! label is at least that new: it may repeat a few rows of the export
//! before (the same item ids; keep the newest), and never misses one.

use std::collections::BTreeMap;

use chrono::{DateTime, FixedOffset, TimeDelta, Utc};
use sea_orm::{
    AccessMode, ConnectionTrait, DatabaseConnection, DatabaseTransaction, FromQueryResult,
    IsolationLevel, Statement, TransactionTrait, Value,
};
use serde::Serialize;
use uuid::Uuid;

use super::{Cursor, Format, Request, write};
use crate::entities::item::ItemState;
use crate::error::{AppError, AppResult};
use crate::kind::{classification, detection};
use crate::operate::status::{MeasuredAccuracy, measured_accuracy_on};
use crate::projects::Project;
use sea_orm::ActiveEnum;

/// How far an export's cursor is set back from its snapshot (see the
/// module's comment).
pub const CURSOR_MARGIN: TimeDelta = TimeDelta::seconds(60);

/// Rows fetched from the server-side cursor at once: the export's memory.
const PAGE_ROWS: u32 = 1000;

/// The snapshot's instant, for the cursor: when this transaction began, or
/// when the oldest transaction then writing began (its labels are not in
/// this snapshot), less the margin. Other roles' sessions show no
/// `xact_start` without `pg_read_all_stats`; the margin covers those.
const CURSOR_AT: &str = r#"
SELECT LEAST(now(), (SELECT min(xact_start) FROM pg_stat_activity
                     WHERE datname = current_database() AND backend_xid IS NOT NULL
                       AND pid <> pg_backend_pid())) AS at
"#;

const STATE_COUNTS: &str =
    "SELECT state AS key, count(*) AS n FROM items WHERE project_id = $1 GROUP BY state";

/// Every exported row, in item id order. Each item's current label is
/// picked for all items at once (`DISTINCT ON` over the project's labels,
/// sorted once and merged with the items), not looked up item by item: a
/// lookup per item (a `LATERAL … LIMIT 1` on the labels index) made
/// PostgreSQL's part of a million-row export 1.6 times as long
/// (docs/benchmarks.md, Export). `$1` project, `$2` states, `$3`
/// label sources (NULL: any), `$4` minimum confidence, `$5` class indices,
/// `$6` labels from (lists as comma-separated text). Public for `sieve-tools bench
/// export`, whose `COPY` baseline runs this same query.
pub const ROWS: &str = r#"
SELECT i.id AS item_id, i.source, i.object_key, i.content_hash, i.state, i.width, i.height,
       l.class_index, l.boxes, l.source AS label_source, l.reviewer, l.created_at AS labeled_at,
       t.lease_holder_token AS reviewer_token, mv.version AS model_version,
       p.confidence, (1 - p.disagreement)::real AS agreement,
       i.id IN (SELECT a.item_id FROM review_tasks a
                WHERE a.project_id = $1 AND a.reason = 'audit' AND a.state = 'done') AS audited
FROM items i
LEFT JOIN (
    SELECT DISTINCT ON (lb.item_id) lb.item_id, lb.class_index, lb.boxes, lb.source, lb.reviewer,
           lb.created_at, lb.prediction_id, lb.model_version_id, lb.review_task_id
    FROM labels lb JOIN items li ON li.id = lb.item_id
    WHERE li.project_id = $1
    ORDER BY lb.item_id, lb.source = 'machine', lb.created_at DESC, lb.id DESC
) l ON l.item_id = i.id
LEFT JOIN predictions p ON p.id = l.prediction_id
LEFT JOIN model_versions mv ON mv.id = COALESCE(l.model_version_id, p.model_version_id)
LEFT JOIN review_tasks t ON t.id = l.review_task_id
WHERE i.project_id = $1
  AND i.state = ANY (string_to_array($2, ','))
  AND ($3::text IS NULL OR l.source = ANY (string_to_array($3, ',')))
  AND ($4::real IS NULL OR p.confidence >= $4::real)
  AND ($5::text IS NULL OR l.class_index = ANY (string_to_array($5, ',')::int[]))
  AND ($6::timestamptz IS NULL OR l.created_at >= $6::timestamptz)
ORDER BY i.id
"#;

/// One item as the query returns it.
#[derive(Debug, FromQueryResult)]
pub struct Row {
    pub item_id: Uuid,
    pub source: String,
    pub object_key: String,
    pub content_hash: String,
    pub state: String,
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub class_index: Option<i32>,
    pub boxes: Option<serde_json::Value>,
    pub label_source: Option<String>,
    pub reviewer: Option<String>,
    pub labeled_at: Option<DateTime<FixedOffset>>,
    pub reviewer_token: Option<Uuid>,
    pub model_version: Option<i32>,
    pub confidence: Option<f32>,
    pub agreement: Option<f32>,
    pub audited: bool,
}

#[derive(FromQueryResult)]
struct At {
    at: DateTime<FixedOffset>,
}

#[derive(FromQueryResult)]
struct Count {
    key: String,
    n: i64,
}

/// What an export took and left, for the person or script that ran it.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub project: String,
    pub format: Format,
    /// Rows written so far; all of them once the export has ended.
    pub rows: u64,
    /// Items in the states asked for: the most rows there can be.
    pub expected: u64,
    /// Items left out for their state, by state (only states with any).
    pub left_out: BTreeMap<String, u64>,
    /// Pass as `since` next time for the labels given after this export.
    pub cursor: String,
    /// Whether this export took only labels since a cursor.
    pub incremental: bool,
}

impl Summary {
    /// `in_review=3,failed=1`, or empty.
    pub fn left_out_header(&self) -> String {
        self.left_out
            .iter()
            .map(|(state, n)| format!("{state}={n}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// What a person reads at the end, one line each: what was written,
    /// what was left out and why, and the cursor for next time.
    pub fn describe(&self, to: &str) -> Vec<String> {
        let mut lines = Vec::new();
        if self.rows == 0 {
            let why = if self.expected == 0 {
                format!("nothing labeled in {} yet", self.project)
            } else {
                "no item matched the filters".to_owned()
            };
            lines.push(format!(
                "{why}: wrote an empty {} export to {to} (valid, with no rows)",
                self.format
            ));
        } else {
            lines.push(format!(
                "exported {} item(s) of {} as {} to {to}",
                self.rows, self.project, self.format
            ));
        }
        if !self.left_out.is_empty() {
            let reasons: Vec<String> = self
                .left_out
                .iter()
                .map(|(state, n)| format!("{n} {}", why_left_out(state)))
                .collect();
            lines.push(format!(
                "left out: {} (--state names the states to export)",
                reasons.join(", ")
            ));
        }
        lines.push(format!(
            "next incremental export: --since {}{}",
            self.cursor,
            if self.incremental {
                ""
            } else {
                " (the labels given from now on)"
            }
        ));
        lines
    }
}

fn why_left_out(state: &str) -> String {
    match state {
        "in_review" => "in review (no label until a reviewer gives one)".into(),
        "failed" => "failed (the image could not be read or predicted)".into(),
        "queued" => "queued (not predicted yet)".into(),
        "auto_labeled" => "labeled by machine (not in --state)".into(),
        "human_labeled" => "labeled by people (not in --state)".into(),
        other => other.into(),
    }
}

/// An export under way: its transaction, cursor and counts.
pub struct Export {
    /// `None` once every row has been read and the transaction ended.
    txn: Option<DatabaseTransaction>,
    project: Project,
    format: Format,
    /// Measured machine-label accuracy, by class index.
    accuracy: Vec<Option<MeasuredAccuracy>>,
    summary: Summary,
    /// Whether the format's header has gone out.
    header_sent: bool,
    /// The cursor's declaration: a format written in two passes (COCO:
    /// images, then annotations) declares it again, in the same snapshot.
    declare: Statement,
    /// The pass over the rows (0, then 1 for COCO's annotations) and the
    /// rows written in it (COCO's ids count them, from 1).
    pass: u8,
    written: u64,
    entries: u64,
    /// The images of the rows written since [`Export::take_images`] last
    /// took them (an image folder's only).
    images: Vec<Image>,
}

/// An exported item's image, for an image folder: where it is stored and
/// the class folder it goes to (`None`: no label, the CSV alone names it).
#[derive(Clone, Debug)]
pub struct Image {
    pub item_id: Uuid,
    pub key: String,
    /// Where the item came from (its path or URL at ingest).
    pub source: String,
    pub class_index: Option<usize>,
    /// A detection label's boxes, and the image's size they lie in.
    pub boxes: Option<Vec<sieve_shared::boxes::LabeledBox>>,
    pub size: Option<(u32, u32)>,
}

impl Export {
    /// Check the request against `project`, open the snapshot, count and
    /// open the cursor. A bad request (an unknown class) fails here, before
    /// anything is written.
    pub async fn begin(
        db: &DatabaseConnection,
        project: &Project,
        request: Request,
    ) -> AppResult<Self> {
        let Request { format, filters } = request;
        if project.task_kind.draws_boxes() && !format.carries_boxes() {
            return Err(AppError::Invalid(format!(
                "project {} is a {} project: its boxes are exported as coco, yolo, jsonl or blurred, not {}",
                project.name,
                project.task_kind,
                format.name()
            )));
        }
        if format == Format::Blurred {
            if !project.task_kind.draws_boxes() {
                return Err(AppError::Invalid(format!(
                    "project {} is a {} project: a blurred export blurs boxes, and it has none",
                    project.name, project.task_kind
                )));
            }
            // Delivery: only what a person confirmed or the policy accepted.
            if let Some(state) = filters
                .states()
                .iter()
                .find(|s| !super::DEFAULT_STATES.contains(s))
            {
                return Err(AppError::Invalid(format!(
                    "a blurred export delivers labeled items only (auto_labeled, human_labeled), \
                     not {}: an item still in review may hold a face nobody has boxed yet",
                    state.to_value()
                )));
            }
        }
        let classes = filters.classes(project)?;
        let states = filters.states();
        let txn = db
            .begin_with_config(
                Some(IsolationLevel::RepeatableRead),
                Some(AccessMode::ReadOnly),
            )
            .await?;
        let backend = txn.get_database_backend();
        // The snapshot is taken by this first statement.
        let at = At::find_by_statement(Statement::from_string(backend, CURSOR_AT))
            .one(&txn)
            .await?
            .map(|a| a.at.with_timezone(&Utc))
            .unwrap_or_else(Utc::now);
        let cursor = Cursor::new(at - CURSOR_MARGIN);

        let counts = Count::find_by_statement(Statement::from_sql_and_values(
            backend,
            STATE_COUNTS,
            [project.id.as_uuid().into()],
        ))
        .all(&txn)
        .await?;
        let mut expected = 0;
        let mut left_out = BTreeMap::new();
        for Count { key, n } in counts {
            if states.iter().any(|s| s.to_value() == key) {
                expected += n as u64;
            } else if n > 0 {
                left_out.insert(key, n as u64);
            }
        }

        let mut accuracy = vec![None; project.class_names.len()];
        for measured in measured_accuracy_on(&txn, project).await? {
            let index = measured
                .class
                .as_ref()
                .and_then(|name| classification::class_by_name(&project.class_names, name))
                .and_then(|i| usize::try_from(i).ok());
            if let Some(i) = index {
                accuracy[i] = Some(measured);
            }
        }

        let list = |values: Vec<String>| (!values.is_empty()).then(|| values.join(","));
        let values: Vec<Value> = vec![
            project.id.as_uuid().into(),
            states
                .iter()
                .map(ItemState::to_value)
                .collect::<Vec<_>>()
                .join(",")
                .into(),
            list(filters.sources.iter().map(|s| s.to_value()).collect()).into(),
            filters.min_confidence.into(),
            list(classes.iter().map(i32::to_string).collect()).into(),
            filters.since.map(Cursor::at).into(),
        ];
        let declare = Statement::from_sql_and_values(
            backend,
            format!("DECLARE export_rows NO SCROLL CURSOR FOR {ROWS}"),
            values,
        );
        txn.execute_raw(declare.clone()).await?;

        Ok(Self {
            txn: Some(txn),
            project: project.clone(),
            format,
            accuracy,
            summary: Summary {
                project: project.name.clone(),
                format,
                rows: 0,
                expected,
                left_out,
                cursor: cursor.to_string(),
                incremental: filters.since.is_some(),
            },
            header_sent: false,
            declare,
            pass: 0,
            written: 0,
            entries: 0,
            images: Vec::new(),
        })
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    pub fn project(&self) -> &Project {
        &self.project
    }

    /// The images of the rows in the chunks returned since the last call
    /// (an image folder's; empty for the other formats).
    pub fn take_images(&mut self) -> Vec<Image> {
        std::mem::take(&mut self.images)
    }

    /// The next piece of the file: the header, then a page of rows at a
    /// time; `None` at the end, when the snapshot has been closed.
    pub async fn next_chunk(&mut self) -> AppResult<Option<Vec<u8>>> {
        let Some(txn) = self.txn.as_ref() else {
            return Ok(None);
        };
        let mut out = Vec::new();
        if !self.header_sent {
            self.header_sent = true;
            write::header(self.format, &self.project, &mut out);
            if !out.is_empty() {
                return Ok(Some(out));
            }
        }
        let rows = Row::find_by_statement(Statement::from_string(
            txn.get_database_backend(),
            format!("FETCH {PAGE_ROWS} FROM export_rows"),
        ))
        .all(txn)
        .await?;
        if rows.is_empty() && self.format.is_coco() && self.pass == 0 {
            // The same rows again, from the same snapshot.
            txn.execute_raw(Statement::from_string(
                txn.get_database_backend(),
                "CLOSE export_rows",
            ))
            .await?;
            txn.execute_raw(self.declare.clone()).await?;
            self.pass = 1;
            self.written = 0;
            self.entries = 0;
            write::between_passes(self.format, &mut out);
            return Ok(Some(out));
        }
        if rows.is_empty() {
            if let Some(txn) = self.txn.take() {
                // Read-only: ending it releases the cursor and the snapshot.
                txn.commit().await?;
            }
            write::footer(self.format, &mut out);
            return Ok((!out.is_empty()).then_some(out));
        }
        out.reserve(rows.len() * 256);
        for row in &rows {
            let class = row
                .class_index
                .and_then(|c| classification::class_name(&self.project.class_names, c));
            let accuracy = match (row.label_source.as_deref(), row.class_index) {
                (Some("machine"), Some(c)) => {
                    Some(self.accuracy.get(c as usize).and_then(Option::as_ref))
                }
                _ => None,
            };
            self.written += 1;
            let at = write::Position {
                pass: self.pass,
                number: self.written,
                entries: self.entries,
            };
            let stored = row.boxes.as_ref().and_then(detection::from_json);
            let named = stored
                .as_ref()
                .map(|b| detection::named(&self.project.class_names, b));
            let boxes = stored
                .as_deref()
                .zip(named.as_deref())
                .map(|(stored, named)| write::RowBoxes { stored, named });
            self.entries += write::row(self.format, at, row, (class, boxes), accuracy, &mut out);
            // COCO reads the rows twice; each image is placed once.
            if self.format.is_folder() && self.pass == 0 {
                self.images.push(Image {
                    item_id: row.item_id,
                    key: row.object_key.clone(),
                    source: row.source.clone(),
                    class_index: row.class_index.and_then(|c| usize::try_from(c).ok()),
                    size: row
                        .width
                        .zip(row.height)
                        .map(|(w, h)| (w.max(0) as u32, h.max(0) as u32)),
                    boxes: stored,
                });
            }
        }
        if self.pass == 0 {
            self.summary.rows += rows.len() as u64;
        }
        Ok(Some(out))
    }
}
