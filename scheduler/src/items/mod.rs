//! Items one at a time, for people: a project's items listed with filters
//! a page at a time, one item with its whole history, and a machine or
//! imported label sent back to review when someone reports it wrong
//! ([`reopen`]).
//!
//! A list is keyset-paginated on the item id (ids are UUID v7, so the order
//! is stable and roughly ingest order): a page is the first `limit` items
//! after the cursor that match, and `next_cursor` is the last id of a full
//! page. Items added or relabeled while a client pages through are seen or
//! not depending on where they fall, and none is listed twice. Each row
//! looks its current label and newest prediction up by index, which suits
//! a page; a whole project goes out through `export`.
//!
//! An item's history is every prediction (which version, the
//! probabilities, each committee member's vote), every label (source, who,
//! when) and every review task (why it was opened, how it ended, the
//! second opinion or report it carried).

pub mod reopen;

use chrono::{DateTime, FixedOffset};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, FromQueryResult, Statement, Value};
use serde::Serialize;
use uuid::Uuid;

use crate::auth::Caller;
use crate::entities::item::ItemState;
use crate::error::{AppError, AppResult};
use crate::export::Filters;
use crate::kind::classification;
use crate::kind::detection::{self, NamedBox};
use crate::projects::{self, Project};
use sea_orm::ActiveEnum;

/// Items on a page unless asked: enough for a screen of thumbnails.
pub const DEFAULT_LIMIT: u64 = 50;
/// The most a page may ask for.
pub const MAX_LIMIT: u64 = 500;

/// What a list asks for. Empty filters take everything.
#[derive(Clone, Debug, Default)]
pub struct ListRequest {
    /// `state`, `class` and `source` (of the current label) parse as an
    /// export's do, with the same messages; `min_confidence` and `since`
    /// are not taken here.
    pub filters: Filters,
    /// The newest prediction at most this confident.
    pub max_confidence: Option<f32>,
    /// The last item id of the page before.
    pub cursor: Option<Uuid>,
    pub limit: u64,
}

impl ListRequest {
    /// The query parameters of `GET /projects/{p}/items`.
    pub const PARAMETERS: [&str; 6] = [
        "state",
        "class",
        "source",
        "max_confidence",
        "cursor",
        "limit",
    ];

    pub fn from_query(pairs: &[(String, String)]) -> AppResult<Self> {
        let mut request = Self {
            limit: DEFAULT_LIMIT,
            ..Self::default()
        };
        for (name, value) in pairs {
            match name.as_str() {
                "state" => request.filters.add_state(value)?,
                "class" => request.filters.add_class(value),
                "source" => request.filters.add_source(value)?,
                "max_confidence" => request.set_max_confidence(value)?,
                "cursor" => request.set_cursor(value)?,
                "limit" => request.set_limit(value)?,
                other => {
                    return Err(AppError::Invalid(format!(
                        "unknown items parameter {other:?}: use {}",
                        Self::PARAMETERS.join(", ")
                    )));
                }
            }
        }
        Ok(request)
    }

    pub fn set_max_confidence(&mut self, text: &str) -> AppResult<()> {
        match text.trim().parse::<f32>() {
            Ok(x) if (0.0..=1.0).contains(&x) => {
                self.max_confidence = Some(x);
                Ok(())
            }
            _ => Err(AppError::Invalid(format!(
                "max_confidence {text:?} is not a number from 0 to 1"
            ))),
        }
    }

    pub fn set_cursor(&mut self, text: &str) -> AppResult<()> {
        let text = text.trim();
        if text.is_empty() {
            self.cursor = None;
            return Ok(());
        }
        self.cursor = Some(text.parse().map_err(|_| {
            AppError::Invalid(format!(
                "cursor {text:?} is not one a list returned (pass its next_cursor)"
            ))
        })?);
        Ok(())
    }

    pub fn set_limit(&mut self, text: &str) -> AppResult<()> {
        match text.trim().parse::<u64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => {
                self.limit = n;
                Ok(())
            }
            _ => Err(AppError::Invalid(format!(
                "limit {text:?} is not a number from 1 to {MAX_LIMIT}"
            ))),
        }
    }
}

