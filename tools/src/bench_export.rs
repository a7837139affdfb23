//! `sieve-tools bench export`: how fast an export writes a large project's
//! labels to a file, and in how much memory, against a plain `COPY` of the
//! same rows measured in the same run.
//!
//! Each run makes its own database (`sieve_bench_export_<tag>`), fills it
//! with set-based SQL (a few statements over `generate_series`, not timed):
//! N items, 70% labeled by machine, 25% by people through review tasks (one
//! in twenty of those an audit), 5% imported; every item but the imports
//! has a prediction. Then, in order: `COPY (SELECT …) TO STDOUT` of the
//! export's own query (the same columns, joins and order: the database's
//! cost of these rows, as `COPY` sends them, CSV formatted by the server),
//! the export as CSV, as JSON Lines, and `COPY` again; the export is
//! compared with the faster `COPY`. `COPY` goes through sqlx's copy-out on
//! sea-orm's own pool and is written to a file like the exports, so both
//! sides pay for the same disk. The peak RSS of each phase is this
//! process's high-water mark, reset before the phase. The database and
//! the files are removed at the end.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::procstat::{peak_rss_kib, reset_peak_rss};
use anyhow::Context as _;
use futures_util::StreamExt;
use sea_orm::sqlx::postgres::PgPoolCopyExt;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use sieve_shared::Settings;
use sieve_shared::messages::ModelArch;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::bench_ingest::with_database;
use sieve_scheduler::db;
use sieve_scheduler::export::output::{self, Destination};
use sieve_scheduler::export::snapshot::ROWS;
use sieve_scheduler::export::{Export, Filters, Format, Request};
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};

const PROJECT: &str = "bench-export";
const CLASSES: usize = 10;

#[derive(Debug, clap::Args)]
pub struct BenchExportArgs {
    /// Items in the project, each with a label.
    #[arg(long, default_value_t = 1_000_000)]
    pub items: u64,
    /// Directory for the files written (default: the system temp dir);
    /// removed at the end.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Copy,
    Csv,
    Jsonl,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Copy => "COPY (SELECT …) TO STDOUT, csv",
            Phase::Csv => "sieve export, csv",
            Phase::Jsonl => "sieve export, jsonl",
        }
    }
}

struct Measured {
    phase: Phase,
    rows: u64,
    bytes: u64,
    seconds: f64,
    peak_rss_kib: u64,
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.rows as f64 / self.seconds.max(1e-9)
    }
}

pub async fn run(settings: Settings, args: &BenchExportArgs) -> anyhow::Result<()> {
    let id = Uuid::now_v7().simple().to_string();
    let tag = &id[id.len() - 12..];
    let mut settings = settings;
    settings.database.url =
        with_database(&settings.database.url, &format!("sieve_bench_export_{tag}"))?;
    let work = args
        .workdir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("sieve-bench-export-{tag}"));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    db::create_database_if_missing(&settings.database.url).await?;
    let outcome = bench(&settings, args, &work).await;

    let mut cleanup = Vec::new();
    if let Err(err) = db::drop_database(&settings.database.url).await {
        cleanup.push(format!("dropping the database: {err:#}"));
    }
    if let Err(err) = std::fs::remove_dir_all(&work) {
        cleanup.push(format!("removing {}: {err}", work.display()));
    }
    for problem in &cleanup {
        eprintln!("cleanup: {problem}");
    }
    outcome
}

async fn bench(settings: &Settings, args: &BenchExportArgs, work: &Path) -> anyhow::Result<()> {
    let conn = db::connect(&settings.database).await?;
    db::migrate(&conn).await?;
    let started = Instant::now();
    let project = fill(&conn, args.items).await?;
    eprintln!(
        "filled {} items with labels in {:.1}s (not timed)",
        args.items,
        started.elapsed().as_secs_f64()
    );

    let mut results = Vec::new();
    for phase in [Phase::Copy, Phase::Csv, Phase::Jsonl, Phase::Copy] {
        eprintln!("phase: {} ...", phase.label());
        let path = work.join("out");
        reset_peak_rss();
        let started = Instant::now();
        let rows = match phase {
            Phase::Copy => copy(&conn, &project, &path).await?,
            Phase::Csv => export(&conn, &project, Format::Csv, &path).await?,
            Phase::Jsonl => export(&conn, &project, Format::Jsonl, &path).await?,
        };
        let seconds = started.elapsed().as_secs_f64();
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        std::fs::remove_file(&path).ok();
        if rows != args.items {
            anyhow::bail!("{} wrote {rows} rows, not {}", phase.label(), args.items);
        }
        let measured = Measured {
            phase,
            rows,
            bytes,
            seconds,
            peak_rss_kib: peak_rss_kib(),
        };
        eprintln!(
            "  {} rows in {:.2}s: {:.0}/s, peak RSS {:.1} MB",
            measured.rows,
            measured.seconds,
            measured.per_second(),
            measured.peak_rss_kib as f64 / 1024.0
        );
        results.push(measured);
    }
    conn.close().await.ok();
    report(args.items, &results);
    Ok(())
}

