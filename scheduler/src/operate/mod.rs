//! What operators look at and act on.
//!
//! - [`status`]: the fleet and every project in one view (`sieve status`,
//!   `GET /api/v1/status`).
//! - [`workers`]: worker heartbeats read from Redis: alive or lost.
//! - [`failed`]: failed items and dead letters, listed, retried, purged.

pub mod failed;
pub mod status;
pub mod workers;
