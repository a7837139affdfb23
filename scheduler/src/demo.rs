//! `sieve demo`: the active-learning loop on Fashion-MNIST, end to end.
//!
//! Images go in through the normal ingest path; simulated reviewers answer
//! review tasks through the real HTTP review API from the ground truth (read
//! from the exported file's name — the only place the truth is used besides
//! the final scoring); retraining goes through the real training path. The
//! scheduler (`sieve serve`) and workers must be running.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use sea_orm::{EntityTrait, FromQueryResult, Statement};
use serde::Serialize;
use uuid::Uuid;

use crate::app::Context;
use crate::auth;
use crate::entities::api_token::Role;
use crate::entities::training_run::{self, RunState};
use crate::fashion_mnist::{self, Split};
use crate::ingest;
use crate::policy::Policy;
use crate::projects::{self, ClassNames, Project, ProjectName};
use crate::review::{ClaimedTask, SubmittedLabel};
use crate::status;

#[derive(Clone, Debug, Args)]
pub struct DemoArgs {
    /// A couple of minutes on a few thousand images (2,000 images, 3 rounds
    /// of 300 labels); overrides --images, --rounds and --labels-per-round.
    #[arg(long)]
    pub quick: bool,
    /// Chance that a simulated reviewer answers a wrong class (noisy
    /// reviewers); 0 answers from the ground truth every time.
    #[arg(long, default_value_t = 0.0)]
    pub reviewer_error_rate: f64,
    /// Fashion-MNIST training images to label.
    #[arg(long, default_value_t = 300)]
    pub images: usize,
    /// Project name (default: fashion-mnist-<time>).
    #[arg(long)]
    pub project: Option<String>,
    /// Human labels per round before retraining.
    #[arg(long, default_value_t = 100)]
    pub labels_per_round: usize,
    /// Retraining rounds.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Simulated reviewers working at once.
    #[arg(long, default_value_t = 2)]
    pub reviewers: usize,
    /// Confidence under which items go to review.
    #[arg(long, default_value_t = 0.9)]
    pub threshold: f32,
    /// Calibrate per-class thresholds to this machine-label accuracy
    /// instead of using `--threshold` (e.g. 0.97).
    #[arg(long)]
    pub target_accuracy: Option<f64>,
    /// Share of would-be machine labels audited by the reviewers.
    #[arg(long, default_value_t = 0.02)]
    pub audit_rate: f64,
    /// Where the Fashion-MNIST IDX files are.
    #[arg(long, default_value = fashion_mnist::DEFAULT_DIR)]
    pub data_dir: PathBuf,
    /// Where exported images and the report go.
    #[arg(long, default_value = "sieve-demo")]
    pub work_dir: PathBuf,
    /// Give up waiting for the fleet after this long per step.
    #[arg(long, default_value_t = 600)]
    pub step_timeout_secs: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DemoReport {
    pub project: String,
    pub images: usize,
    pub rounds: usize,
    pub human_labels: i64,
    pub machine_labels: i64,
    pub still_in_review: i64,
    pub failed: i64,
    /// Share of items labeled by machine, never to be seen by a human.
    pub effort_saved: f64,
    /// Accuracy of machine labels against the ground truth.
    pub machine_label_accuracy: Option<f64>,
    /// Human labels equal to the ground truth (1.0 for error-free reviewers).
    pub human_label_accuracy: Option<f64>,
    pub model_versions: usize,
    pub seconds: f64,
    /// Labels after each review round (before its retrain) and at the end.
    pub history: Vec<RoundFigures>,
    /// Holdout accuracy of each model version.
    pub versions: Vec<VersionFigures>,
    /// Reliability of the active version on its holdout: per confidence
    /// bin, the mean confidence and the accuracy.
    pub reliability: Vec<ReliabilityBin>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RoundFigures {
    pub round: usize,
    pub human_labels: i64,
    pub machine_labels: i64,
    pub in_review: i64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VersionFigures {
    pub version: i32,
    pub holdout_accuracy: Option<f64>,
    pub holdout_size: Option<u32>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ReliabilityBin {
    pub mean_confidence: f64,
    pub accuracy: f64,
    pub count: usize,
}

struct Api {
    http: reqwest::Client,
    base: String,
    reviewer_token: String,
    ml_token: String,
}

impl Api {
    async fn claim(&self, project: &str) -> anyhow::Result<Option<ClaimedTask>> {
        let response = self
            .http
            .post(format!(
                "{}/api/v1/projects/{project}/review/next",
                self.base
            ))
            .bearer_auth(&self.reviewer_token)
            .send()
            .await
            .with_context(|| {
                format!(
                    "cannot reach the scheduler at {}: is `sieve serve` running?",
                    self.base
                )
            })?;
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Ok(Some(response.error_for_status()?.json().await?))
    }

    async fn submit(&self, task: &ClaimedTask, class: &str) -> anyhow::Result<SubmittedLabel> {
        Ok(self
            .http
            .post(format!(
                "{}/api/v1/review/{}/submit",
                self.base, task.task_id
            ))
            .bearer_auth(&self.reviewer_token)
            .json(&serde_json::json!({ "fencing_token": task.fencing_token, "class": class }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    async fn retrain(&self, project: &str) -> anyhow::Result<Uuid> {
        let response = self
            .http
            .post(format!("{}/api/v1/projects/{project}/retrain", self.base))
            .bearer_auth(&self.ml_token)
            .send()
            .await?;
        if !response.status().is_success() {
            let status = response.status();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            anyhow::bail!(
                "{status}: {}",
                body["error"]["message"].as_str().unwrap_or("no details")
            );
        }
        let body: serde_json::Value = response.json().await?;
        body["run_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .context("retrain response has no run id")
    }
}

async fn wait_for(
    what: &str,
    timeout: Duration,
    mut done: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done().await? {
        if start.elapsed() > timeout {
            bail!(
                "timed out after {timeout:?} waiting for {what}: are `sieve serve` and `sieve-worker` running?"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

impl DemoArgs {
    /// The settings `--quick` stands for.
    pub fn resolved(&self) -> Self {
        let mut args = self.clone();
        if args.quick {
            args.images = 2000;
            args.rounds = 3;
            args.labels_per_round = 300;
        }
        args
    }
}

pub async fn run(ctx: &Context, args: &DemoArgs) -> anyhow::Result<DemoReport> {
    let args = &args.resolved();
    let started = Instant::now();
    let timeout = Duration::from_secs(args.step_timeout_secs);
    let dataset = fashion_mnist::load(&args.data_dir, Split::Train, Some(args.images))?;
    let truth: Arc<Vec<u8>> = Arc::new(dataset.labels.clone());
    let image_dir = args.work_dir.join("images");
    let exported = fashion_mnist::export_png(&dataset, Split::Train, args.images, &image_dir)?;
    println!(
        "exported {exported} Fashion-MNIST images to {}",
        image_dir.display()
    );

    let name = args.project.clone().unwrap_or_else(|| {
        format!(
            "fashion-mnist-{}",
            chrono::Utc::now().format("%Y%m%d%H%M%S")
        )
    });
    let classes: Vec<String> = fashion_mnist::CLASSES
        .iter()
        .map(|c| c.to_string())
        .collect();
    let policy = Policy {
        confidence_threshold: args.threshold,
        target_accuracy: args.target_accuracy,
        audit_rate: args.audit_rate,
        ..Policy::default()
    };
    let project = projects::create_with_first_model(
        ctx,
        &ProjectName::parse(&name)?,
        &ClassNames::parse(&classes)?,
        &policy,
        "demo",
    )
    .await?;
    println!(
        "created project {}; waiting for its first model",
        project.name
    );
    let api = Api {
        http: reqwest::Client::new(),
        base: ctx.settings.http.api_url.trim_end_matches('/').to_owned(),
        reviewer_token: auth::create_token(&ctx.db, "demo-reviewers", Role::Reviewer).await?,
        ml_token: auth::create_token(&ctx.db, "demo-ml", Role::Ml).await?,
    };

    wait_for("the first model", timeout, async || {
        Ok(projects::get(&ctx.db, &name)
            .await?
            .active_model_version_id
            .is_some())
    })
    .await?;
    let project = projects::get(&ctx.db, &name).await?;
    let summary = ingest::ingest_folder(ctx, &project, &image_dir, false).await?;
    println!(
        "ingested {} images ({} new, {} failed)",
        summary.files_seen, summary.new_items, summary.failed
    );

    let mut history = Vec::new();
    for round in 1..=args.rounds {
        wait_until_predicted(ctx, &project, timeout).await?;
        let labeled = review_round(&api, &project, &truth, args).await?;
        let status = status::project_status(ctx, &project).await?;
        history.push(RoundFigures {
            round,
            human_labels: status.human_labeled,
            machine_labels: status.machine_labeled,
            in_review: status.items.get("in_review").copied().unwrap_or(0),
            seconds: started.elapsed().as_secs_f64(),
        });
        println!(
            "round {round}: reviewers labeled {labeled}; machine-labeled {}, human-labeled {}, open tasks {}",
            status.machine_labeled, status.human_labeled, status.review_open
        );
        if status.review_open == 0 {
            break;
        }
        let run_id = match api.retrain(&project.name).await {
            Ok(run_id) => run_id,
            Err(err) => {
                // Typically not enough labels for some class yet: review more.
                println!("round {round}: not retraining yet: {err:#}");
                continue;
            }
        };
        println!("round {round}: retraining (run {run_id})");
        wait_for("the training run", timeout, async || {
            let run = training_run::Entity::find_by_id(run_id)
                .one(&ctx.db)
                .await?
                .context("the training run vanished")?;
            match run.state {
                RunState::Succeeded => Ok(true),
                RunState::Failed | RunState::Cancelled => {
                    bail!("training run failed: {}", run.error.unwrap_or_default())
                }
                _ => Ok(false),
            }
        })
        .await?;
    }
    wait_until_predicted(ctx, &project, timeout).await?;

    let mut report = score(ctx, &project, &truth, args, started).await?;
    history.push(RoundFigures {
        round: history.len() + 1,
        human_labels: report.human_labels,
        machine_labels: report.machine_labels,
        in_review: report.still_in_review,
        seconds: report.seconds,
    });
    report.history = history;
    let (versions, reliability) = model_figures(ctx, &project).await?;
    report.versions = versions;
    report.reliability = reliability;
    std::fs::create_dir_all(&args.work_dir)?;
    let path = args.work_dir.join("report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    let html_path = args.work_dir.join("report.html");
    std::fs::write(&html_path, render_html(&report)?)?;
    println!(
        "\n{} images: {} labeled by machine, {} by humans, {} still in review, {} failed",
        report.images,
        report.machine_labels,
        report.human_labels,
        report.still_in_review,
        report.failed
    );
    println!(
        "human effort saved: {:.1}%; machine-label accuracy vs ground truth: {}",
        report.effort_saved * 100.0,
        report
            .machine_label_accuracy
            .map_or("n/a (no machine labels)".into(), |a| format!(
                "{:.1}%",
                a * 100.0
            ))
    );
    println!(
        "report written to {} and {}",
        path.display(),
        html_path.display()
    );
    Ok(report)
}

/// Wait until no item is waiting for a prediction by the active model.
/// Holdout accuracy per version, and the active version's reliability bins.
async fn model_figures(
    ctx: &Context,
    project: &Project,
) -> anyhow::Result<(Vec<VersionFigures>, Vec<ReliabilityBin>)> {
    let versions = crate::models::list(ctx, project)
        .await?
        .into_iter()
        .map(|v| VersionFigures {
            version: v.version,
            holdout_accuracy: v.holdout_accuracy,
            holdout_size: v.holdout_size,
        })
        .collect();
    let project = projects::get(&ctx.db, &project.id.to_string()).await?;
    let mut bins = vec![(0.0f64, 0usize, 0usize); 10];
    if let Some(active) = project.active_model_version_id {
        let metrics: sieve_shared::messages::HoldoutMetrics =
            crate::entities::model_version::Entity::find_by_id(active)
                .one(&ctx.db)
                .await?
                .and_then(|v| v.metrics)
                .and_then(|m| serde_json::from_value(m).ok())
                .unwrap_or_default();
        for e in &metrics.evaluations {
            let bin = ((e.confidence * 10.0) as usize).min(9);
            bins[bin].0 += f64::from(e.confidence);
            bins[bin].1 += 1;
            bins[bin].2 += usize::from(e.label == e.predicted);
        }
    }
    let reliability = bins
        .into_iter()
        .filter(|b| b.1 > 0)
        .map(|(sum, n, right)| ReliabilityBin {
            mean_confidence: sum / n as f64,
            accuracy: right as f64 / n as f64,
            count: n,
        })
        .collect();
    Ok((versions, reliability))
}

fn render_html(report: &DemoReport) -> anyhow::Result<String> {
    use crate::report::{Series, html, line_chart};
    let pct = |x: f64| format!("{:.1}%", x * 100.0);
    let headline = vec![
        ("images".to_owned(), report.images.to_string()),
        (
            "human effort saved (labeled by machine)".to_owned(),
            pct(report.effort_saved),
        ),
        (
            "machine-label accuracy vs ground truth".to_owned(),
            report.machine_label_accuracy.map_or("n/a".into(), pct),
        ),
        (
            "labeled by humans".to_owned(),
            report.human_labels.to_string(),
        ),
        (
            "still in review".to_owned(),
            report.still_in_review.to_string(),
        ),
        (
            "model versions".to_owned(),
            report.model_versions.to_string(),
        ),
        ("run time".to_owned(), format!("{:.0} s", report.seconds)),
    ];
    let round = |f: fn(&RoundFigures) -> i64| -> Vec<(f64, f64)> {
        report
            .history
            .iter()
            .map(|r| (r.round as f64, f(r) as f64))
            .collect()
    };
    let mut captions =
        vec!["After each review round, before its retrain; the last point is the end of the run."];
    let mut charts = vec![line_chart(
        "Items by who labeled them, per round",
        "round",
        "items",
        &[
            Series {
                name: "by machine",
                points: round(|r| r.machine_labels),
            },
            Series {
                name: "by humans",
                points: round(|r| r.human_labels),
            },
            Series {
                name: "in review",
                points: round(|r| r.in_review),
            },
        ],
    )?];
    let accuracy: Vec<(f64, f64)> = report
        .versions
        .iter()
        .filter_map(|v| v.holdout_accuracy.map(|a| (f64::from(v.version), a)))
        .collect();
    if !accuracy.is_empty() {
        captions.push(
            "Each version on the holdout of its own snapshot, which grows as reviewers label the items \
             the model found hardest: later holdouts are harder, so compare versions pairwise \
             (promotion measures the champion on the candidate's holdout).",
        );
        charts.push(line_chart(
            "Holdout accuracy per model version",
            "version",
            "accuracy",
            &[Series {
                name: "holdout accuracy",
                points: accuracy,
            }],
        )?);
    }
    if !report.reliability.is_empty() {
        captions.push(
            "Holdout examples binned by the committee's confidence: points under the diagonal \
             are over-confident.",
        );
        charts.push(line_chart(
            "Reliability of the active model (holdout)",
            "mean confidence",
            "accuracy",
            &[
                Series {
                    name: "model",
                    points: report
                        .reliability
                        .iter()
                        .map(|b| (b.mean_confidence, b.accuracy))
                        .collect(),
                },
                Series {
                    name: "perfect calibration",
                    points: vec![(0.0, 0.0), (1.0, 1.0)],
                },
            ],
        )?);
    }
    let captioned: Vec<(String, String)> = charts
        .into_iter()
        .zip(captions)
        .map(|(svg, caption)| (svg, caption.to_owned()))
        .collect();
    Ok(html(
        &format!("sieve demo: {}", report.project),
        &headline,
        &captioned,
    ))
}

#[derive(FromQueryResult)]
struct Waiting {
    n: i64,
}

/// Wait until every item that routing can still move has been predicted by
/// the project's active model (a rescore after an activation moves items
/// between review and machine labels without passing through `queued`).
async fn wait_until_predicted(
    ctx: &Context,
    project: &Project,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_for("predictions by the active model", timeout, async || {
        let project = projects::get(&ctx.db, &project.id.to_string()).await?;
        let Some(active) = project.active_model_version_id else {
            return Ok(false);
        };
        let waiting = Waiting::find_by_statement(Statement::from_sql_and_values(
            ctx.db.get_database_backend(),
            r#"
            SELECT count(*) AS n FROM items i
            WHERE i.project_id = $1 AND i.state IN ('queued', 'in_review', 'auto_labeled')
              AND NOT EXISTS (SELECT 1 FROM predictions p
                              WHERE p.item_id = i.id AND p.model_version_id = $2)
              AND NOT EXISTS (SELECT 1 FROM review_tasks t
                              WHERE t.item_id = i.id AND t.state = 'claimed')
            "#,
            [project.id.as_uuid().into(), active.into()],
        ))
        .one(&ctx.db)
        .await?
        .map_or(0, |w| w.n);
        Ok(waiting == 0)
    })
    .await
}

async fn review_round(
    api: &Api,
    project: &Project,
    truth: &Arc<Vec<u8>>,
    args: &DemoArgs,
) -> anyhow::Result<usize> {
    let budget = Arc::new(AtomicUsize::new(args.labels_per_round));
    let done = Arc::new(AtomicUsize::new(0));
    let reviewers = (0..args.reviewers.max(1)).map(|_| {
        let budget = budget.clone();
        let done = done.clone();
        let truth = truth.clone();
        async move {
            while budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                .is_ok()
            {
                let Some(task) = api.claim(&project.name).await? else {
                    break;
                };
                let (_, index) = fashion_mnist::index_of(&task.source)
                    .with_context(|| format!("cannot tell the image of {}", task.source))?;
                let mut answer = truth[index] as usize;
                if args.reviewer_error_rate > 0.0 {
                    use rand::Rng;
                    let mut rng = rand::rng();
                    if rng.random::<f64>() < args.reviewer_error_rate {
                        answer = (answer + rng.random_range(1..fashion_mnist::CLASSES.len()))
                            % fashion_mnist::CLASSES.len();
                    }
                }
                let class = fashion_mnist::CLASSES[answer];
                api.submit(&task, class).await?;
                done.fetch_add(1, Ordering::SeqCst);
            }
            anyhow::Ok(())
        }
    });
    for outcome in futures_util::future::join_all(reviewers).await {
        outcome?;
    }
    Ok(done.load(Ordering::SeqCst))
}

#[derive(FromQueryResult)]
struct FinalLabel {
    source: String,
    class_index: i32,
    label_source: String,
}

/// Score every labeled item's current label against the ground truth (items
/// back in review after a rescore have no current label).
async fn score(
    ctx: &Context,
    project: &Project,
    truth: &[u8],
    args: &DemoArgs,
    started: Instant,
) -> anyhow::Result<DemoReport> {
    let rows = FinalLabel::find_by_statement(Statement::from_sql_and_values(
        ctx.db.get_database_backend(),
        r#"
        SELECT DISTINCT ON (i.id) i.source, l.class_index, l.source AS label_source
        FROM items i JOIN labels l ON l.item_id = i.id
        WHERE i.project_id = $1 AND i.state IN ('auto_labeled', 'human_labeled')
        ORDER BY i.id, (l.source = 'human') DESC, l.created_at DESC
        "#,
        [project.id.as_uuid().into()],
    ))
    .all(&ctx.db)
    .await?;
    let mut tally: HashMap<&str, (u64, u64)> = HashMap::new();
    for row in &rows {
        let Some((_, index)) = fashion_mnist::index_of(&row.source) else {
            continue;
        };
        let entry = tally
            .entry(if row.label_source == "human" {
                "human"
            } else {
                "machine"
            })
            .or_default();
        entry.0 += 1;
        if truth.get(index).map(|&t| i32::from(t)) == Some(row.class_index) {
            entry.1 += 1;
        }
    }
    let accuracy = |k: &str| {
        tally
            .get(k)
            .filter(|t| t.0 > 0)
            .map(|t| t.1 as f64 / t.0 as f64)
    };
    let status = status::project_status(ctx, project).await?;
    let versions = crate::models::list(ctx, project).await?.len();
    let total = status.total_items.max(1) as f64;
    Ok(DemoReport {
        project: project.name.clone(),
        images: status.total_items as usize,
        rounds: args.rounds,
        human_labels: status.human_labeled,
        machine_labels: status.machine_labeled,
        still_in_review: status.items.get("in_review").copied().unwrap_or(0),
        failed: status.items.get("failed").copied().unwrap_or(0),
        // Only machine labels are effort saved: items still in review will
        // be seen by a human yet.
        effort_saved: status.machine_labeled as f64 / total,
        machine_label_accuracy: accuracy("machine"),
        human_label_accuracy: accuracy("human"),
        model_versions: versions,
        seconds: started.elapsed().as_secs_f64(),
        ..DemoReport::default()
    })
}
