use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "predictions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub item_id: Uuid,
    pub model_version_id: Uuid,
    pub job_id: Uuid,
    pub worker_id: String,
    #[sea_orm(column_type = "JsonBinary")]
    pub probabilities: Json,
    #[sea_orm(column_type = "JsonBinary")]
    pub member_votes: Json,
    pub top_class: i32,
    #[sea_orm(column_type = "Float")]
    pub confidence: f32,
    #[sea_orm(column_type = "Float")]
    pub margin: f32,
    #[sea_orm(column_type = "Float")]
    pub entropy: f32,
    #[sea_orm(column_type = "Float")]
    pub disagreement: f32,
    #[sea_orm(column_type = "Float")]
    pub mutual_information: f32,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub embedding: Option<Json>,
    /// A detector's answer for the image (`sieve_shared::box_scores::ImageScores`).
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub detections: Option<Json>,
    /// What routing did with it: `auto_labeled`, `review`, or `kept` (a
    /// prediction that changed nothing, e.g. for a human-labeled item).
    pub routed_to: Option<String>,
    pub policy_version: Option<i32>,
    pub created_at: DateTimeWithTimeZone,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
