//! The sieve worker: committee inference and training on burn, fed by
//! RabbitMQ. Workers never touch PostgreSQL; they need only the broker, the
//! object store and (optionally) Redis.
//!
//! # Layout
//! - [`service`]: the process — connections, loops, drain on shutdown.
//! - [`context`]: the [`context::Worker`] every loop shares, capabilities.
//! - [`jobs`]: the jobs it takes: `prelabel` (micro-batched prediction
//!   jobs in, scored results out) and `train` (from snapshot to artifact,
//!   with events).
//! - [`control`]: activation notices from the control fanout.
//! - [`heartbeat`]: the worker's heartbeat in Redis.
//! - [`health`]: broker connections and consumers, for `/healthz`.
//! - [`model`]: the burn committee (architecture, inference, training).
//! - [`artifact`]: model artifacts (config + weights + checksum).
//! - [`cache`]: loaded model versions.
//! - [`images`]: image bytes to model input.
//! - [`backend`]: the burn device chosen by cargo feature.

pub mod artifact;
pub mod backend;
pub mod cache;
pub mod context;
pub mod control;
pub mod health;
pub mod heartbeat;
pub mod images;
pub mod jobs;
pub mod model;
pub mod service;
