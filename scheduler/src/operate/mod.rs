//! What operators look at and act on.
//!
//! - [`status`]: the fleet and every project in one view (`sieve status`,
//!   `GET /api/v1/status`).
//! - [`workers`]: worker heartbeats read from Redis: alive or lost.
//! - [`failed`]: failed items and dead letters, listed, retried, purged.
//! - [`reviewers`]: per-reviewer figures of a project: labels, pace, skips,
//!   undos, agreement with other judgements (`sieve reviewers`).
//! - [`dead_notices`]: every dead letter seen once more: its item marked so
//!   nothing sends it again, its training run failed.

pub mod dead_notices;
pub mod failed;
pub mod reviewers;
pub mod status;
pub mod workers;
