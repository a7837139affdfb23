//! `sieve-tools bench claim`: the review queue under many reviewers at once.
//!
//! In a fresh database of its own, it opens `--tasks` review tasks (each on
//! an item with a prediction, as routing leaves them), then runs
//! `--reviewers` tokio tasks that each claim and submit in a loop, with no
//! pause, until the queue is empty. They call the same functions the HTTP
//! handlers call (`review::claim_next`, `review::submit`) through the same
//! two pools the server has: `--claim-pool` connections for claims and
//! `--pool` for submits (`--claim-pool 0`: claims share the submits' pool,
//! as before the server had two). This measures the queue in PostgreSQL,
//! not HTTP. A lone reviewer on a separate project first gives the
//! uncontended baseline of the same operations; `--compare-shared` also
//! drains a second queue of the same size with one shared pool.
//!
//! Afterwards the database is checked: every task done, claimed exactly once
//! (its fencing token is 1, so no lease was ever taken over), one label per
//! task written by the reviewer who held the claim, and no task handed to
//! two reviewers (the claims seen by the reviewers are all distinct).
//! With no pause (`--think-ms 0`) reviewers run closed-loop, so by Little's
//! law the mean time of a claim plus a submit is about
//! `reviewers / throughput`: the latency figures are what a queue saturated
//! by `--reviewers` callers looks like. With a pause, each reviewer offers
//! about one claim per pause, as people do, and like people they do not
//! move in lockstep: each starts at a random moment within the first pause
//! and each pause lasts a random 50-150% of `--think-ms`. (With one fixed
//! pause and a common start, all reviewers would claim within the same few
//! milliseconds every pause, and the tail would measure that burst.)

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::Args;
use rand::Rng;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, FromQueryResult, Statement};
use sieve_shared::Settings;
use sieve_shared::ids::TaskId;
use sieve_shared::messages::ModelArch;
use sieve_shared::settings::DatabaseSettings;
use uuid::Uuid;

use sieve_scheduler::db;
use sieve_scheduler::error::AppError;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_scheduler::review::{self, Submission};

#[derive(Debug, Clone, Args)]
pub struct ClaimArgs {
    /// Open review tasks to drain.
    #[arg(long, default_value_t = 100_000)]
    pub tasks: u64,
    /// Concurrent reviewers, each claiming and submitting in a loop.
    #[arg(long, default_value_t = 200)]
    pub reviewers: usize,
    /// PostgreSQL connections shared by the reviewers.
    #[arg(long, default_value_t = 16)]
    pub pool: u32,
    /// PostgreSQL connections for claims only, as `database.claim_connections`
    /// gives the server (0: claims share `--pool`).
    #[arg(long, default_value_t = 4)]
    pub claim_pool: u32,
    /// Also drain a second queue of `--tasks` with claims and submits
    /// sharing one pool of `--pool` connections, to compare in the same run.
    #[arg(long)]
    pub compare_shared: bool,
    /// Tasks a lone reviewer claims and submits first (the baseline).
    #[arg(long, default_value_t = 1_000)]
    pub baseline: u64,
    /// Each reviewer pauses about this long (50-150% of it, at random)
    /// between a claim and its submit, as a person looking at the image
    /// would (0: closed loop, no pause).
    #[arg(long, default_value_t = 0)]
    pub think_ms: u64,
    /// Keep the benchmark database afterwards (its name is printed).
    #[arg(long)]
    pub keep_database: bool,
}

const CLASSES: [&str; 3] = ["cat", "dog", "bird"];
/// Longer than any run: no lease expires, so a second claim of a task can
/// only be a double claim.
const LEASE: Duration = Duration::from_secs(3600);

/// What one phase measured.
#[derive(Debug, Default, serde::Serialize)]
pub struct Phase {
    pub reviewers: usize,
    pub tasks: u64,
    pub seconds: f64,
    pub claims_per_second: f64,
    pub claim: Percentiles,
    pub submit: Percentiles,
    pub errors: u64,
}

/// What one reviewer saw.
#[derive(Default)]
struct Tally {
    claims: Vec<Duration>,
    submits: Vec<Duration>,
    claimed: Vec<Uuid>,
    errors: u64,
    first_error: Option<String>,
}

pub async fn run(settings: &Settings, args: &ClaimArgs) -> anyhow::Result<()> {
    ensure!(args.reviewers > 0, "--reviewers must be at least 1");
    ensure!(args.pool > 0, "--pool must be at least 1");
    let id = Uuid::now_v7().simple().to_string();
    let name = format!("sieve_bench_claim_{}", &id[id.len() - 12..]);
    let url = database_url(&settings.database.url, &name)?;
    db::create_database_if_missing(&url).await?;
    let outcome = bench(&url, args).await;
    if args.keep_database {
        println!("kept database {name}");
    } else {
        db::drop_database(&url).await?;
    }
    outcome
}