/// One item in a list.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ItemSummary {
    pub item_id: Uuid,
    pub key: String,
    pub source: String,
    pub state: String,
    /// The current label: the newest human or import label, else the
    /// newest machine label. Its class (classification).
    pub label: Option<String>,
    /// How many boxes it has (detection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boxes: Option<i32>,
    pub label_source: Option<String>,
    pub labeled_by: Option<String>,
    pub labeled_at: Option<DateTime<FixedOffset>>,
    /// The newest prediction: its class, confidence and model version.
    pub predicted: Option<String>,
    pub confidence: Option<f32>,
    pub model_version: Option<i32>,
    pub created_at: DateTime<FixedOffset>,
}

/// A page of a list.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ItemPage {
    pub project: String,
    pub items: Vec<ItemSummary>,
    /// Pass as `cursor` for the next page; `None` on the last one.
    pub next_cursor: Option<Uuid>,
}

#[derive(FromQueryResult)]
struct ListRow {
    id: Uuid,
    object_key: String,
    source: String,
    state: String,
    created_at: DateTime<FixedOffset>,
    class_index: Option<i32>,
    box_count: Option<i32>,
    label_source: Option<String>,
    reviewer: Option<String>,
    labeled_at: Option<DateTime<FixedOffset>>,
    top_class: Option<i32>,
    confidence: Option<f32>,
    model_version: Option<i32>,
}

/// `$1` project, `$2` cursor, `$3` states, `$4` label sources, `$5` class
/// indices (lists as comma-separated text, NULL: any), `$6` maximum
/// confidence, `$7` rows.
const LIST: &str = r#"
SELECT i.id, i.object_key, i.source, i.state, i.created_at,
       l.class_index, jsonb_array_length(l.boxes) AS box_count, l.source AS label_source,
       l.reviewer, l.created_at AS labeled_at,
       p.top_class, p.confidence, mv.version AS model_version
FROM items i
LEFT JOIN LATERAL (
    SELECT class_index, boxes, source, reviewer, created_at FROM labels WHERE item_id = i.id
    ORDER BY source = 'machine', created_at DESC, id DESC LIMIT 1
) l ON true
LEFT JOIN LATERAL (
    SELECT top_class, confidence, model_version_id FROM predictions WHERE item_id = i.id
    ORDER BY created_at DESC, id DESC LIMIT 1
) p ON true
LEFT JOIN model_versions mv ON mv.id = p.model_version_id
WHERE i.project_id = $1
  AND ($2::uuid IS NULL OR i.id > $2::uuid)
  AND ($3::text IS NULL OR i.state = ANY (string_to_array($3, ',')))
  AND ($4::text IS NULL OR l.source = ANY (string_to_array($4, ',')))
  AND ($5::text IS NULL OR l.class_index = ANY (string_to_array($5, ',')::int[]))
  AND ($6::real IS NULL OR p.confidence <= $6::real)
ORDER BY i.id
LIMIT $7
"#;

fn class_name(project: &Project, index: Option<i32>) -> Option<String> {
    classification::class_name(&project.class_names, index?).map(str::to_owned)
}

/// A page of `project`'s items.
pub async fn list(
    db: &DatabaseConnection,
    project: &Project,
    request: &ListRequest,
) -> AppResult<ItemPage> {
    let classes = request.filters.classes(project)?;
    let list = |values: Vec<String>| (!values.is_empty()).then(|| values.join(","));
    let limit = request.limit.clamp(1, MAX_LIMIT);
    let values: Vec<Value> = vec![
        project.id.as_uuid().into(),
        request.cursor.into(),
        list(
            request
                .filters
                .states
                .iter()
                .map(ItemState::to_value)
                .collect(),
        )
        .into(),
        list(
            request
                .filters
                .sources
                .iter()
                .map(|s| s.to_value())
                .collect(),
        )
        .into(),
        list(classes.iter().map(i32::to_string).collect()).into(),
        request.max_confidence.into(),
        (limit as i64).into(),
    ];
    let rows = ListRow::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        LIST,
        values,
    ))
    .all(db)
    .await?;
    let next_cursor = (rows.len() as u64 == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    let items = rows
        .into_iter()
        .map(|r| ItemSummary {
            item_id: r.id,
            key: r.object_key,
            source: r.source,
            state: r.state,
            label: class_name(project, r.class_index),
            boxes: r.box_count,
            label_source: r.label_source,
            labeled_by: r.reviewer,
            labeled_at: r.labeled_at,
            predicted: class_name(project, r.top_class),
            confidence: r.confidence,
            model_version: r.model_version,
            created_at: r.created_at,
        })
        .collect();
    Ok(ItemPage {
        project: project.name.clone(),
        items,
        next_cursor,
    })
}

