//! Tools that run beside the service, not in it: the demo and the
//! benchmarks, and what only they need (the Fashion-MNIST reader, the
//! report). The CLI's `sieve demo` and `sieve bench` are thin entries into
//! them; nothing in the service stages imports this module.

pub mod bench_claim;
pub mod bench_export;
pub mod bench_ingest;
pub mod demo;
pub mod fashion_mnist;
pub mod report;
