//! The `sieve` command line.
//!
//! Every command loads the settings once, connects to what it needs, and
//! calls the same library function the HTTP API calls. `args.rs` says what
//! the command line takes; one file per command group runs it; `render.rs`
//! shows the results to a person.

mod args;
mod export;
mod ingest;
mod items;
mod operate;
mod projects;
mod render;
mod review;
mod reviewers;
mod tokens;
mod training;

use std::process::ExitCode;

use anyhow::Context as _;
use sieve_shared::Settings;

pub use args::{
    Cli, Command, ExportArgs, FailedCommand, ItemsCommand, ModelsCommand, ProjectCommand,
    RetrainArgs, ReviewCommand, TokenCommand,
};

use crate::context::Context;
use crate::{db, server};

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Migrate => {
            db::create_database_if_missing(&settings.database.url).await?;
            let conn = db::connect(&settings.database).await?;
            let applied = db::migrate(&conn).await?;
            // Marks the store, so workers started next find it.
            sieve_shared::store::Store::connect(&settings.store, &settings.s3).await?;
            println!("database is up to date ({applied} migration(s) applied)");
        }
        Command::Serve => {
            let listener = tokio::net::TcpListener::bind(settings.http.bind)
                .await
                .with_context(|| format!("binding {}", settings.http.bind))?;
            let ctx = Context::connect(settings).await?;
            tracing::info!(addr = %listener.local_addr()?, "sieve scheduler listening");
            server::serve(ctx, listener, sieve_shared::shutdown::signal()).await?;
        }
        Command::Project(command) => projects::project(settings, command).await?,
        Command::Ingest {
            source,
            project,
            manifest,
            annotations,
            root,
        } => return ingest::ingest(settings, source, project, manifest, annotations, root).await,
        Command::Export(args) => export::export(settings, args).await?,
        Command::Items(command) => items::items(settings, command).await?,
        Command::Ingests {
            project,
            limit,
            json,
        } => ingest::list(settings, project, limit, json).await?,
        Command::Status {
            project,
            json,
            watch,
        } => operate::status(settings, project, json, watch).await?,
        Command::Reviewers {
            project,
            since,
            json,
        } => reviewers::reviewers(settings, project, since, json).await?,
        Command::Workers { json } => operate::workers(settings, json).await?,
        Command::Review(command) => review::review(settings, command).await?,
        Command::Retrain(args) => training::retrain(settings, args).await?,
        Command::Models(command) => training::models(settings, command).await?,
        Command::Failed(command) => operate::failed(settings, command).await?,
        Command::Token(command) => tokens::token(settings, command).await?,
    }
    Ok(ExitCode::SUCCESS)
}