/// One item and everything that happened to it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ItemHistory {
    pub item_id: Uuid,
    pub project: String,
    pub key: String,
    pub source: String,
    pub content_hash: String,
    pub state: String,
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub size_bytes: i64,
    pub last_error: Option<String>,
    pub created_at: DateTime<FixedOffset>,
    /// Where the image is served (`GET`, with a token that may review).
    pub image_url: String,
    /// The project's classes: a prediction's `probabilities` are in this
    /// order.
    pub class_names: Vec<String>,
    /// The current label (the newest human or import label, else the
    /// newest machine label), also in `labels`.
    pub label: Option<LabelEntry>,
    /// Oldest first.
    pub predictions: Vec<PredictionEntry>,
    /// Oldest first.
    pub labels: Vec<LabelEntry>,
    /// Oldest first.
    pub review_tasks: Vec<TaskEntry>,
}

#[derive(Clone, Debug, Serialize, FromQueryResult, utoipa::ToSchema)]
pub struct PredictionEntry {
    pub prediction_id: Uuid,
    pub model_version: Option<i32>,
    #[sea_orm(skip)]
    pub predicted: Option<String>,
    pub top_class: i32,
    pub confidence: f32,
    pub margin: f32,
    pub entropy: f32,
    pub disagreement: f32,
    pub mutual_information: f32,
    /// One per class, in `class_names` order.
    pub probabilities: serde_json::Value,
    /// Each committee member's class (index).
    pub member_votes: serde_json::Value,
    /// Where routing sent it: `auto_labeled`, `review`, or `kept` (a
    /// version no longer active, an item people labeled or someone holds).
    pub routed_to: Option<String>,
    pub worker_id: String,
    pub created_at: DateTime<FixedOffset>,
}

#[derive(Clone, Debug, Serialize, FromQueryResult, utoipa::ToSchema)]
pub struct LabelEntry {
    pub label_id: Uuid,
    #[sea_orm(skip)]
    pub class: Option<String>,
    /// The class (classification).
    pub class_index: Option<i32>,
    /// The boxes (detection).
    #[sea_orm(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boxes: Option<Vec<NamedBox>>,
    #[serde(skip)]
    pub stored_boxes: Option<serde_json::Value>,
    /// `human`, `machine` or `import`.
    pub source: String,
    /// The reviewer's name, and their token's id (none for the CLI).
    pub labeled_by: Option<String>,
    pub labeled_by_token: Option<Uuid>,
    /// The version a machine label came from.
    pub model_version: Option<i32>,
    pub prediction_id: Option<Uuid>,
    pub review_task_id: Option<Uuid>,
    pub created_at: DateTime<FixedOffset>,
}

#[derive(Clone, Debug, Serialize, FromQueryResult, utoipa::ToSchema)]
pub struct TaskEntry {
    pub task_id: Uuid,
    /// Why it was opened: `seed`, `low_confidence`, `disagreement`,
    /// `audit`, `sample`, `second_opinion`, `reported`.
    pub reason: String,
    pub state: String,
    /// How it ended: `labeled` (with `label_id`), `cancelled`; for a second
    /// opinion its outcome, for a report `confirmed` or `corrected`; `None`
    /// while open.
    pub outcome: Option<String>,
    pub label_id: Option<Uuid>,
    pub priority: f32,
    pub lease_holder: Option<String>,
    pub skip_count: i32,
    pub last_skip_reason: Option<String>,
    /// A report's reason and reporter.
    pub report_reason: Option<String>,
    pub reported_by: Option<String>,
    pub created_at: DateTime<FixedOffset>,
    pub closed_at: Option<DateTime<FixedOffset>>,
}

#[derive(FromQueryResult)]
struct ItemRow {
    id: Uuid,
    project_id: Uuid,
    object_key: String,
    source: String,
    content_hash: String,
    state: String,
    width: Option<i32>,
    height: Option<i32>,
    size_bytes: i64,
    last_error: Option<String>,
    created_at: DateTime<FixedOffset>,
}

const PREDICTIONS: &str = r#"
SELECT p.id AS prediction_id, mv.version AS model_version, p.top_class, p.confidence, p.margin,
       p.entropy, p.disagreement, p.mutual_information, p.probabilities, p.member_votes,
       p.routed_to, p.worker_id, p.created_at
