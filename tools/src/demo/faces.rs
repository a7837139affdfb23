//! `sieve-tools demo --task deidentify`: de-identification end to end, on the scene set of
//! [`crate::scenes`] (real faces at known places on real photos).
//!
//! A deidentify project starts with the pretrained face detector; the scenes (faces, and drawn
//! licence plates on some) are ingested and pre-labeled, recall-first routing accepts the images
//! the committee is sure of whole, and simulated reviewers correct every image that waits to its
//! exact boxes through the real review API (counting their edits against drawing every box from
//! nothing), boxing the plates the face detector cannot see. Their plate boxes train the next
//! version's plate heads (`sieve retrain`), whose activation rescores every image no person
//! labeled, and people correct what waits again. Then the delivery, `export --format blurred`,
//! is measured against the exact boxes: the recall and precision of the blurred boxes, faces
//! and plates apart, over all delivered images and over the ones no person saw (a face or plate
//! missed there is a privacy leak), and the share of images that needed no person.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde::Serialize;
use sieve_scheduler::auth;
use sieve_scheduler::context::Context;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::model_version;
use sieve_scheduler::export::blur::Blur;
use sieve_scheduler::export::output::Options as ExportOptions;
use sieve_scheduler::export::{Export, Filters, Format, Request, folder};
use sieve_scheduler::ingest;
use sieve_scheduler::kind::TaskKind;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_scheduler::training;
use sieve_shared::box_scores;
use sieve_shared::boxes::LabeledBox;
use sieve_shared::messages::ModelArch;
use sieve_worker::model::faces;
use tokio_util::sync::CancellationToken;

use super::boxes::{Truth, review_round};
use super::{Api, DemoArgs, wait_for, wait_for_run, wait_until_predicted};
use crate::scenes;

/// Scenes when `--images` is left at its default.
pub const DEFAULT_SCENES: usize = 120;
/// The scene set's seed: the same scenes every run, so a resumed run ingests nothing new.
const SEED: u64 = 24;
/// The plates' seed, apart from the scenes' so that plates do not move the faces.
const PLATE_SEED: u64 = 25;
/// Matching a delivered box to a face or plate.
const IOU: f32 = 0.5;

/// What the de-identification demo measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FaceReport {
    pub project: String,
    pub images: usize,
    pub faces: usize,
    pub plates: usize,
    /// Plates in the images the pretrained version (faces only) had accepted by machine when
    /// people had corrected everything it sent them: what would have leaked without plate heads.
    pub plates_in_faces_only_machine_images: usize,
    /// Whether the version that labeled last finds plates: people had boxed some, and a run
    /// trained plate heads on them that the promotion gate let through.
    pub plate_heads: bool,
    /// Images accepted by machine, corrected by people.
    pub machine_images: i64,
    pub human_images: i64,
    /// Share of images no person had to look at.
    pub no_person_share: f64,
    /// Reviewers' box edits from the model's boxes, against the boxes they would have drawn
    /// from nothing on the same images.
    pub edits: usize,
    pub boxes_from_nothing: usize,
    /// The delivery against the exact boxes: all boxes, then faces and plates apart.
    pub delivered_images: u64,
    pub delivered_recall: f64,
    pub delivered_precision: f64,
    pub delivered_face_recall: f64,
    pub delivered_plate_recall: f64,
    /// Faces in the images no person saw, and those of them the delivery left unblurred.
    pub machine_faces: usize,
    pub machine_missed: usize,
    /// The same for plates.
    pub machine_plates: usize,
    pub machine_missed_plates: usize,
    pub seconds: f64,
}

