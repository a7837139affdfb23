//! The task-kind axis of the scheduler: what a kind's label, prediction,
//! routing evidence, review view, training example and export row are, in
//! one module per kind. The stages (`ingest`, `routing`, `review`,
//! `training`, `export`, `items`) call the kind's module for anything that
//! depends on what a label is, and keep the rest (leases, snapshots,
//! pagination, transactions) kind-neutral.
//!
//! A project's kind is [`TaskKind`], read from `projects.task_kind` into
//! [`crate::projects::Project::task_kind`]. With one kind the stages call
//! [`classification`] directly; a second kind adds its module here and a
//! `match` on the project's kind where the two differ (the compiler lists
//! those places once `TaskKind` has a second variant).

pub mod classification;

pub use sieve_shared::kind::TaskKind;
