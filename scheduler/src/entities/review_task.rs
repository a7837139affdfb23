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
pub enum TaskReason {
    #[sea_orm(string_value = "low_confidence")]
    LowConfidence,
    #[sea_orm(string_value = "disagreement")]
    Disagreement,
    /// In the audit sample and would have been labeled by machine: measures
    /// the accuracy of machine labels.
    #[sea_orm(string_value = "audit")]
    Audit,
    #[sea_orm(string_value = "seed")]
    Seed,
    /// In the audit sample but not confident enough for a machine label: a
    /// random example for calibration all the same.
    #[sea_orm(string_value = "sample")]
    Sample,
    /// A reviewer's label disagreed with a confident model: another reviewer
    /// checks it (`review::submit`). The item stays `human_labeled` meanwhile.
    #[sea_orm(string_value = "second_opinion")]
    SecondOpinion,
    /// Someone reported the item's machine or imported label as wrong
    /// (`items::reopen`): not a random pick, so never evidence for the
    /// audited accuracy or calibration.
    #[sea_orm(string_value = "reported")]
    Reported,
}

impl TaskReason {
    /// Whether the item was picked at random (seed set, audit sample) rather
    /// than for the model's doubt: only such labels estimate accuracy without
    /// bias.
    pub fn is_random(self) -> bool {
        matches!(self, Self::Seed | Self::Audit | Self::Sample)
    }
}

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
pub enum TaskState {
    #[sea_orm(string_value = "open")]
    Open,
    #[sea_orm(string_value = "claimed")]
    Claimed,
    #[sea_orm(string_value = "done")]
    Done,
    #[sea_orm(string_value = "cancelled")]
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "review_tasks")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub project_id: Uuid,
    pub item_id: Uuid,
    pub prediction_id: Option<Uuid>,
    pub reason: TaskReason,
    /// Higher is reviewed first (the model's uncertainty).
    #[sea_orm(column_type = "Float")]
    pub priority: f32,
    pub state: TaskState,
    pub lease_holder: Option<String>,
    pub lease_expires_at: Option<DateTimeWithTimeZone>,
    /// Bumped on every claim; a submit must present the current value.
    pub fencing_token: i64,
    pub created_at: DateTimeWithTimeZone,
    pub updated_at: DateTimeWithTimeZone,
    pub closed_at: Option<DateTimeWithTimeZone>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
