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
pub enum LabelSource {
    #[sea_orm(string_value = "human")]
    Human,
    #[sea_orm(string_value = "machine")]
    Machine,
    #[sea_orm(string_value = "import")]
    Import,
}

/// Labels are append-only: a newer label supersedes, nothing is overwritten,
/// and the newest human label wins over any machine label.
///
/// A label is a class (`class_index`, classification projects) or a list
/// of boxes (`boxes`, detection projects: `sieve_shared::boxes`), never
/// both; the table checks it.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "labels")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub item_id: Uuid,
    pub class_index: Option<i32>,
    pub boxes: Option<Json>,
    pub source: LabelSource,
    pub reviewer: Option<String>,
    pub prediction_id: Option<Uuid>,
    pub model_version_id: Option<Uuid>,
    pub review_task_id: Option<Uuid>,
    pub created_at: DateTimeWithTimeZone,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
