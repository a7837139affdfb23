//! The two kinds of job a worker takes from RabbitMQ.
//!
//! - [`prelabel`]: micro-batched prediction jobs in, scored results out.
//! - [`train`]: training jobs, from snapshot to artifact, with events.

pub mod prelabel;
pub mod train;