async fn bench(url: &str, args: &ClaimArgs) -> anyhow::Result<()> {
    let settings = DatabaseSettings {
        url: url.to_owned(),
        max_connections: args.pool,
        claim_connections: args.claim_pool,
    };
    let conn = db::connect(&settings).await?;
    let claims = if args.claim_pool == 0 {
        conn.clone()
    } else {
        db::connect_claims(&settings).await?
    };
    db::migrate(&conn).await?;
    let started = Instant::now();
    let baseline = seed(&conn, "baseline", args.baseline).await?;
    let project = seed(&conn, "claims", args.tasks).await?;
    let shared_queue = if args.compare_shared {
        Some(seed(&conn, "shared", args.tasks).await?)
    } else {
        None
    };
    conn.execute_unprepared("VACUUM ANALYZE").await?;
    println!(
        "seeded {} + {}{} open review tasks in {:.1} s (database {})",
        args.baseline,
        args.tasks,
        if args.compare_shared { " × 2" } else { "" },
        started.elapsed().as_secs_f64(),
        url.rsplit('/').next().unwrap_or(url)
    );

    let think = Duration::from_millis(args.think_ms);
    let pools = Pools {
        claims: &claims,
        submits: &conn,
    };
    println!("load average before: {}", load_average());
    let lone = drain(pools, &baseline, 1, Duration::ZERO).await?;
    report("baseline, 1 reviewer, no pause", &lone.0);
    let (phase, claimed) = drain(pools, &project, args.reviewers, think).await?;
    let pooling = if args.claim_pool == 0 {
        format!("one shared pool of {}", args.pool)
    } else {
        format!(
            "{} claim + {} submit connections",
            args.claim_pool, args.pool
        )
    };
    report(
        &format!(
            "{} reviewers, {} ms pause, {pooling}",
            args.reviewers, args.think_ms
        ),
        &phase,
    );
    let mut checked = verify(&conn, &project, &claimed).await;
    let shared = match &shared_queue {
        Some(queue) => {
            let one = Pools {
                claims: &conn,
                submits: &conn,
            };
            let (shared, claimed) = drain(one, queue, args.reviewers, think).await?;
            report(
                &format!(
                    "{} reviewers, {} ms pause, one shared pool of {} (comparison)",
                    args.reviewers, args.think_ms, args.pool
                ),
                &shared,
            );
            checked = checked.and(verify(&conn, queue, &claimed).await);
            Some(shared)
        }
        None => None,
    };
    conn.close().await.ok();
    claims.close().await.ok();
    println!(
        "{}",
        serde_json::to_string(&serde_json::json!({
            "pool": args.pool,
            "claim_pool": args.claim_pool,
            "think_ms": args.think_ms,
            "baseline": lone.0,
            "concurrent": phase,
            "shared_pool": shared,
            "double_claims_checked": checked.is_ok(),
        }))?
    );
    checked
}

/// Where claims and submits get their connections (one pool for both when
/// they are the same).
#[derive(Clone, Copy)]
struct Pools<'a> {
    claims: &'a DatabaseConnection,
    submits: &'a DatabaseConnection,
}

fn report(what: &str, phase: &Phase) {
    println!(
        "{what}: {} tasks in {:.1} s = {:.0} claims/s (each with its submit); errors {}",
        phase.tasks, phase.seconds, phase.claims_per_second, phase.errors
    );
    println!("  claim  {}", phase.claim);
    println!("  submit {}", phase.submit);
    println!("  load average after: {}", load_average());
}

/// The machine's 1, 5 and 15 minute load averages (Linux), to read the
/// figures by: other work on the machine moves them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        },
    )
}

