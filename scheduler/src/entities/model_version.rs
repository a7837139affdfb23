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
pub enum VersionStatus {
    #[sea_orm(string_value = "training")]
    Training,
    #[sea_orm(string_value = "candidate")]
    Candidate,
    #[sea_orm(string_value = "active")]
    Active,
    #[sea_orm(string_value = "retired")]
    Retired,
    #[sea_orm(string_value = "failed")]
    Failed,
}

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "model_versions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub project_id: Uuid,
    pub version: i32,
    pub parent_id: Option<Uuid>,
    pub training_run_id: Option<Uuid>,
    pub artifact_key: Option<String>,
    pub checksum: Option<String>,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub architecture: Option<Json>,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub metrics: Option<Json>,
    /// Routing thresholds for the project's target accuracy (`Calibration`).
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub calibration: Option<Json>,
    pub status: VersionStatus,
    pub status_reason: Option<String>,
    pub created_at: DateTimeWithTimeZone,
    pub activated_at: Option<DateTimeWithTimeZone>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
