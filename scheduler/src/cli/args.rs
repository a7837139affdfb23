//! What the `sieve` command line takes: every command and its flags, as
//! clap derives them. Parsing only; the commands run in the sibling files.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use sieve_shared::kind::TaskKind;
use sieve_shared::messages::{ModelArch, TrainMode};

use crate::entities::api_token::Role;

#[derive(Debug, Parser)]
#[command(
    name = "sieve",
    version,
    about = "Active-learning image labeling: scheduler and CLI"
)]
pub struct Cli {
    /// Settings file (default: ./sieve.toml if present). SIEVE_* variables override it.
    #[arg(long, global = true, env = "SIEVE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API, the result consumer and the training-event consumer.
    Serve,
    /// Create the database if needed and apply pending migrations.
    Migrate,
    /// Create, list and inspect projects.
    #[command(subcommand)]
    Project(ProjectCommand),
    /// Ingest a folder of images, an object-store prefix, or a CSV / JSON
    /// Lines manifest, into a project. Exits with status 2 if any file,
    /// object or row failed.
    Ingest {
        /// A folder to read recursively, `store:PREFIX` (objects under a
        /// prefix of sieve's store) or `s3://BUCKET/PREFIX` (a bucket,
        /// reached with the s3.* settings; its images are copied in).
        #[arg(
            value_name = "FOLDER|store:PREFIX|s3://BUCKET/PREFIX",
            required_unless_present_any = ["manifest", "annotations"],
            conflicts_with_all = ["manifest", "annotations"]
        )]
        source: Option<String>,
        #[arg(long, short)]
        project: String,
        /// A CSV (header with `path` or `key`, optional `label`,
        /// `external_id`) or JSON Lines manifest: a file, or `store:KEY`
        /// for one in sieve's store (its rows then name keys only).
        #[arg(long, value_name = "FILE|store:KEY", conflicts_with = "annotations")]
        manifest: Option<String>,
        /// Box annotations for a detection project: a Pascal VOC `.xml`
        /// file or a folder of them, a CSV
        /// (`image_path,xmin,ymin,xmax,ymax,label`) or a COCO `.json`. The
        /// images it names are ingested with their boxes as imported
        /// labels; any bad box refuses the whole file, each problem listed.
        #[arg(long, value_name = "FILE|FOLDER")]
        annotations: Option<PathBuf>,
        /// Directory that manifest or annotation paths are relative to
        /// (default: the file's directory); no path may leave it.
        #[arg(long)]
        root: Option<PathBuf>,
    },
    /// Export a project's labeled items, one row each with its label's
    /// provenance (who or which model, confidence, audits, measured
    /// accuracy), as CSV or JSON Lines: also a manifest `sieve ingest` reads.
    Export(ExportArgs),
    /// A project's ingests, newest first: from `sieve ingest` and over HTTP,
    /// with their counts and state (a running one whose process died reads
    /// as interrupted).
    Ingests {
        #[arg(long, short)]
        project: String,
        #[arg(long, default_value_t = 20)]
        limit: u64,
        #[arg(long)]
        json: bool,
    },
    /// A project's items a page at a time, one item's history, a label
    /// reported as wrong.
    #[command(subcommand)]
    Items(ItemsCommand),
    /// Queues, workers and projects at a glance (or one project in detail).
    Status {
        #[arg(long, short)]
        project: Option<String>,
        #[arg(long)]
        json: bool,
        /// Refresh every N seconds until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
    },
    /// Per reviewer of a project: labels (last hour, last day), sessions,
    /// labels per active hour, skips, undos, agreement with second opinions
    /// and reports, audits that agreed with the model.
    Reviewers {
        #[arg(long, short)]
        project: String,
        /// Count only what happened this long ago or since (`90m`, `24h`,
        /// `7d`); default: all time.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Workers from their heartbeats; one that stopped beating shows as LOST.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// Claim and submit review tasks.
    #[command(subcommand)]
    Review(ReviewCommand),
    /// Queue a training run from the project's human labels, or show runs.
    Retrain(RetrainArgs),
    /// List, promote and roll back model versions.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Failed items and dead letters: list, retry, purge.
    #[command(subcommand)]
    Failed(FailedCommand),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(long, short)]
    pub project: String,
    /// `csv`, `jsonl`, `coco` (COCO JSON), or a directory (needs --out
    /// DIR): `imagefolder` (a folder of images per class and labels.csv),
    /// `yolo` (box projects), `blurred` (box projects: every box of each
    /// image blurred, COCO annotations beside; labeled items only).
    #[arg(long, short, default_value = "csv")]
    pub format: String,
    /// A file (written under a temporary name, renamed when complete), or
    /// `-` for standard output (the default).
    #[arg(long, short)]
    pub out: Option<String>,
    /// Only labels from `human`, `machine` or `import` (repeatable).
    #[arg(long)]
    pub source: Vec<String>,
    /// Items in these states (repeatable; default `auto_labeled` and
    /// `human_labeled`): `queued`, `in_review`, `failed` too on request.
    #[arg(long)]
    pub state: Vec<String>,
    /// Only labels whose prediction is at least this confident (0 to 1);
    /// leaves out imports, which have none.
    #[arg(long)]
    pub min_confidence: Option<String>,
    /// Only these classes (repeatable).
    #[arg(long)]
    pub class: Vec<String>,
    /// Only labels given since the cursor an earlier export printed.
    #[arg(long, value_name = "CURSOR")]
    pub since: Option<String>,
    /// `--format blurred`: `gaussian` (the default) or `pixelate`.
    #[arg(long, value_name = "STYLE")]
    pub blur: Option<String>,
    /// `--format blurred`: gaussian σ as a fraction of the box's longer
    /// side (default 0.15), or pixelate's cells along it (default 6).
    #[arg(long)]
    pub blur_strength: Option<f32>,
    /// `--format blurred`: grown on each side first, as a fraction of the
    /// box's width and height (default 0.1).
    #[arg(long)]
    pub blur_padding: Option<f32>,
}

