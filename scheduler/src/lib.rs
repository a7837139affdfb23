//! The sieve scheduler: owner of PostgreSQL, the routing policy, the review
//! queue and the model registry; the `sieve` CLI and HTTP API.
//!
//! # Layout
//! The folders follow an item through the loop; dependencies point down
//! this list, never back up (see docs/architecture.md).
//! - Foundations: [`error`], [`db`], [`entities`] (sea-orm models),
//!   [`context`] (the handles every stage takes), [`projects`] (names,
//!   classes, architecture), [`policy`] (a project's routing policy and the
//!   decision for one prediction, and `PolicyPatch`, the one way it is
//!   changed), [`patch`] (absent vs `null` in partial updates), [`auth`]
//!   (API tokens and roles), [`lease`] (the work that runs in one scheduler
//!   at a time), [`kind`] (what a task kind's labels are, one module per
//!   kind: `classification`).
//! - [`ingest`]: images into items: the pipeline, `manifest` files,
//!   object-store `prefix`es, and `runs` (every ingest's row and progress).
//! - [`dispatch`]: items into jobs; pause, resume, rate limit, priority,
//!   the re-dispatch sweeper.
//! - [`routing`]: the result consumer that stores predictions and routes
//!   them (`results`), thresholds calibrated to a target (`calibration`).
//! - [`review`]: the review queue (claims, leases, fencing tokens).
//! - [`training`]: snapshots, training runs and their events; `registry`
//!   (versions, promotion, rollback, activation and rescore), `evaluation`
//!   (per-class figures of a version), `auto_retrain` (retrain every N labels),
//!   `watchdog` (stuck runs, a first model again), `retention` (old
//!   snapshots out of the store).
//! - [`operate`]: what operators look at and replay: `status`, `workers`,
//!   `failed`, `dead_notices` (dead-lettered jobs marked and their runs
//!   failed), `reviewers` (per-reviewer figures).
//! - [`export`]: labels out: one row per item with its label's provenance
//!   (`snapshot`: one repeatable-read transaction read through a cursor;
//!   `write`: CSV, JSON Lines, COCO; `output`: a file renamed into place;
//!   `folder`: the imagefolder directory).
//! - [`items`]: items one at a time: a filtered list a page at a time,
//!   one item's history, and `reopen` (a label reported as wrong, back to
//!   review).
//! - [`http`]: `/api/v1`, the review page, `/healthz`, `/metrics`.
//! - [`server`]: `sieve serve`, the HTTP API and the loops in one process.
//! - [`cli`]: the `sieve` command line; thin over the modules above.

pub mod auth;
pub mod box_settings;
pub mod cli;
pub mod context;
pub mod db;
pub mod dispatch;
pub mod entities;
pub mod error;
pub mod export;
pub mod http;
pub mod ingest;
pub mod items;
pub mod kind;
pub mod lease;
pub mod operate;
pub mod patch;
pub mod policy;
pub mod projects;
pub mod review;
pub mod routing;
pub mod server;
pub mod training;
