//! `sieve`: the scheduler binary. Parse, load settings, run; all the work is
//! in the library so tests can call it.

use std::process::ExitCode;

use clap::Parser;
use sieve_scheduler::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    sieve_shared::telemetry::init_tracing();
    match cli::run(cli).await {
        Ok(code) => code,
        Err(err) => {
            // One line: what failed and why, no backtrace.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
