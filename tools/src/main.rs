//! `sieve-tools`: the demo and the benchmarks. Parse, load settings, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sieve_scheduler::context::Context;
use sieve_scheduler::kind::TaskKind;
use sieve_shared::Settings;
use sieve_tools::worker_bench::{self, What};
use sieve_tools::{
    bench_ceiling, bench_chaos, bench_claim, bench_cluster, bench_detect, bench_export,
    bench_ingest, demo,
};

#[derive(Debug, Parser)]
#[command(
    name = "sieve-tools",
    version,
    about = "sieve's demo and benchmarks, beside the service"
)]
pub struct Cli {
    /// Settings file (default: ./sieve.toml if present). SIEVE_* variables override it.
    #[arg(long, env = "SIEVE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the active-learning loop on Fashion-MNIST with simulated reviewers
    /// (needs `sieve serve` and workers running; `ops/demo.sh` starts them).
    Demo(demo::DemoArgs),
    /// Benchmarks that print their figures (docs/benchmarks.md).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Ingest of a folder of PNGs (copied into the store, and inside the
    /// store referenced in place) and of a manifest of keys, against the raw
    /// publish rate of the same broker; own database and queues.
    Ingest(bench_ingest::BenchIngestArgs),
    /// The machinery's own ceiling: ingest -> queue -> workers -> routing ->
    /// review queue with a null model (no model cost), beside the raw
    /// broker's publish and consume of as many messages; own database.
    Ceiling(bench_ceiling::CeilingArgs),
    /// Items through a three-node RabbitMQ cluster (`ops/rabbitmq-cluster.sh
    /// start`) while the node the fleet is on is shut down and started
    /// again; recovery time and exact accounting; own database.
    Cluster(bench_cluster::ClusterArgs),
    /// Review claims: many reviewers claiming and submitting at once until
    /// the queue is empty; latencies, throughput, zero double claims.
    Claim(bench_claim::ClaimArgs),
    /// Export of a large labeled project (CSV, JSON Lines) against a plain
    /// `COPY` of the same rows; rows/s and peak RSS; own database.
    Export(bench_export::BenchExportArgs),
    /// Faults on real processes while items flow: worker and scheduler
    /// SIGKILLs, RabbitMQ and PostgreSQL restarts, a Redis flush; counts
    /// items lost and work duplicated, and the time to recover from each.
    /// Needs `sieve` and `sieve-worker` beside this binary; own database.
    Chaos(bench_chaos::ChaosArgs),
    /// The committee's forward pass: bare, and through the queue path (a
    /// worker on RabbitMQ), CPU per item; MobileNetV2 at 96 and 224.
    Forward(worker_bench::BenchArgs),
    /// Training: snapshot formats, heads on embeddings, one-epoch fine-tunes.
    Train(worker_bench::BenchArgs),
    /// The training recipe on real labels: the share labelable at 95/97/99%.
    Accuracy(worker_bench::BenchArgs),
    /// The detector committee on the real tree crowns: heads trained on
    /// three images' tiles, AP@0.5 on the fourth, times per stage.
    Detect(bench_detect::DetectArgs),
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Demo(args) => {
            let ctx = Context::connect(settings).await?;
            match args.task {
                TaskKind::Classification => {
                    demo::run(&ctx, &args).await?;
                }
                TaskKind::Detection => {
                    demo::run_boxes(&ctx, &args).await?;
                }
                TaskKind::Deidentify => {
                    demo::run_faces(&ctx, &args).await?;
                }
            }
        }
        Command::Bench(BenchCommand::Ingest(args)) => bench_ingest::run(settings, &args).await?,
        Command::Bench(BenchCommand::Claim(args)) => bench_claim::run(&settings, &args).await?,
        Command::Bench(BenchCommand::Ceiling(args)) => bench_ceiling::run(settings, &args).await?,
        Command::Bench(BenchCommand::Cluster(args)) => bench_cluster::run(settings, &args).await?,
        Command::Bench(BenchCommand::Export(args)) => bench_export::run(settings, &args).await?,
        Command::Bench(BenchCommand::Chaos(args)) => bench_chaos::run(settings, &args).await?,
        Command::Bench(BenchCommand::Forward(args)) => {
            worker(settings, What::Forward, args).await?
        }
        Command::Bench(BenchCommand::Train(args)) => worker(settings, What::Train, args).await?,
        Command::Bench(BenchCommand::Accuracy(args)) => {
            worker(settings, What::Accuracy, args).await?;
        }
        Command::Bench(BenchCommand::Detect(args)) => {
            tokio::task::spawn_blocking(move || bench_detect::run(&args)).await??;
        }
    }
    Ok(())
}

async fn worker(
    settings: Settings,
    what: What,
    mut args: worker_bench::BenchArgs,
) -> anyhow::Result<()> {
    args.what = what;
    worker_bench::run(settings, args).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use sieve_shared::messages::ModelArch;

    #[test]
    fn demo_passes_an_architecture_through() {
        let cli = Cli::try_parse_from(["sieve-tools", "demo", "--quick", "--arch", "mobilenet_v2"]);
        match cli.map(|c| c.command) {
            Ok(Command::Demo(args)) => assert_eq!(args.arch, ModelArch::MobilenetV2),
            other => panic!("parsed as {other:?}"),
        }
    }

    /// The demo service of `ops/compose.yml` runs a command this binary takes.
    #[test]
    fn the_compose_demo_command_parses() {
        let compose = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/compose.yml"),
        )
        .expect("ops/compose.yml");
        let compose: serde_yaml_ng::Value = serde_yaml_ng::from_str(&compose).expect("yaml");
        let command: Vec<String> = compose["services"]["demo"]["command"]
            .as_sequence()
            .expect("the demo service has a command")
            .iter()
            .map(|v| v.as_str().expect("a string").to_owned())
            .collect();
        let argv = std::iter::once("sieve-tools".to_owned()).chain(command.iter().cloned());
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Demo(_)) => {}
            other => panic!("`sieve-tools {}` parsed as {other:?}", command.join(" ")),
        }
    }
}
