//! `sieve-tools demo --task detection`: the loop for boxes, end to end.
//!
//! A detection project starts without a model, so its images go to people
//! as seed tasks. Simulated reviewers take tasks through the real HTTP
//! review API and correct what they start from (the model's proposal, once
//! there is one) to the annotation, counting their edits; each round ends
//! with a retrain through the real training path (the detector's heads on
//! the frozen ImageNet MobileNetV2), whose version rescores what is left.
//!
//! Two data sets: the real tree crowns of `ops/fetch-tree-crowns.sh`, cut
//! into crops of the detector's input (each crop an image of the project,
//! its crowns the ones mostly inside it), or real Fashion-MNIST items on
//! canvases with exact boxes (`--boxes-data canvases`).
//!
//! Drawing effort is counted the way a reviewer spends it: starting from
//! the boxes shown, a box of the right class on the object (IoU ≥ 0.5)
//! costs nothing, a box on it of the wrong class one edit, a box moved
//! onto an object it overlaps (IoU under 0.5) one edit, an extra box one
//! deletion and a missed object one new box. Against that, the boxes they
//! would have drawn from nothing: one per object.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::ValueEnum;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use serde::Serialize;
use sieve_scheduler::auth;
use sieve_scheduler::context::Context;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::label::{self, LabelSource};
use sieve_scheduler::entities::model_version;
use sieve_scheduler::ingest::{self, annotations};
use sieve_scheduler::kind::TaskKind;
use sieve_scheduler::kind::detection;
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_scheduler::training;
use sieve_shared::box_scores;
use sieve_shared::boxes::LabeledBox;
use sieve_shared::messages::{HoldoutMetrics, ModelArch};
use sieve_shared::tiles;

use super::{Api, DemoArgs, wait_for_run, wait_until_predicted};
use crate::fashion_idx;

/// The detector's default input: each image of the demo is one tile.
const SIDE: u32 = 384;
/// Matching a box to an object, for edits and for precision and recall.
const IOU: f32 = 0.5;

/// Which boxes the detection demo labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxData {
    /// The real aerial tree crowns (deepforest's annotated images), cut into
    /// crops of the detector's input.
    #[default]
    Crowns,
    /// Real Fashion-MNIST items on canvases, exact boxes, ten classes.
    Canvases,
}

/// What the detection demo found, round by round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BoxReport {
    pub project: String,
    pub data: BoxData,
    pub images: usize,
    pub objects: usize,
    pub rounds: Vec<BoxRound>,
    /// The final figures: every image, machine-labeled or reviewed.
    pub machine_images: i64,
    pub human_images: i64,
    pub still_in_review: i64,
    /// Box edits reviewers made, and the boxes they would have drawn from
    /// nothing for the same images.
    pub edits: usize,
    pub boxes_reviewed: usize,
    /// 1 − edits / boxes from nothing, over the images people reviewed.
    pub drawing_saved: f64,
    /// Over every labeled image: 1 − (people's edits + the edits the
    /// machine-accepted images still need) / boxes from nothing.
    pub effort_saved: f64,
    pub seconds: f64,
}

/// The state after a round's retrain and rescore.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BoxRound {
    pub round: usize,
    /// The active version and its average precision at IoU 0.5 on its
    /// human holdout (`None` before any model).
    pub version: Option<i32>,
    pub average_precision: Option<f64>,
    pub human_images: i64,
    pub machine_images: i64,
    pub in_review: i64,
    /// Share of all images accepted by machine.
    pub machine_share: f64,
    /// The machine-accepted images' boxes against the annotations.
    pub machine_precision: Option<f64>,
    pub machine_recall: Option<f64>,
    /// Reviewers' edits so far, the boxes they would have drawn from
    /// nothing for those images, and the share of drawing that saved.
    pub edits: usize,
    pub boxes_reviewed: usize,
    pub drawing_saved: f64,
    /// The edits the machine-accepted images would still need to match
    /// their annotations (what the machine got wrong).
    pub machine_errors: usize,
    /// 1 − (edits + machine errors) / boxes from nothing, over every
    /// labeled image.
    pub effort_saved: f64,
    pub seconds: f64,
}

/// The annotation of every image, by file name.
pub(super) struct Truth {
    pub(super) classes: Vec<String>,
    pub(super) boxes: HashMap<String, Vec<LabeledBox>>,
}

impl Truth {
    pub(super) fn of(&self, source: &str) -> anyhow::Result<&Vec<LabeledBox>> {
        let name = Path::new(source)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(source);
        self.boxes
            .get(name)
            .with_context(|| format!("no annotation for {source}"))
    }
}