FROM predictions p LEFT JOIN model_versions mv ON mv.id = p.model_version_id
WHERE p.item_id = $1 ORDER BY p.created_at, p.id
"#;

const LABELS: &str = r#"
SELECT l.id AS label_id, l.class_index, l.boxes AS stored_boxes, l.source,
       l.reviewer AS labeled_by,
       t.lease_holder_token AS labeled_by_token, mv.version AS model_version,
       l.prediction_id, l.review_task_id, l.created_at
FROM labels l
LEFT JOIN review_tasks t ON t.id = l.review_task_id
LEFT JOIN model_versions mv ON mv.id = l.model_version_id
WHERE l.item_id = $1 ORDER BY l.created_at, l.id
"#;

const TASKS: &str = r#"
SELECT t.id AS task_id, t.reason, t.state,
       CASE WHEN t.state IN ('open', 'claimed') THEN NULL
            WHEN s.outcome IS NOT NULL THEN s.outcome
            WHEN r.outcome IS NOT NULL THEN r.outcome
            WHEN t.state = 'done' THEN 'labeled'
            ELSE t.state END AS outcome,
       (SELECT l.id FROM labels l WHERE l.review_task_id = t.id) AS label_id,
       t.priority, t.lease_holder, t.skip_count, t.last_skip_reason,
       r.reason AS report_reason, r.reported_by, t.created_at, t.closed_at
FROM review_tasks t
LEFT JOIN second_opinions s ON s.task_id = t.id
LEFT JOIN reports r ON r.task_id = t.id
WHERE t.item_id = $1 ORDER BY t.created_at, t.id
"#;

/// Item `item_id` with its history, if `who` may see its project (a
/// scoped token gets 404 for another project's, as if it did not exist).
pub async fn show(db: &DatabaseConnection, who: &Caller, item_id: Uuid) -> AppResult<ItemHistory> {
    let item = item_row(db, item_id).await?;
    who.check_item_project(item_id, item.project_id)?;
    history(db, item).await
}

/// [`show`] with the database's own authority (the CLI).
pub async fn show_any(db: &DatabaseConnection, item_id: Uuid) -> AppResult<ItemHistory> {
    history(db, item_row(db, item_id).await?).await
}

async fn item_row(db: &impl ConnectionTrait, item_id: Uuid) -> AppResult<ItemRow> {
    ItemRow::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT id, project_id, object_key, source, content_hash, state, width, height, \
         size_bytes, last_error, created_at FROM items WHERE id = $1",
        [item_id.into()],
    ))
    .one(db)
    .await?
    .ok_or_else(|| AppError::NotFound(format!("no item {item_id}")))
}

async fn history(db: &DatabaseConnection, item: ItemRow) -> AppResult<ItemHistory> {
    let project = projects::get(db, &item.project_id.to_string()).await?;
    let by_item =
        |sql: &str| Statement::from_sql_and_values(DbBackend::Postgres, sql, [item.id.into()]);
    let mut predictions = PredictionEntry::find_by_statement(by_item(PREDICTIONS))
        .all(db)
        .await?;
    for p in &mut predictions {
        p.predicted = class_name(&project, Some(p.top_class));
    }
    let mut labels = LabelEntry::find_by_statement(by_item(LABELS))
        .all(db)
        .await?;
    for l in &mut labels {
        l.class = class_name(&project, l.class_index);
        l.boxes = l
            .stored_boxes
            .take()
            .and_then(|b| detection::from_json(&b))
            .map(|b| detection::named(&project.class_names, &b));
    }
    let review_tasks = TaskEntry::find_by_statement(by_item(TASKS)).all(db).await?;
    // The same rule as everywhere: the newest human or import label wins.
    let label = labels
        .iter()
        .rev()
        .find(|l| l.source != "machine")
        .or_else(|| labels.last())
        .cloned();
    Ok(ItemHistory {
        item_id: item.id,
        project: project.name.clone(),
        key: item.object_key,
        source: item.source,
        content_hash: item.content_hash,
        state: item.state,
        width: item.width,
        height: item.height,
        size_bytes: item.size_bytes,
        last_error: item.last_error,
        created_at: item.created_at,
        image_url: crate::review::image_url(item.id),
        class_names: project.class_names.clone(),
        label,
        predictions,
        labels,
        review_tasks,
    })
}
