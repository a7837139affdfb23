//! The one harness of sieve's integration tests (a dev-dependency only).
//!
//! # Layout
//! - [`sandbox`]: a test's own PostgreSQL database (migrated), RabbitMQ
//!   queue prefix, Redis key prefix and store directory, all removed when
//!   the [`Sandbox`] drops, also while a test panics.
//! - [`env`]: a scheduler [`Context`](sieve_scheduler::context::Context) on
//!   a sandbox with one project whose active model is a stub, for ingest and
//!   dispatch tests that run no worker ([`ProjectEnv`]).
//! - [`app`]: the scheduler serving HTTP on port 0 ([`TestApp`],
//!   [`with_app`]) and the HTTP and review-queue helpers tests call on it.
//! - [`fixtures`]: rows and messages built by hand: items, stub model
//!   versions ([`StubVersion`]), scored results ([`Scored`]), PNGs.
//! - [`s3`]: a real S3 API of the test's own ([`Moto`]), for sieve's store
//!   in a bucket and for ingest from one.
//! - [`wait`]: [`eventually`], polling until a deadline.
//! - [`faces`]: the real photos of faces and their hand-checked boxes.
//!
//! Why one crate: every test gets the same isolation and the same cleanup,
//! and the helpers are compiled once instead of once per test binary. It
//! depends on the scheduler but never on burn or the worker, so the
//! scheduler's tests stay free of them; the worker's tests add the parts
//! that start workers on top of it (`worker/tests/it/sieve.rs`).

#![allow(clippy::unwrap_used)] // a test harness: a failed setup is a failed test

pub mod app;
pub mod env;
pub mod faces;
pub mod fixtures;
pub mod s3;
pub mod sandbox;
pub mod wait;

pub use app::{App, Seeded, SeededTask, TestApp, with_app, with_app_configured};
pub use env::{ProjectEnv, item_ids};
pub use fixtures::{Scored, StubVersion, activate_stub, insert_item, png, pngs};
pub use s3::Moto;
pub use sandbox::Sandbox;
pub use wait::eventually;
