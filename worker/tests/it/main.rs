//! The worker's integration tests, one module per subject, in one binary:
//! a scheduler and workers in process (`sieve`, on `sieve_testkit`), real
//! `sieve-worker` processes signalled and killed, the models trained and
//! imported. Each test isolates itself with the kit's sandbox, so they run
//! side by side on the test threads. `restarts.rs` is the one binary of its
//! own: it stops services that every test shares.

#![allow(clippy::unwrap_used)]

mod sieve;

mod batches;
mod bucket_store;
mod deidentify;
mod demo;
mod detection_loop;
mod drain;
mod end_to_end;
mod faces;
mod faults;
mod first_model;
mod mobilenet_import;
mod null_model;
mod operations;
mod own_faults;
mod quarantine;
mod soak;
mod training_cancel;
mod training_full_mobilenet;
mod training_heads;
mod training_interrupted;
mod training_res_cnn;
