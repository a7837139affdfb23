//! `sieve-worker`: parse, load settings, run until SIGTERM, drain.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use sieve_shared::Settings;
use sieve_worker::context::Capability;
use sieve_worker::service;

#[derive(Debug, Parser)]
#[command(
    name = "sieve-worker",
    version,
    about = "sieve worker: committee inference and training on burn"
)]
struct Cli {
    /// Settings file (default: ./sieve.toml if present). SIEVE_* variables override it.
    #[arg(long, env = "SIEVE_CONFIG")]
    config: Option<PathBuf>,
    /// What this worker does: prelabel, train, or both (comma separated).
    #[arg(long, value_delimiter = ',')]
    capabilities: Option<Vec<String>>,
    /// Jobs per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Milliseconds to wait to fill a batch.
    #[arg(long)]
    batch_timeout_ms: Option<u64>,
    /// Address for /healthz and /metrics (port 0 picks a free one).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(caps) = cli.capabilities {
        settings.worker.capabilities = caps;
    }
    if let Some(b) = cli.batch_size {
        settings.worker.batch_size = b;
    }
    if let Some(t) = cli.batch_timeout_ms {
        settings.worker.batch_timeout_ms = t;
    }
    if let Some(addr) = cli.listen {
        settings.http.worker_bind = addr;
    }
    let capabilities = settings
        .worker
        .capabilities
        .iter()
        .map(|c| Capability::parse(c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let listener = tokio::net::TcpListener::bind(settings.http.worker_bind)
        .await
        .with_context(|| format!("binding {}", settings.http.worker_bind))?;
    service::run(
        settings,
        capabilities,
        listener,
        sieve_shared::shutdown::signal(),
    )
    .await
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    sieve_shared::telemetry::init_tracing();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
