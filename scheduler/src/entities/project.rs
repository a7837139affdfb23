use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "projects")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    #[sea_orm(unique)]
    pub name: String,
    pub task_kind: String,
    #[sea_orm(column_type = "JsonBinary")]
    pub class_names: Json,
    #[sea_orm(column_type = "JsonBinary")]
    pub policy: Json,
    pub policy_version: i32,
    pub active_model_version_id: Option<Uuid>,
    /// `small_cnn` or `mobilenet_v2` (a CHECK constraint holds it to those);
    /// parsed into `ModelArch` by `Project::from_model`.
    pub model_arch: String,
    /// A detection or deidentify project's box settings (tile size, proposal
    /// threshold; see `box_settings.rs`); `{}` (the defaults) for every other.
    #[sea_orm(column_type = "JsonBinary")]
    pub box_settings: Json,
    pub created_at: DateTimeWithTimeZone,
    pub updated_at: DateTimeWithTimeZone,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