/// A project with `tasks` open review tasks, each on its own item with a
/// prediction by a registered model version, in random priority order.
async fn seed(db: &DatabaseConnection, name: &str, tasks: u64) -> anyhow::Result<Project> {
    let classes: Vec<String> = CLASSES.iter().map(|c| (*c).to_owned()).collect();
    let project = projects::create(
        db,
        &ProjectName::parse(name)?,
        &ClassNames::parse(&classes)?,
        &Policy::default(),
        ModelArch::SmallCnn,
        sieve_shared::kind::TaskKind::Classification,
    )
    .await?;
    let version = Uuid::now_v7();
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO model_versions (id, project_id, version, status) VALUES ($1, $2, 1, 'candidate')",
        [version.into(), project.id.as_uuid().into()],
    ))
    .await?;
    // In slices, so one statement never holds too much.
    let mut done = 0;
    while done < tasks {
        let n = (tasks - done).min(20_000);
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            r#"
            WITH s AS (
                SELECT g, gen_random_uuid() AS item, gen_random_uuid() AS pred,
                       gen_random_uuid() AS task
                FROM generate_series($3::bigint + 1, $3::bigint + $4::bigint) g
            ), i AS (
                INSERT INTO items (id, project_id, object_key, source, content_hash,
                                   size_bytes, width, height, state)
                SELECT item, $1, 'bench/' || g, 'bench/' || g || '.png',
                       lpad(to_hex(g), 64, '0'), 1000, 28, 28, 'in_review'
                FROM s
            ), p AS (
                INSERT INTO predictions (id, item_id, model_version_id, job_id, worker_id,
                    probabilities, member_votes, top_class, confidence, margin, entropy,
                    disagreement, mutual_information, routed_to)
                SELECT pred, item, $2, gen_random_uuid(), 'bench', '[0.5, 0.3, 0.2]',
                       '[0, 0, 1]', g % 3, 0.5, 0.2, 1.0, 0.33, 0.1, 'review'
                FROM s
            )
            INSERT INTO review_tasks (id, project_id, item_id, prediction_id, reason,
                                      priority, state, fencing_token)
            SELECT task, $1, item, pred, 'low_confidence', random(), 'open', 0 FROM s
            "#,
            [
                project.id.as_uuid().into(),
                version.into(),
                (done as i64).into(),
                (n as i64).into(),
            ],
        ))
        .await
        .with_context(|| format!("seeding {name}"))?;
        done += n;
    }
    Ok(project)
}

