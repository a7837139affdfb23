//! `sieve export`: a project's labeled dataset to a file or standard
//! output, with a progress bar on a terminal and a summary at the end.

use std::io::IsTerminal;

use sieve_shared::Settings;
use tokio_util::sync::CancellationToken;

use super::args::ExportArgs;
use crate::export::blur::{Blur, BlurStyle};
use crate::export::folder;
use crate::export::output::{self, Destination};
use crate::export::{Export, Filters, Format, Request};
use crate::{db, projects};

pub async fn export(settings: Settings, args: ExportArgs) -> anyhow::Result<()> {
    // Checked before connecting: a typo answers at once.
    let request = request(&args)?;
    let blur = blur(&args, request.format)?;
    let to = Destination::parse(args.out.as_deref());
    let folder = match (&to, request.format) {
        (Destination::File(dir), format) if format.is_folder() => Some(dir.clone()),
        (Destination::Stdout, format) if format.is_folder() => anyhow::bail!(
            "--format {} writes a directory: name it with --out DIR (not standard output)",
            format.name()
        ),
        _ => None,
    };
    let conn = db::connect(&settings.database).await?;
    let project = projects::get(&conn, &args.project).await?;
    let export = Export::begin(&conn, &project, request).await?;
    // Ctrl-C or SIGTERM stops between pages and leaves nothing at --out.
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        sieve_shared::shutdown::signal().await;
        stop.cancel();
    });
    let options = output::Options {
        terminal: std::io::stderr().is_terminal(),
        cancel,
    };
    let summary = match folder {
        Some(dir) => {
            let store =
                sieve_shared::store::Store::connect_existing(&settings.store, &settings.s3).await?;
            let (summary, placed) =
                folder::write_blurred(export, &store, &dir, options, blur).await?;
            if summary.format == Format::Blurred {
                eprintln!(
                    "images: {} written with every box blurred; {} beside them",
                    placed.copied,
                    folder::labels_file(summary.format)
                );
            } else {
                eprintln!(
                    "images: {} hard-linked from the store, {} copied; {} beside them",
                    placed.linked,
                    placed.copied,
                    folder::labels_file(summary.format)
                );
            }
            summary
        }
        None => output::write(export, &to, options).await?,
    };
    for line in summary.describe(&to.describe()) {
        eprintln!("{line}");
    }
    Ok(())
}

/// The same request, and the same messages for bad input, as the API's.
fn request(args: &ExportArgs) -> anyhow::Result<Request> {
    let mut filters = Filters::default();
    for source in &args.source {
        filters.add_source(source)?;
    }
    for state in &args.state {
        filters.add_state(state)?;
    }
    for class in &args.class {
        filters.add_class(class);
    }
    if let Some(min) = &args.min_confidence {
        filters.set_min_confidence(min)?;
    }
    if let Some(since) = &args.since {
        filters.set_since(since)?;
    }
    Ok(Request {
        format: Format::parse(&args.format)?,
        filters,
    })
}

/// The blur of a `blurred` export; its options are refused with any other
/// format rather than ignored.
fn blur(args: &ExportArgs, format: Format) -> anyhow::Result<Blur> {
    let given = args.blur.is_some() || args.blur_strength.is_some() || args.blur_padding.is_some();
    if format != Format::Blurred {
        anyhow::ensure!(
            !given,
            "--blur, --blur-strength and --blur-padding go with --format blurred, not {}",
            format.name()
        );
        return Ok(Blur::default());
    }
    let style = match &args.blur {
        Some(name) => BlurStyle::parse(name)?,
        None => BlurStyle::Gaussian,
    };
    Ok(Blur::new(style, args.blur_strength, args.blur_padding)?)
}