/// The project and its items, labels, predictions and review tasks, as
/// ingest, routing and review would have left them: a handful of
/// statements, each over every item at once.
async fn fill(db: &DatabaseConnection, items: u64) -> anyhow::Result<Project> {
    let classes: Vec<String> = (0..CLASSES).map(|c| format!("class{c}")).collect();
    let project = projects::create(
        db,
        &ProjectName::parse(PROJECT)?,
        &ClassNames::parse(&classes)?,
        &Policy::default(),
        ModelArch::SmallCnn,
        sieve_shared::kind::TaskKind::Classification,
    )
    .await?;
    let version = Uuid::now_v7();
    let reviewer_token = Uuid::now_v7();
    let run = |sql: &str| {
        Statement::from_sql_and_values(
            db.get_database_backend(),
            sql,
            [
                project.id.as_uuid().into(),
                version.into(),
                (items as i64).into(),
                reviewer_token.into(),
            ],
        )
    };
    // Ids shaped like UUID v7 and ascending with g, as ingest's are in time;
    // each table has its own prefix. g % 20: 0-13 machine, 14-18 human
    // (14 an audit), 19 import.
    let statements = [
        "INSERT INTO model_versions (id, project_id, version, status) VALUES ($2, $1, 1, 'active')",
        r#"INSERT INTO items (id, project_id, object_key, source, content_hash, size_bytes,
                              width, height, state, created_at, updated_at)
           SELECT ('01900000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, $1,
                  'projects/bench/images/' || md5(g::text), 'photos/batch-' || (g / 1000) || '/img-' || g || '.png',
                  md5(g::text) || md5((g + 1)::text), 800, 28, 28,
                  CASE WHEN g % 20 < 14 THEN 'auto_labeled' ELSE 'human_labeled' END,
                  now() - make_interval(secs => ($3 - g) / 1000.0), now()
           FROM generate_series(1, $3::bigint) g"#,
        r#"INSERT INTO predictions (id, item_id, model_version_id, job_id, worker_id, probabilities,
                                    member_votes, top_class, confidence, margin, entropy,
                                    disagreement, mutual_information, routed_to, policy_version)
           SELECT ('01910000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid,
                  ('01900000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, $2,
                  ('01920000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, 'bench',
                  '[0.9,0.02,0.01,0.01,0.01,0.01,0.01,0.01,0.01,0.01]'::jsonb, '[3,3,3]'::jsonb,
                  g % 10, 0.5 + (g % 50) / 100.0, 0.3, 0.5, (g % 3) / 3.0, 0.05,
                  CASE WHEN g % 20 < 14 THEN 'auto_labeled' ELSE 'review' END, 1
           FROM generate_series(1, $3::bigint) g WHERE g % 20 <> 19"#,
        r#"INSERT INTO review_tasks (id, project_id, item_id, prediction_id, reason, priority, state,
                                     lease_holder, lease_holder_token, lease_expires_at,
                                     fencing_token, created_at, updated_at, closed_at)
           SELECT ('01930000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid, $1,
                  ('01900000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid,
                  ('01910000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid,
                  CASE WHEN g % 20 = 14 THEN 'audit' ELSE 'low_confidence' END, 0.5, 'done',
                  'alice', $4, now(), 1, now(), now(), now()
           FROM generate_series(1, $3::bigint) g WHERE g % 20 BETWEEN 14 AND 18"#,
        r#"INSERT INTO labels (id, item_id, class_index, source, reviewer, prediction_id,
                               model_version_id, review_task_id, created_at)
           SELECT ('01940000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid,
                  ('01900000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid,
                  CASE WHEN g % 20 = 15 THEN (g + 1) % 10 ELSE g % 10 END,
                  CASE WHEN g % 20 < 14 THEN 'machine' WHEN g % 20 < 19 THEN 'human' ELSE 'import' END,
                  CASE WHEN g % 20 BETWEEN 14 AND 18 THEN 'alice' END,
                  CASE WHEN g % 20 <> 19
                       THEN ('01910000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid END,
                  CASE WHEN g % 20 < 14 THEN $2 END,
                  CASE WHEN g % 20 BETWEEN 14 AND 18
                       THEN ('01930000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'))::uuid END,
                  now() - make_interval(secs => ($3 - g) / 1000.0)
           FROM generate_series(1, $3::bigint) g"#,
        "UPDATE projects SET active_model_version_id = $2 WHERE id = $1",
    ];
    for sql in statements {
        db.execute_raw(run(sql)).await?;
    }
    // As autovacuum would have left a table this old: statistics and the
    // visibility map (index-only scans).
    db.execute_unprepared("VACUUM ANALYZE").await?;
    Ok(projects::get(db, PROJECT).await?)
}

async fn export(
    db: &DatabaseConnection,
    project: &Project,
    format: Format,
    path: &Path,
) -> anyhow::Result<u64> {
    let request = Request {
        format,
        filters: Filters::default(),
    };
    let export = Export::begin(db, project, request).await?;
    let options = output::Options {
        terminal: false,
        cancel: CancellationToken::new(),
    };
    let summary = output::write(export, &Destination::File(path.to_owned()), options).await?;
    Ok(summary.rows)
}

/// The export's own query as a plain `COPY … TO STDOUT (FORMAT csv)`, its
/// parameters written in (COPY takes none): the default export's states,
/// no filter.
async fn copy(db: &DatabaseConnection, project: &Project, path: &Path) -> anyhow::Result<u64> {
    let query = ROWS
        .replace("$1", &format!("'{}'::uuid", project.id.as_uuid()))
        .replace("$2", "'auto_labeled,human_labeled'")
        .replace("$3", "NULL")
        .replace("$4", "NULL")
        .replace("$5", "NULL")
        .replace("$6", "NULL");
    let statement = format!("COPY ({query}) TO STDOUT (FORMAT csv, HEADER)");
    // A message per row arrives; written a megabyte at a time, as the
    // export writes a page at a time.
    let mut file =
        tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::create(path).await?);
    let mut stream = db
        .get_postgres_connection_pool()
        .copy_out_raw(&statement)
        .await?;
    let mut newlines = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        newlines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    file.get_ref().sync_all().await?;
    // Less the header; no field of these rows holds a line break.
    Ok(newlines.saturating_sub(1))
}

fn report(items: u64, results: &[Measured]) {
    println!(
        "sieve-tools bench export — {items} items, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<34} {:>9} {:>9} {:>10} {:>9} {:>12}",
        "phase", "rows", "seconds", "rows/s", "MB", "peak RSS MB"
    );
    for r in results {
        println!(
            "{:<34} {:>9} {:>9.2} {:>10.0} {:>9.1} {:>12.1}",
            r.phase.label(),
            r.rows,
            r.seconds,
            r.per_second(),
            r.bytes as f64 / 1e6,
            r.peak_rss_kib as f64 / 1024.0
        );
    }
    let copy = results
        .iter()
        .filter(|r| r.phase == Phase::Copy)
        .map(Measured::per_second)
        .fold(0.0, f64::max);
    for r in results.iter().filter(|r| r.phase != Phase::Copy) {
        let ratio = r.per_second() / copy.max(1e-9);
        let mb = r.peak_rss_kib as f64 / 1024.0;
        println!(
            "{}: {ratio:.2} × COPY (the faster run; target >= 0.5: {}), peak RSS {mb:.1} MB (target <= 100 MB: {})",
            r.phase.label(),
            if ratio >= 0.5 { "met" } else { "MISSED" },
            if mb <= 100.0 { "met" } else { "MISSED" },
        );
    }
}