/// `reviewers` reviewers claim and submit until the queue of `project` is
/// empty.
async fn drain(
    pools: Pools<'_>,
    project: &Project,
    reviewers: usize,
    think: Duration,
) -> anyhow::Result<(Phase, Vec<Uuid>)> {
    let started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for n in 0..reviewers {
        let claims = pools.claims.clone();
        let submits = pools.submits.clone();
        let project = project.clone();
        running.spawn(async move {
            let pools = Pools {
                claims: &claims,
                submits: &submits,
            };
            review_loop(pools, &project, &format!("r{n}"), think).await
        });
    }
    let mut all = Tally::default();
    while let Some(done) = running.join_next().await {
        let tally = done.context("a reviewer panicked")?;
        all.claims.extend(tally.claims);
        all.submits.extend(tally.submits);
        all.claimed.extend(tally.claimed);
        all.errors += tally.errors;
        if all.first_error.is_none() {
            all.first_error = tally.first_error;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(err) = &all.first_error {
        println!("first error: {err}");
    }
    let tasks = all.claimed.len() as u64;
    Ok((
        Phase {
            reviewers,
            tasks,
            seconds,
            claims_per_second: tasks as f64 / seconds,
            claim: Percentiles::of(&mut all.claims),
            submit: Percentiles::of(&mut all.submits),
            errors: all.errors,
        },
        all.claimed,
    ))
}

async fn review_loop(
    pools: Pools<'_>,
    project: &Project,
    reviewer: &str,
    think: Duration,
) -> Tally {
    let mut tally = Tally::default();
    if !think.is_zero() {
        let start = think.mul_f64(rand::rng().random::<f64>());
        tokio::time::sleep(start).await;
    }
    // A few failures in a row (the pool timing out) end this reviewer; the
    // check afterwards then reports the tasks it left claimed.
    while tally.errors < 10 {
        let t = Instant::now();
        let claimed = review::claim_next(pools.claims, project, reviewer, LEASE).await;
        tally.claims.push(t.elapsed());
        let task = match claimed {
            Ok(Some(task)) => task,
            // Empty, or every open task is being claimed by someone else
            // right now (SKIP LOCKED): either way this reviewer is done.
            Ok(None) => break,
            Err(err) => {
                fail(&mut tally, err);
                continue;
            }
        };
        tally.claimed.push(task.task_id);
        let class = task
            .predicted_class
            .clone()
            .unwrap_or_else(|| CLASSES[0].to_owned());
        if !think.is_zero() {
            let pause = think.mul_f64(rand::rng().random_range(0.5..1.5));
            tokio::time::sleep(pause).await;
        }
        let t = Instant::now();
        let submitted = review::submit(
            pools.submits,
            TaskId::from_uuid(task.task_id),
            reviewer,
            &Submission {
                fencing_token: task.fencing_token,
                class,
                boxes: None,
                force: false,
            },
        )
        .await;
        tally.submits.push(t.elapsed());
        if let Err(err) = submitted {
            fail(&mut tally, err);
        }
    }
    tally
}

fn fail(tally: &mut Tally, err: AppError) {
    tally.errors += 1;
    tally.first_error.get_or_insert_with(|| err.to_string());
}

#[derive(Debug, FromQueryResult)]
struct Check {
    tasks: i64,
    not_done: i64,
    claimed_more_than_once: i64,
    labels: i64,
    labeled_tasks: i64,
    labeled_by_another: i64,
}

/// The database after the run: every task done, claimed once, labeled once
/// by its claimer; and the reviewers never saw one task twice.
async fn verify(
    db: &DatabaseConnection,
    project: &Project,
    claimed: &[Uuid],
) -> anyhow::Result<()> {
    let check = Check::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        r#"
        SELECT
          (SELECT count(*) FROM review_tasks WHERE project_id = $1) AS tasks,
          (SELECT count(*) FROM review_tasks WHERE project_id = $1 AND state <> 'done') AS not_done,
          (SELECT count(*) FROM review_tasks WHERE project_id = $1 AND fencing_token <> 1)
              AS claimed_more_than_once,
          (SELECT count(*) FROM labels l JOIN review_tasks t ON t.id = l.review_task_id
              WHERE t.project_id = $1) AS labels,
          (SELECT count(DISTINCT l.review_task_id) FROM labels l
              JOIN review_tasks t ON t.id = l.review_task_id WHERE t.project_id = $1)
              AS labeled_tasks,
          (SELECT count(*) FROM labels l JOIN review_tasks t ON t.id = l.review_task_id
              WHERE t.project_id = $1 AND l.reviewer IS DISTINCT FROM t.lease_holder)
              AS labeled_by_another
        "#,
        [project.id.as_uuid().into()],
    ))
    .one(db)
    .await?
    .context("the check query returned nothing")?;
    let distinct: HashSet<&Uuid> = claimed.iter().collect();
    let ok = check.not_done == 0
        && check.claimed_more_than_once == 0
        && check.labels == check.tasks
        && check.labeled_tasks == check.tasks
        && check.labeled_by_another == 0
        && distinct.len() == claimed.len()
        && claimed.len() as i64 == check.tasks;
    println!(
        "check: {} tasks, {} not done, {} claimed more than once, {} labels on {} tasks, \
         {} labeled by someone other than the claimer; {} claims seen, {} distinct: {}",
        check.tasks,
        check.not_done,
        check.claimed_more_than_once,
        check.labels,
        check.labeled_tasks,
        check.labeled_by_another,
        claimed.len(),
        distinct.len(),
        if ok { "zero double claims" } else { "FAILED" }
    );
    ensure!(ok, "the review queue check failed: {check:?}");
    Ok(())
}

/// A copy of `url` (PostgreSQL) that names the database `name` instead.
pub fn database_url(url: &str, name: &str) -> anyhow::Result<String> {
    let mut parsed =
        reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("database URL {url:?}: {e}"))?;
    parsed.set_path(&format!("/{name}"));
    Ok(parsed.to_string())
}

/// Latency percentiles of a sample, in milliseconds.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (sorted here).
    pub fn of(samples: &mut [std::time::Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |p: f64| {
            let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1].as_secs_f64() * 1000.0
        };
        Self {
            count: samples.len(),
            p50_ms: at(50.0),
            p90_ms: at(90.0),
            p99_ms: at(99.0),
            max_ms: at(100.0),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} p50={:.1} ms p90={:.1} ms p99={:.1} ms max={:.1} ms",
            self.count, self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let p = Percentiles::of(&mut samples);
        assert_eq!(p.count, 100);
        assert!((p.p50_ms - 50.0).abs() < 1e-9);
        assert!((p.p99_ms - 99.0).abs() < 1e-9);
        assert!((p.max_ms - 100.0).abs() < 1e-9);
        assert_eq!(Percentiles::of(&mut []).count, 0);
    }

    #[test]
    fn database_url_swaps_only_the_name() {
        assert_eq!(
            database_url(
                "postgres://postgres@127.0.0.1:5432/sieve?sslmode=disable",
                "b1"
            )
            .unwrap_or_default(),
            "postgres://postgres@127.0.0.1:5432/b1?sslmode=disable"
        );
    }
}