/// Run the demo: scenes, project, ingest, review, delivery, report.
pub async fn run(ctx: &Context, args: &DemoArgs, name: &str) -> anyhow::Result<FaceReport> {
    let started = Instant::now();
    let timeout = Duration::from_secs(args.step_timeout_secs);
    let dir = args.work_dir.join("scenes");
    let truth = prepare(args, &dir)?;
    let count = |face: bool| {
        truth
            .boxes
            .values()
            .flatten()
            .filter(|b| (b.class == faces::FACE) == face)
            .count()
    };
    let (faces, plates) = (count(true), count(false));
    println!(
        "{} scenes ({faces} faces of Labeled Faces in the Wild on scikit-image's photos, {plates} drawn plates) in {}",
        truth.boxes.len(),
        dir.display()
    );
    let project = if args.resume {
        projects::get(&ctx.db, name)
            .await
            .with_context(|| format!("cannot resume project {name}"))?
    } else {
        // A fixed threshold on the image's confidence unless a target is asked for: a few
        // dozen scenes give calibration too little random evidence for any target.
        let policy = Policy {
            confidence_threshold: args.threshold.unwrap_or(0.9),
            target_accuracy: args.target_accuracy,
            audit_rate: args.audit_rate,
            ..Policy::default()
        };
        training::create_project_of_kind(
            ctx,
            &ProjectName::parse(name)?,
            &ClassNames::parse_for(TaskKind::Deidentify, &truth.classes)?,
            &policy,
            ModelArch::Faces,
            TaskKind::Deidentify,
            "demo",
        )
        .await?
    };
    wait_for("the face detector", timeout, async || {
        Ok(projects::get(&ctx.db, name)
            .await?
            .active_model_version_id
            .is_some())
    })
    .await?;
    let summary = ingest::ingest_folder(ctx, &project, &dir, false).await?;
    println!(
        "ingested {} scenes ({} new, {} failed); the face detector pre-labels them",
        summary.files_seen, summary.new_items, summary.failed
    );
    wait_until_predicted(ctx, &project, timeout).await?;
    let api = Api {
        http: reqwest::Client::new(),
        base: ctx.settings.http.api_url.trim_end_matches('/').to_owned(),
        reviewer_token: auth::create_token(&ctx.db, "demo-face-reviewers", Role::Reviewer).await?,
        ml_token: auth::create_token(&ctx.db, "demo-face-ml", Role::Ml).await?,
    };
    // Every image that waits is corrected to its exact boxes, plates included. Once people
    // have boxed plates, a run trains plate heads on them; its version, once promoted,
    // rescores every image no person labeled, and people correct what waits again.
    let (mut edits, mut from_nothing) = (0, 0);
    let (mut retrained, mut exposed) = (false, 0);
    loop {
        let (e, b, reviewed) =
            review_round(&api, &project, &truth, args.reviewers, usize::MAX).await?;
        edits += e;
        from_nothing += b;
        if reviewed > 0 {
            println!(
                "reviewers corrected {reviewed} images with {e} box edits (from nothing: {b})"
            );
            continue;
        }
        if retrained || plates_in(ctx, &project, &truth, ItemState::HumanLabeled).await? == 0 {
            break;
        }
        retrained = true;
        exposed = plates_in(ctx, &project, &truth, ItemState::AutoLabeled).await?;
        println!("{exposed} plates lie in the images the face detector alone accepted");
        match api.retrain(&project.name, false).await {
            Ok(run_id) => {
                println!("people boxed plates: training plate heads (run {run_id})");
                match wait_for_run(ctx, run_id, timeout).await? {
                    None => println!("the version with plate heads is active; it rescores"),
                    Some(why) => println!("the version with plate heads was not activated: {why}"),
                }
                wait_until_predicted(ctx, &project, timeout).await?;
            }
            Err(err) => println!("not training plate heads: {err:#}"),
        }
    }
    let plate_heads = finds_plates(ctx, &project).await?;

    let out = args.work_dir.join("delivery");
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    let request = Request {
        format: Format::Blurred,
        filters: Filters::default(),
    };
    let export = Export::begin(&ctx.db, &project, request).await?;
    let options = ExportOptions {
        terminal: false,
        cancel: CancellationToken::new(),
    };
    let store =
        sieve_shared::store::Store::connect_existing(&ctx.settings.store, &ctx.settings.s3).await?;
    let (exported, _) =
        folder::write_blurred(export, &store, &out, options, Blur::default()).await?;

    let items = item::Entity::find()
        .filter(item::Column::ProjectId.eq(project.id.as_uuid()))
        .all(&ctx.db)
        .await?;
    let report = measure(&out, &items, &truth)?;
    let machine_images = items
        .iter()
        .filter(|i| i.state == ItemState::AutoLabeled)
        .count() as i64;
    let human_images = items
        .iter()
        .filter(|i| i.state == ItemState::HumanLabeled)
        .count() as i64;
    let report = FaceReport {
        project: project.name.clone(),
        images: truth.boxes.len(),
        faces,
        plates,
        plates_in_faces_only_machine_images: exposed,
        plate_heads,
        machine_images,
        human_images,
        no_person_share: machine_images as f64 / items.len().max(1) as f64,
        edits,
        boxes_from_nothing: from_nothing,
        delivered_images: exported.rows,
        seconds: started.elapsed().as_secs_f64(),
        ..report
    };
    std::fs::create_dir_all(&args.work_dir)?;
    let path = args.work_dir.join("report-deidentify.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!(
        "\n{} scenes, {} faces, {} plates: {} accepted by machine ({:.1}% needed no person), {} corrected by people \
         ({} box edits where drawing from nothing takes {}); the last version {} plates; delivered {} images to {}: \
         blurred boxes' recall {:.3} (faces {:.3}, plates {:.3}), precision {:.3}; in the images no person saw, \
         {} of {} faces and {} of {} plates left unblurred; {:.0} s",
        report.images,
        report.faces,
        report.plates,
        report.machine_images,
        report.no_person_share * 100.0,
        report.human_images,
        report.edits,
        report.boxes_from_nothing,
        if report.plate_heads {
            "finds"
        } else {
            "does not find"
        },
        report.delivered_images,
        out.display(),
        report.delivered_recall,
        report.delivered_face_recall,
        report.delivered_plate_recall,
        report.delivered_precision,
        report.machine_missed,
        report.machine_faces,
        report.machine_missed_plates,
        report.machine_plates,
        report.seconds
    );
    println!("report written to {}", path.display());
    Ok(report)
}

