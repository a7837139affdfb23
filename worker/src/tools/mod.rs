//! `sieve-worker bench`: throughput and accuracy figures, beside the
//! service; nothing in the job loops imports this module.
//!
//! - [`bench`]: `bench forward|train`, the throughput figures.
//! - [`bench_accuracy`]: `bench accuracy`, the training recipe on real labels.

pub mod bench;
pub mod bench_accuracy;
