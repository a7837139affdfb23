//! sieve's tools: the demo and the benchmarks. They run beside the service
//! (against a running `sieve serve` and workers, or in databases and
//! queues of their own) and are never shipped in it: the `sieve` and
//! `sieve-worker` binaries do not carry them.
//!
//! # Layout
//! - [`demo`]: the active-learning loop on Fashion-MNIST with simulated
//!   reviewers, scored against the ground truth, with its report
//!   ([`report`]: the charts).
//! - [`fashion_mnist`]: the data set as PNG files with the ground truth by
//!   file name; [`fashion_idx`]: the IDX reader under it.
//! - [`bench_ingest`], [`bench_claim`], [`bench_export`]: the scheduler's
//!   benchmarks (ingest against raw publish, the review queue under load,
//!   export against `COPY`).
//! - [`bench_ceiling`]: the machinery's own ceiling: the whole pipeline
//!   with a null model against the raw broker, per stage.
//! - [`bench_cluster`]: items through a three-node RabbitMQ cluster while
//!   a node is shut down and started again.
//! - [`bench_chaos`]: faults on real processes (workers and the scheduler
//!   SIGKILLed, RabbitMQ and PostgreSQL restarted, Redis flushed) while
//!   items flow; what was lost or duplicated, and the time to recover.
//! - [`worker_bench`], [`bench_accuracy`]: the worker's (the committee's
//!   forward and training throughput, the recipe's accuracy on real labels).
//! - [`procstat`]: peak RSS and CPU time from `/proc`, for the benchmarks.

pub mod bench_accuracy;
pub mod bench_ceiling;
pub mod bench_chaos;
pub mod bench_claim;
pub mod bench_cluster;
pub mod bench_detect;
pub mod bench_export;
pub mod bench_ingest;
pub mod canvases;
pub mod demo;
pub mod fashion_idx;
pub mod fashion_mnist;
pub mod oracle;
pub mod procstat;
pub mod report;
pub mod scenes;
pub mod worker_bench;
