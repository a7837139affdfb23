//! Routing: what happens to a prediction once a worker has made it.
//!
//! - [`results`]: the result consumer: stores each prediction and routes it
//!   by the project's [`crate::policy`] to a machine label or a review task.
//! - [`calibration`]: per-class thresholds calibrated to a target accuracy
//!   from a version's random evidence, the random checks a shut gate asks
//!   for, and policy changes that recalibrate.
//! - [`route`]: what routing does with one item (pure), and a batch of
//!   such decisions written set-wise; both of the above go through it.
//! - [`reroute`]: after a policy change, the items waiting for review routed
//!   again by their stored predictions.

pub mod calibration;
pub mod reroute;
pub mod results;
pub mod route;
