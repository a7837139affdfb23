//! The sieve scheduler: owner of PostgreSQL, the routing policy, the review
//! queue and the model registry; the `sieve` CLI and HTTP API.
//!
//! # Layout
//! - [`app`]: the shared [`app::Context`] and `sieve serve` (HTTP + consumers).
//! - [`cli`]: the `sieve` command line; thin over the modules below.
//! - [`http`]: `/api/v1`, `/healthz`, `/metrics`.
//! - [`projects`], [`policy`], [`calibration`]: projects, their classes, the
//!   routing policy and its thresholds calibrated to a target accuracy.
//! - [`ingest`]: images into items (folders, manifests, object-store
//!   prefixes: [`manifest`], [`object_prefix`]); [`ingest_runs`]: ingests
//!   started over HTTP, their progress in PostgreSQL; [`dispatch`]: items
//!   into jobs, pause / resume / rate limit / priority.
//! - [`results`]: the result consumer that stores predictions and routes.
//! - [`review`]: the review queue (claims, leases, fencing tokens).
//! - [`training`]: snapshots, training runs and their events
//!   ([`auto_retrain`]: runs requested every N new human labels);
//!   [`models`]: versions, promotion, rollback, activation and rescore;
//!   [`evaluation`]: per-class precision/recall, calibration error and
//!   machine share of a version, from its holdout.
//! - [`auth`]: API tokens and roles.
//! - [`status`], [`workers`], [`failed`]: what operators look at and
//!   replay (fleet status, heartbeats, failed items and dead letters).
//! - [`bench_ingest`]: `sieve bench ingest` (ingest against raw publish).
//! - [`bench_claim`]: `sieve bench claim` (the review queue under load).
//! - [`demo`]: the end-to-end run on Fashion-MNIST with simulated reviewers.
//! - [`db`], [`entities`]: PostgreSQL connection, migrations, sea-orm models.

pub mod app;
pub mod auth;
pub mod auto_retrain;
pub mod bench_claim;
pub mod bench_ingest;
pub mod calibration;
pub mod cli;
pub mod db;
pub mod demo;
pub mod dispatch;
pub mod entities;
pub mod error;
pub mod evaluation;
pub mod failed;
pub mod fashion_mnist;
pub mod http;
pub mod ingest;
pub mod ingest_runs;
pub mod manifest;
pub mod models;
pub mod object_prefix;
pub mod policy;
pub mod projects;
pub mod report;
pub mod results;
pub mod review;
pub mod status;
pub mod training;
pub mod workers;