#[derive(Debug, Subcommand)]
pub enum ItemsCommand {
    /// Items of a project in id order, a page at a time, with filters.
    List {
        #[arg(long, short)]
        project: String,
        /// Items in these states (repeatable): queued, in_review,
        /// auto_labeled, human_labeled, failed.
        #[arg(long)]
        state: Vec<String>,
        /// Whose current label is this class (repeatable).
        #[arg(long)]
        class: Vec<String>,
        /// Whose current label is from `human`, `machine` or `import`
        /// (repeatable).
        #[arg(long)]
        source: Vec<String>,
        /// Whose newest prediction is at most this confident (0 to 1).
        #[arg(long)]
        max_confidence: Option<String>,
        /// The next page: the cursor the page before printed.
        #[arg(long)]
        cursor: Option<String>,
        /// Items per page (1 to 500; default 50).
        #[arg(long)]
        limit: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One item: every prediction, label and review task.
    Show {
        item: String,
        #[arg(long)]
        json: bool,
    },
    /// Send a machine or imported label back to review, first in the queue
    /// (`--force`: a label by people too).
    Reopen {
        item: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        force: bool,
        /// The name the report is recorded under.
        #[arg(long, default_value = "cli")]
        reporter: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Create a project. A classification project's first model is queued
    /// at once; a detection project's images go to people until a detector
    /// has trained on their boxes (or imported annotations); a deidentify
    /// project starts with the pretrained face detector.
    Create {
        name: String,
        /// What is labeled: `classification` (one class per image),
        /// `detection` (boxes, each with a class) or `deidentify` (boxes
        /// around faces and plates, delivered blurred).
        #[arg(long = "task", default_value_t = TaskKind::Classification)]
        task: TaskKind,
        /// Class names, comma separated (a deidentify project's default:
        /// face,plate; its first class is face).
        #[arg(long, value_delimiter = ',')]
        classes: Vec<String>,
        /// Confidence under which an item goes to human review.
        #[arg(long)]
        threshold: Option<f32>,
        /// What the project's models are built on: `small_cnn` (trained
        /// whole, fast on a CPU), `res_cnn` (the same with two residual
        /// blocks: more labeled by machine for 2.5 times the training
        /// time) or `mobilenet_v2` (a frozen ImageNet
        /// backbone with trained heads; suits GPU workers, which need its
        /// weights: docs/operations.md). A detection project runs
        /// `detector` (the default for it). Fixed for the project's life.
        #[arg(long, default_value_t = ModelArch::SmallCnn)]
        arch: ModelArch,
        /// A project for measuring sieve itself: allows `--arch null`
        /// (constant answers, no model work).
        #[arg(long)]
        measurement_only: bool,
    },
    List,
    Show {
        name: String,
    },
    /// Stop publishing prediction jobs for a project; ingest still records
    /// its items, and they go out on resume.
    Pause {
        name: String,
    },
    /// Publish again, starting with every item that waited while paused.
    Resume {
        name: String,
    },
    /// Show or change how a project's jobs are dispatched.
    Dispatch {
        name: String,
        /// Jobs per second at most; `none` removes the limit.
        #[arg(long)]
        rate_limit: Option<String>,
        /// 0 to 9, higher first (the sweeper's order; jobs carry it).
        #[arg(long)]
        priority: Option<i16>,
    },
    /// Show or change where the project's scoped tokens may ingest from
    /// (tokens for every project are not held to it).
    Sources {
        name: String,
        /// A location to allow: `store:PREFIX` or `s3://BUCKET/PREFIX`
        /// (repeatable).
        #[arg(long)]
        allow: Vec<String>,
        /// A location to take off the list (repeatable).
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Show or change a detection or deidentify project's tile size and
    /// proposal threshold. They apply from the project's next training run
    /// (`sieve retrain`); the active version keeps its own.
    Boxes {
        name: String,
        /// Tile side in pixels the detector heads train and run at: a
        /// multiple of 32 from 64 to 1024 (default 384); `none` puts the
        /// default back.
        #[arg(long)]
        tile_size: Option<String>,
        /// Confidence from which the committee proposes an object, 0.1 to
        /// 0.95 (default 0.5; a deidentify project's plates 0.35); `none`
        /// puts the default back.
        #[arg(long)]
        proposal_threshold: Option<String>,
    },
    /// Show or change a project's routing policy (each change is a new
    /// policy version; the active model is recalibrated for it).
    Policy {
        name: String,
        /// Fixed confidence threshold (used without a target accuracy).
        #[arg(long)]
        threshold: Option<f32>,
        /// Calibrate per-class thresholds to this machine-label accuracy
        /// (e.g. 0.97); `none` goes back to the fixed threshold.
        #[arg(long)]
        target_accuracy: Option<String>,
        /// Confidence level of the accuracy's lower bound (Wilson).
        #[arg(long)]
        confidence_level: Option<f64>,
        /// Share of items (a fixed sample, chosen by hash) that people
        /// review whatever the model says: audits of would-be machine labels
        /// and the evidence calibration rests on.
        #[arg(long)]
        audit_rate: Option<f64>,
        #[arg(long)]
        disagreement_limit: Option<f32>,
        /// `vote` or `mutual_information`.
        #[arg(long)]
        disagreement_measure: Option<String>,
        /// Retrain automatically after every N new human labels; `none`
        /// turns it off.
        #[arg(long)]
        retrain_every: Option<String>,
        /// Let a class short of calibration evidence borrow the threshold
        /// calibrated on all classes together (true or false).
        #[arg(long)]
        pool_evidence: Option<bool>,
        /// Second opinion on a reviewer's label that disagrees with a model
        /// at least this confident (e.g. 0.95); `none` turns it off.
        #[arg(long)]
        second_review_confidence: Option<String>,
        /// A box project's second target, beside --target-accuracy: the
        /// share of the boxes in machine-accepted images that are right
        /// (e.g. 0.95); `none` turns it off.
        #[arg(long)]
        target_precision: Option<String>,
        /// The same for recall: the share of the boxes people would draw
        /// in machine-accepted images that the proposal has (e.g. 0.99);
        /// `none` turns it off.
        #[arg(long)]
        target_recall: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReviewCommand {
    /// Claim the most uncertain open task.
    Next {
        #[arg(long, short)]
        project: String,
        #[arg(long, default_value = "cli")]
        reviewer: String,
    },
    /// Submit a label for a claimed task.
    Submit {
        task: String,
        /// The fencing token `review next` printed.
        #[arg(long)]
        token: i64,
        /// Class name or index.
        #[arg(long)]
        class: String,
        #[arg(long, default_value = "cli")]
        reviewer: String,
        /// Label it even if people already labeled the item (the CLI has
        /// the database's own authority, like an admin token).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RetrainArgs {
    #[arg(long, short)]
    pub(super) project: Option<String>,
    /// Also train on the project's machine labels (self-training; only items
    /// of the training split, never the holdout). Off by default: machine
    /// labels enter training only when a run asks.
    #[arg(long)]
    pub(super) machine_labels: bool,
    /// `full` fine-tunes a MobileNetV2 project's backbone with its heads, from
    /// the active version's weights (minutes per thousand images on a CPU);
    /// default: the architecture's own mode (heads for MobileNetV2).
    #[arg(long, value_enum)]
    pub(super) mode: Option<ModeArg>,
    /// With `--mode full` on MobileNetV2: train only the last N of its 17
    /// blocks (and its final convolution and the heads), keep the rest frozen.
    #[arg(long, value_name = "N")]
    pub(super) unfreeze_last: Option<u32>,
    /// Upper bound on epochs (default: the mode's; early stopping may end
    /// a run sooner).
    #[arg(long)]
    pub(super) epochs: Option<u32>,
    /// A detection or deidentify project's tile side in pixels (a multiple
    /// of 32 from 64 to 1024; default 384).
    #[arg(long, value_name = "PIXELS")]
    pub(super) tile_size: Option<u32>,
    #[command(subcommand)]
    pub(super) command: Option<RetrainCommand>,
}

/// A training mode on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ModeArg {
    Heads,
    Full,
}

impl From<ModeArg> for TrainMode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::Heads => TrainMode::Heads,
            ModeArg::Full => TrainMode::Full,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum RetrainCommand {
    /// Training runs of a project, newest first.
    Status {
        #[arg(long, short)]
        project: String,
    },
    /// Cancel the project's queued or running training run: it ends
    /// `cancelled`, its version is never registered, the champion stays.
    Cancel {
        #[arg(long, short)]
        project: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    List {
        #[arg(long, short)]
        project: String,
    },
    /// One version: holdout accuracy, per-class precision / recall,
    /// expected calibration error, and the share the project's policy would
    /// label by machine with it.
    Show {
        #[arg(long, short)]
        project: String,
        version: i32,
        #[arg(long)]
        json: bool,
    },
    /// Activate a version by number.
    Promote {
        #[arg(long, short)]
        project: String,
        version: i32,
    },
    /// Re-activate the previously active version.
    Rollback {
        #[arg(long, short)]
        project: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum FailedCommand {
    /// Failed items of a project (with --project) and the dead letters.
    List {
        #[arg(long, short)]
        project: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Send failed items (with --project) or dead letters back through the
    /// normal path. `--reason` narrows it: a substring of the item error, or
    /// a dead-letter reason (`rejected`, `delivery_limit`).
    Retry {
        #[arg(long, short)]
        project: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        /// Only the dead letter at this position of `failed list`.
        #[arg(long, conflicts_with_all = ["project", "reason"])]
        position: Option<usize>,
    },
    /// One dead letter in full: origin, reason and its decoded body.
    Show {
        /// Position, as `failed list` numbers them (1 is the oldest).
        position: usize,
    },
    /// Drop every dead letter.
    Purge {
        /// Confirm: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; it is printed once and stored only as a hash.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Let the token act only on this project (others answer 404).
        #[arg(long)]
        project: Option<String>,
        /// Stop working after this long (`90d`, `12h`, `30m`); default: never.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
    },
    /// Every token: id, name, role, project, active / expired / revoked.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id (or by name, when only one token has it): it
    /// gets 401 from its next request on.
    Revoke { token: String },
}

fn parse_role(raw: &str) -> Result<Role, String> {
    match raw {
        "reviewer" => Ok(Role::Reviewer),
        "ml" => Ok(Role::Ml),
        "ops" => Ok(Role::Ops),
        "admin" => Ok(Role::Admin),
        other => Err(format!(
            "unknown role {other:?}: use reviewer, ml, ops or admin"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(args: &[&str]) -> Result<ModelArch, clap::Error> {
        let argv = ["sieve", "project", "create", "p", "--classes", "a,b"]
            .iter()
            .chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Project(ProjectCommand::Create { arch, .. }) => Ok(arch),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn project_create_takes_an_architecture() {
        assert!(matches!(create(&[]), Ok(ModelArch::SmallCnn)));
        assert!(matches!(
            create(&["--arch", "mobilenet_v2"]),
            Ok(ModelArch::MobilenetV2)
        ));
        assert!(matches!(
            create(&["--arch", "res_cnn"]),
            Ok(ModelArch::ResCnn)
        ));
        let message = match create(&["--arch", "resnet50"]) {
            Err(err) => err.to_string(),
            Ok(arch) => panic!("resnet50 parsed as {arch}"),
        };
        assert!(
            message.contains("resnet50")
                && message.contains("small_cnn")
                && message.contains("mobilenet_v2"),
            "{message}"
        );
    }
}
