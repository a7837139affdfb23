//! The PostgreSQL schema of sieve, as sea-orm migrations.
//!
//! PostgreSQL is the only source of truth (DESIGN §3); the scheduler owns it
//! and runs these with `sieve migrate`. Migrations are append-only: never edit
//! one that has shipped, add a new one.

pub use sea_orm_migration::prelude::*;

mod m20261125_000001_claim_indexes;
mod m20261125_000001_initial;
mod m20261125_000001_scoped_tokens;
mod m20261125_000002_calibration;
mod m20261125_000002_dispatch_control;
mod m20261125_000003_review;
mod m20261126_000001_sample_reason;
mod m20261126_000011_ingests;
mod m20261126_000012_second_opinion;
mod m20261126_000013_project_arch;
mod m20261201_000001_lease_holder_token;
mod m20261206_000002_scheduler_leases;
mod m20261206_000003_dead_lettered_items;
mod m20261206_000004_not_for_token;
mod m20261206_000005_reported;
mod m20261208_000021_review_events;
mod m20261208_000022_snapshot_retention;
mod m20261209_000023_rerouted_policy;
mod m20261210_000024_dispatch_progress;
mod m20261210_000025_ingest_sources;
mod m20261211_000026_null_model;
mod m20261211_000027_review_task_item_index;
mod m20261212_000028_detection;
mod m20261213_000029_detector;
mod m20261214_000030_deidentify;
mod m20261215_000031_box_settings;
mod m20261216_000032_res_cnn;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_initial::Migration),
            Box::new(m20261125_000002_calibration::Migration),
            Box::new(m20261125_000003_review::Migration),
            Box::new(m20261125_000001_claim_indexes::Migration),
            Box::new(m20261125_000002_dispatch_control::Migration),
            Box::new(m20261125_000001_scoped_tokens::Migration),
            Box::new(m20261126_000001_sample_reason::Migration),
            Box::new(m20261126_000011_ingests::Migration),
            Box::new(m20261126_000012_second_opinion::Migration),
            Box::new(m20261126_000013_project_arch::Migration),
            Box::new(m20261201_000001_lease_holder_token::Migration),
            Box::new(m20261206_000002_scheduler_leases::Migration),
            Box::new(m20261206_000003_dead_lettered_items::Migration),
            Box::new(m20261206_000004_not_for_token::Migration),
            Box::new(m20261206_000005_reported::Migration),
            Box::new(m20261208_000021_review_events::Migration),
            Box::new(m20261208_000022_snapshot_retention::Migration),
            Box::new(m20261209_000023_rerouted_policy::Migration),
            Box::new(m20261210_000024_dispatch_progress::Migration),
            Box::new(m20261210_000025_ingest_sources::Migration),
            Box::new(m20261211_000026_null_model::Migration),
            Box::new(m20261211_000027_review_task_item_index::Migration),
            Box::new(m20261212_000028_detection::Migration),
            Box::new(m20261213_000029_detector::Migration),
            Box::new(m20261214_000030_deidentify::Migration),
            Box::new(m20261215_000031_box_settings::Migration),
            Box::new(m20261216_000032_res_cnn::Migration),
        ]
    }
}
