use sea_orm::entity::prelude::*;
use serde::Serialize;

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    EnumIter,
    DeriveActiveEnum,
    Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
#[serde(rename_all = "snake_case")]
pub enum ItemState {
    /// Waiting for (or in) prediction.
    #[sea_orm(string_value = "queued")]
    Queued,
    /// A review task is open for it (but a second opinion on a human label
    /// leaves the item `human_labeled`: it has a label meanwhile).
    #[sea_orm(string_value = "in_review")]
    InReview,
    #[sea_orm(string_value = "auto_labeled")]
    AutoLabeled,
    #[sea_orm(string_value = "human_labeled")]
    HumanLabeled,
    #[sea_orm(string_value = "failed")]
    Failed,
}

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "items")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub project_id: Uuid,
    pub object_key: String,
    /// Where the image came from (path or URI), for people.
    pub source: String,
    pub content_hash: String,
    pub size_bytes: i64,
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub state: ItemState,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub dispatched_at: Option<DateTimeWithTimeZone>,
    pub created_at: DateTimeWithTimeZone,
    pub updated_at: DateTimeWithTimeZone,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