/// Write the scenes to `dir` (afresh) and return their exact boxes.
fn prepare(args: &DemoArgs, dir: &std::path::Path) -> anyhow::Result<Truth> {
    let photos = args
        .crowns_dir
        .parent()
        .map_or_else(|| "ops".into(), std::path::Path::to_path_buf)
        .join("test-photos");
    let faces = scenes::load_faces(&photos.join(scenes::FACES_FILE))?;
    let backgrounds = scenes::BACKGROUNDS
        .iter()
        .map(|name| {
            let path = photos.join(name);
            Ok(image::open(&path)
                .with_context(|| format!("{}: run ops/fetch-test-photos.sh", path.display()))?
                .to_rgb8())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let mut boxes = HashMap::new();
    let mut scenes = scenes::scenes(&faces, &backgrounds, args.images, SEED);
    scenes::add_plates(&mut scenes, PLATE_SEED);
    for (i, scene) in scenes.into_iter().enumerate() {
        let name = format!("scene-{i:05}.png");
        scene.image.save(dir.join(&name))?;
        boxes.insert(name, scene.boxes());
    }
    Ok(Truth {
        classes: TaskKind::Deidentify
            .default_classes()
            .iter()
            .map(|c| (*c).to_owned())
            .collect(),
        boxes,
    })
}

/// The delivery in `out` (its `annotations.json`) against the exact boxes.
fn measure(
    out: &std::path::Path,
    items: &[item::Model],
    truth: &Truth,
) -> anyhow::Result<FaceReport> {
    let coco: serde_json::Value = serde_json::from_slice(&std::fs::read(
        out.join(folder::labels_file(Format::Blurred)),
    )?)?;
    let by_id: HashMap<String, &item::Model> =
        items.iter().map(|i| (i.id.to_string(), i)).collect();
    let mut delivered: HashMap<u64, (Vec<LabeledBox>, &item::Model)> = HashMap::new();
    for image in coco["images"].as_array().into_iter().flatten() {
        let id = image["sieve_item_id"].as_str().unwrap_or_default();
        let item = by_id
            .get(id)
            .with_context(|| format!("the delivery names an unknown item {id}"))?;
        delivered.insert(image["id"].as_u64().unwrap_or_default(), (Vec::new(), item));
    }
    for a in coco["annotations"].as_array().into_iter().flatten() {
        let bbox: Vec<f32> = a["bbox"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_f64().map(|v| v as f32))
            .collect();
        if let (Some(entry), [x, y, w, h]) = (
            delivered.get_mut(&a["image_id"].as_u64().unwrap_or_default()),
            bbox.as_slice(),
        ) {
            entry.0.push(LabeledBox {
                class: a["category_id"].as_u64().unwrap_or(1).saturating_sub(1) as u32,
                x_min: *x,
                y_min: *y,
                x_max: x + w,
                y_max: y + h,
            });
        }
    }
    let share = |part: usize, whole: usize| {
        if whole > 0 {
            part as f64 / whole as f64
        } else {
            1.0
        }
    };
    let mut report = FaceReport::default();
    // Per side (faces, plates): boxes to find, found.
    let mut sides = [(0usize, 0usize); 2];
    let (mut boxes, mut right) = (0, 0);
    for (blurred, item) in delivered.values() {
        let exact = truth.of(&item.source)?;
        boxes += blurred.len();
        right += box_scores::matched(exact, blurred, IOU);
        for (side, face) in [(0, true), (1, false)] {
            let wanted: Vec<LabeledBox> = exact
                .iter()
                .filter(|b| (b.class == faces::FACE) == face)
                .copied()
                .collect();
            let hits = box_scores::matched(blurred, &wanted, IOU);
            sides[side].0 += wanted.len();
            sides[side].1 += hits;
            if item.state == ItemState::AutoLabeled {
                let missed = wanted.len() - hits;
                if face {
                    report.machine_faces += wanted.len();
                    report.machine_missed += missed;
                } else {
                    report.machine_plates += wanted.len();
                    report.machine_missed_plates += missed;
                }
            }
        }
    }
    let [(faces, found_faces), (plates, found_plates)] = sides;
    report.delivered_recall = share(found_faces + found_plates, faces + plates);
    report.delivered_face_recall = share(found_faces, faces);
    report.delivered_plate_recall = share(found_plates, plates);
    report.delivered_precision = share(right, boxes);
    Ok(report)
}

/// The plates of `project`'s scenes in `state` (human-labeled: those people have boxed).
async fn plates_in(
    ctx: &Context,
    project: &Project,
    truth: &Truth,
    state: ItemState,
) -> anyhow::Result<usize> {
    let items = item::Entity::find()
        .filter(item::Column::ProjectId.eq(project.id.as_uuid()))
        .filter(item::Column::State.eq(state))
        .all(&ctx.db)
        .await?;
    let mut plates = 0;
    for item in &items {
        plates += truth
            .of(&item.source)?
            .iter()
            .filter(|b| b.class != faces::FACE)
            .count();
    }
    Ok(plates)
}

/// Whether `project`'s active version finds plates: its architecture has plate heads (a tile
/// side, `input_size` > 0).
async fn finds_plates(ctx: &Context, project: &Project) -> anyhow::Result<bool> {
    let project = projects::get(&ctx.db, &project.id.to_string()).await?;
    let Some(active) = project.active_model_version_id else {
        return Ok(false);
    };
    let version = model_version::Entity::find_by_id(active)
        .one(&ctx.db)
        .await?
        .context("the active model version vanished")?;
    Ok(version
        .architecture
        .as_ref()
        .and_then(|a| a["input_size"].as_u64())
        .is_some_and(|side| side > 0))
}