/// Write the demo's images to `dir` (afresh: what an earlier run left there
/// would be ingested too) and return their annotations. The images are the
/// same every time, so a resumed run ingests nothing new.
fn prepare(args: &DemoArgs, dir: &Path) -> anyhow::Result<Truth> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    match args.boxes_data {
        BoxData::Crowns => crowns(&args.crowns_dir, dir),
        BoxData::Canvases => canvases(&args.data_dir, args.images, dir),
    }
}

/// The tree crowns cut into crops of [`SIDE`], each with the crowns mostly
/// inside it.
fn crowns(source: &Path, dir: &Path) -> anyhow::Result<Truth> {
    let (_, images) = annotations::read(source).map_err(|errors| {
        anyhow::anyhow!(
            "{}: {} (run ops/fetch-tree-crowns.sh)",
            source.display(),
            errors.first().map(ToString::to_string).unwrap_or_default()
        )
    })?;
    let mut boxes = HashMap::new();
    for annotated in &images {
        let path = source.join(&annotated.path);
        let image = image::open(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .to_rgb8();
        let crowns: Vec<LabeledBox> = annotated
            .boxes
            .iter()
            .map(|b| LabeledBox {
                class: 0,
                x_min: b.x_min as f32,
                y_min: b.y_min as f32,
                x_max: b.x_max as f32,
                y_max: b.y_max as f32,
            })
            .collect();
        let stem = Path::new(&annotated.path)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("image");
        for tile in tiles::grid(image.width(), image.height(), SIDE, 0) {
            let name = format!("{stem}-{}-{}.png", tile.x, tile.y);
            image::imageops::crop_imm(&image, tile.x, tile.y, tile.width, tile.height)
                .to_image()
                .save(dir.join(&name))?;
            boxes.insert(name, tile.boxes_within(&crowns, 0.5));
        }
    }
    Ok(Truth {
        classes: vec!["tree".to_string()],
        boxes,
    })
}

/// `count` canvases of [`SIDE`] with up to six Fashion-MNIST items each.
fn canvases(data_dir: &Path, count: usize, dir: &Path) -> anyhow::Result<Truth> {
    let data = fashion_idx::load(data_dir, fashion_idx::Split::Train, None)?;
    let mut boxes = HashMap::new();
    for (i, canvas) in crate::canvases::canvases(&data, 0, count, SIDE, 6, 23)
        .into_iter()
        .enumerate()
    {
        let name = format!("canvas-{i:05}.png");
        canvas.image.save(dir.join(&name))?;
        boxes.insert(name, canvas.boxes);
    }
    Ok(Truth {
        classes: crate::fashion_mnist::CLASSES
            .iter()
            .map(|c| c.to_string())
            .collect(),
        boxes,
    })
}

/// The edits that turn `start` into `truth` (see the module's doc).
pub fn edits(start: &[LabeledBox], truth: &[LabeledBox]) -> usize {
    let mut start_left: Vec<bool> = vec![true; start.len()];
    let mut truth_left: Vec<bool> = vec![true; truth.len()];
    let mut cost = 0;
    // On the object: free if the class is right, one edit if not; then
    // overlapping it less: one move each.
    for (threshold, on_object) in [(IOU, true), (f32::MIN_POSITIVE, false)] {
        let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
        for (i, s) in start.iter().enumerate() {
            for (j, t) in truth.iter().enumerate() {
                let overlap = s.iou(t);
                if start_left[i] && truth_left[j] && overlap >= threshold {
                    pairs.push((overlap, i, j));
                }
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (_, i, j) in pairs {
            if start_left[i] && truth_left[j] {
                start_left[i] = false;
                truth_left[j] = false;
                cost += usize::from(!on_object || start[i].class != truth[j].class);
            }
        }
    }
    cost + start_left.iter().filter(|l| **l).count() + truth_left.iter().filter(|l| **l).count()
}

/// Run the detection demo: create the project, ingest, rounds of review
/// and retraining, the report.
pub async fn run(ctx: &Context, args: &DemoArgs, name: &str) -> anyhow::Result<BoxReport> {
    let started = Instant::now();
    let timeout = Duration::from_secs(args.step_timeout_secs);
    let image_dir = args.work_dir.join(match args.boxes_data {
        BoxData::Crowns => "crown-crops",
        BoxData::Canvases => "canvases",
    });
    let truth = prepare(args, &image_dir)?;
    let objects: usize = truth.boxes.values().map(Vec::len).sum();
    println!(
        "{} images ({objects} objects) of {:?} in {}",
        truth.boxes.len(),
        args.boxes_data,
        image_dir.display()
    );
    let project = match args.resume {
        true => projects::get(&ctx.db, name)
            .await
            .with_context(|| format!("cannot resume project {name}"))?,
        false => {
            training::create_project_of_kind(
                ctx,
                &ProjectName::parse(name)?,
                &ClassNames::parse_for(TaskKind::Detection, &truth.classes)?,
                &args.policy(),
                ModelArch::Detector,
                TaskKind::Detection,
                "demo",
            )
            .await?
        }
    };
    let summary = ingest::ingest_folder(ctx, &project, &image_dir, false).await?;
    println!(
        "ingested {} images ({} new, {} failed); they wait for people until a detector has trained",
        summary.files_seen, summary.new_items, summary.failed
    );
    let api = Api {
        http: reqwest::Client::new(),
        base: ctx.settings.http.api_url.trim_end_matches('/').to_owned(),
        reviewer_token: auth::create_token(&ctx.db, "demo-box-reviewers", Role::Reviewer).await?,
        ml_token: auth::create_token(&ctx.db, "demo-box-ml", Role::Ml).await?,
    };

    let mut report = BoxReport {
        project: project.name.clone(),
        data: args.boxes_data,
        images: truth.boxes.len(),
        objects,
        ..BoxReport::default()
    };
    let (mut edits_made, mut boxes_reviewed) = (0usize, 0usize);
    for round in 1..=args.rounds.max(1) {
        let wanted = if round == 1 {
            args.seed_size
        } else {
            args.labels_per_round
        };
        let (edits_now, boxes_now, reviewed) =
            review_round(&api, &project, &truth, args.reviewers, wanted).await?;
        edits_made += edits_now;
        boxes_reviewed += boxes_now;
        println!(
            "round {round}: reviewers corrected {reviewed} images with {edits_now} box edits (from nothing: {boxes_now} boxes)"
        );
        if reviewed == 0 {
            break;
        }
        match api.retrain(&project.name, false).await {
            Ok(run_id) => {
                println!("round {round}: training the detector (run {run_id})");
                wait_for_run(ctx, run_id, timeout).await?;
                wait_until_predicted(ctx, &project, timeout).await?;
            }
            Err(err) => println!("round {round}: not retraining: {err:#}"),
        }
        let figures = round_figures(
            ctx,
            &project,
            &truth,
            round,
            edits_made,
            boxes_reviewed,
            started,
        )
        .await?;
        println!(
            "round {round}: v{} AP@0.5 {}; {} images by machine ({:.1}%, box precision {}, recall {}), {} by people, {} in review; drawing saved in review {:.1}%, effort saved overall {:.1}%",
            figures.version.map_or("-".into(), |v| v.to_string()),
            figures
                .average_precision
                .map_or("-".into(), |a| format!("{a:.3}")),
            figures.machine_images,
            figures.machine_share * 100.0,
            figures
                .machine_precision
                .map_or("-".into(), |p| format!("{p:.3}")),
            figures
                .machine_recall
                .map_or("-".into(), |r| format!("{r:.3}")),
            figures.human_images,
            figures.in_review,
            figures.drawing_saved * 100.0,
            figures.effort_saved * 100.0
        );
        let done = figures.in_review == 0;
        report.rounds.push(figures);
        if done {
            break;
        }
    }
    if let Some(last) = report.rounds.last() {
        report.machine_images = last.machine_images;
        report.human_images = last.human_images;
        report.still_in_review = last.in_review;
        report.drawing_saved = last.drawing_saved;
        report.effort_saved = last.effort_saved;
    }
    report.edits = edits_made;
    report.boxes_reviewed = boxes_reviewed;
    report.seconds = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(&args.work_dir)?;
    let path = args.work_dir.join("report-detection.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!(
        "\n{} images, {} objects: {} accepted by machine, {} labeled by people, {} still in review; drawing saved in review {:.1}% ({} edits where drawing from nothing takes {} boxes); effort saved overall, machine errors counted as edits still to make, {:.1}%; {:.0} s",
        report.images,
        report.objects,
        report.machine_images,
        report.human_images,
        report.still_in_review,
        report.drawing_saved * 100.0,
        report.edits,
        report.boxes_reviewed,
        report.effort_saved * 100.0,
        report.seconds
    );
    println!("report written to {}", path.display());
    Ok(report)
}

/// Up to `wanted` review tasks, `reviewers` at a time, each corrected to its
/// annotation; returns the edits, the boxes from nothing and the images.
pub(super) async fn review_round(
    api: &Api,
    project: &Project,
    truth: &Truth,
    reviewers: usize,
    wanted: usize,
) -> anyhow::Result<(usize, usize, usize)> {
    let budget = std::sync::atomic::AtomicUsize::new(wanted);
    let tally = std::sync::Mutex::new((0usize, 0usize, 0usize));
    let reviewer = async || -> anyhow::Result<()> {
        use std::sync::atomic::Ordering;
        while budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_ok()
        {
            let Some(task) = api.claim(&project.name).await? else {
                break;
            };
            let annotation = truth.of(&task.source)?;
            let shown = task.boxes.clone().unwrap_or_default();
            let start = detection::parse_named(&truth.classes, &shown)
                .map_err(|e| anyhow::anyhow!("the task shows boxes sieve cannot read: {e}"))?;
            let cost = edits(&start, annotation);
            api.submit_boxes(&task, &detection::named(&truth.classes, annotation))
                .await?;
            let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
            t.0 += cost;
            t.1 += annotation.len();
            t.2 += 1;
        }
        Ok(())
    };
    let all = (0..reviewers.max(1)).map(|_| reviewer());
    for outcome in futures_util::future::join_all(all).await {
        outcome?;
    }
    let t = *tally.lock().unwrap_or_else(|p| p.into_inner());
    Ok(t)
}

/// The project's state now, against the annotations.
async fn round_figures(
    ctx: &Context,
    project: &Project,
    truth: &Truth,
    round: usize,
    edits_made: usize,
    boxes_reviewed: usize,
    started: Instant,
) -> anyhow::Result<BoxRound> {
    let project = projects::get(&ctx.db, &project.id.to_string()).await?;
    let version = match project.active_model_version_id {
        Some(id) => model_version::Entity::find_by_id(id).one(&ctx.db).await?,
        None => None,
    };
    let average_precision = version
        .as_ref()
        .and_then(|v| v.metrics.clone())
        .and_then(|m| serde_json::from_value::<HoldoutMetrics>(m).ok())
        .and_then(|m| m.average_precision);
    let items = item::Entity::find()
        .filter(item::Column::ProjectId.eq(project.id.as_uuid()))
        .all(&ctx.db)
        .await?;
    let count = |state: ItemState| items.iter().filter(|i| i.state == state).count() as i64;
    let (mut matched, mut proposed, mut present, mut machine_errors) = (0, 0, 0, 0);
    for item in items.iter().filter(|i| i.state == ItemState::AutoLabeled) {
        let machine = label::Entity::find()
            .filter(label::Column::ItemId.eq(item.id))
            .filter(label::Column::Source.eq(LabelSource::Machine))
            .order_by_desc(label::Column::CreatedAt)
            .one(&ctx.db)
            .await?
            .and_then(|l| l.boxes)
            .and_then(|b| detection::from_json(&b))
            .unwrap_or_default();
        let annotation = truth.of(&item.source)?;
        matched += box_scores::matched(&machine, annotation, IOU);
        proposed += machine.len();
        present += annotation.len();
        machine_errors += edits(&machine, annotation);
    }
    let machine_images = count(ItemState::AutoLabeled);
    let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    // Every labeled image's boxes from nothing: the reviewed ones' and the
    // machine-labeled ones'.
    let from_nothing = boxes_reviewed + present;
    Ok(BoxRound {
        round,
        version: version.map(|v| v.version),
        average_precision,
        human_images: count(ItemState::HumanLabeled),
        machine_images,
        in_review: count(ItemState::InReview),
        machine_share: machine_images as f64 / items.len().max(1) as f64,
        machine_precision: ratio(matched, proposed),
        machine_recall: ratio(matched, present),
        edits: edits_made,
        boxes_reviewed,
        drawing_saved: ratio(edits_made, boxes_reviewed).map_or(0.0, |r| 1.0 - r),
        machine_errors,
        effort_saved: ratio(edits_made + machine_errors, from_nothing).map_or(0.0, |r| 1.0 - r),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The name of a new detection demo project.
pub fn project_name(data: BoxData) -> String {
    format!(
        "{}-{}",
        match data {
            BoxData::Crowns => "tree-crowns",
            BoxData::Canvases => "canvases",
        },
        chrono::Utc::now().format("%Y%m%d%H%M%S")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(class: u32, x: f32) -> LabeledBox {
        LabeledBox {
            class,
            x_min: x,
            y_min: 0.0,
            x_max: x + 10.0,
            y_max: 10.0,
        }
    }

    #[test]
    fn edits_count_what_a_reviewer_changes() {
        let truth = [b(0, 0.0), b(0, 20.0), b(1, 40.0)];
        assert_eq!(edits(&[], &truth), 3, "from nothing: one box per object");
        assert_eq!(edits(&truth, &truth), 0);
        // Right place, wrong class: one edit; a box a little off: none.
        assert_eq!(edits(&[b(0, 1.0), b(0, 20.0), b(0, 40.0)], &truth), 1);
        // A box half off its object (IoU 1/3) is moved; an extra one is deleted.
        assert_eq!(
            edits(&[b(0, 5.0), b(0, 20.0), b(1, 40.0), b(0, 80.0)], &truth),
            2
        );
        assert_eq!(edits(&[b(0, 80.0)], &[]), 1);
    }
}
