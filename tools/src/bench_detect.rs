//! `sieve-tools bench detect`: the detector committee on real aerial
//! images, the tree crowns deepforest's wheel ships (`ops/tree-crowns/`,
//! `ops/fetch-tree-crowns.sh`).
//!
//! Three annotated images train the heads (their overlapping tiles, boxes
//! mostly inside a tile kept as its targets); the fourth, never seen, is
//! tiled the same way, detected, its boxes mapped back to image pixels,
//! matched across members into objects (`sieve_shared::box_scores`) and
//! merged across overlapping tiles with NMS, then scored against its
//! annotations: average precision at IoU 0.5, and precision and recall at
//! the detector's threshold. Every crown counts as one class (the four
//! images name three: Tree, and Dead / Alive on one of them). It prints
//! the time to compute the frozen backbone's features, to train the heads,
//! and tiles per second for detection, on the backend the worker is built
//! with.
//!
//! With `--canvases N` it runs on the second set instead: N canvases of
//! real Fashion-MNIST items with exact boxes (`crate::canvases`), ten
//! classes, and N/10 more canvases of other items held out. The queue path (a worker on RabbitMQ) is not in this version: the
//! detector is not wired into the jobs yet.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use image::RgbImage;
use sieve_scheduler::ingest::annotations::{self, AnnotatedImage};
use sieve_shared::box_scores::{self, CommitteeBox, ScoredBox};
use sieve_shared::boxes::LabeledBox;
use sieve_shared::tiles::{self, Tile};
use sieve_worker::backend;
use sieve_worker::model::detect;
use sieve_worker::model::detector::{self, DetectorConfig, TrainOptions};
use sieve_worker::model::mobilenet;

use crate::procstat::{peak_rss_mib, reset_peak_rss};

#[derive(Debug, Args)]
pub struct DetectArgs {
    /// The tree crowns: PNG images with their Pascal VOC files.
    #[arg(long, default_value = "ops/tree-crowns")]
    pub data: PathBuf,
    /// MobileNetV2 ImageNet weights (ops/fetch-weights.sh).
    #[arg(long, default_value = "ops/weights/mobilenet_v2-b0353104.pth")]
    pub weights: PathBuf,
    /// The image held out for evaluation (file name without extension).
    #[arg(long, default_value = "2019_YELL_2_541000_4977000_image_crop")]
    pub holdout: String,
    /// Tile side in pixels: the detector's input.
    #[arg(long, default_value_t = 384)]
    pub input: u32,
    /// Overlap of neighbouring tiles, in pixels.
    #[arg(long, default_value_t = 64)]
    pub overlap: u32,
    /// Most epochs (early stopping may end sooner).
    #[arg(long, default_value_t = 60)]
    pub epochs: usize,
    /// Committee members.
    #[arg(long, default_value_t = 3)]
    pub members: usize,
    /// Train on this many Fashion-MNIST canvases (ten classes, exact
    /// boxes) instead of the tree crowns; 0: the tree crowns.
    #[arg(long, default_value_t = 0)]
    pub canvases: usize,
    /// Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist).
    #[arg(long, default_value = crate::fashion_idx::DEFAULT_DIR)]
    pub fashion_mnist: PathBuf,
    /// AdamW's learning rate for the heads.
    #[arg(long, default_value_t = 3e-3)]
    pub learning_rate: f64,
    /// Share of the training tiles held out for early stopping (0: train
    /// every epoch asked for, on every tile).
    #[arg(long, default_value_t = 0.0)]
    pub validation_share: f64,
    /// Training tiles also seen mirrored left-right and top-bottom (aerial
    /// images have no up).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub flips: bool,
}

/// One image cut into tiles: their normalized pixels and their targets.
struct Tiled {
    tiles: Vec<Tile>,
    pixels: Vec<f32>,
    targets: Vec<Vec<LabeledBox>>,
    truth: Vec<LabeledBox>,
}

fn crowns(image: &AnnotatedImage) -> Vec<LabeledBox> {
    image
        .boxes
        .iter()
        .map(|b| LabeledBox {
            class: 0,
            x_min: b.x_min as f32,
            y_min: b.y_min as f32,
            x_max: b.x_max as f32,
            y_max: b.y_max as f32,
        })
        .collect()
}

fn tile(
    path: &Path,
    truth: Vec<LabeledBox>,
    input: u32,
    overlap: u32,
    flips: bool,
) -> anyhow::Result<Tiled> {
    let image = image::open(path)
        .with_context(|| format!("reading {}", path.display()))?
        .to_rgb8();
    Ok(tile_image(&image, truth, input, overlap, flips))
}

fn tile_image(
    image: &RgbImage,
    truth: Vec<LabeledBox>,
    input: u32,
    overlap: u32,
    flips: bool,
) -> Tiled {
    let grid = tiles::grid(image.width(), image.height(), input, overlap);
    let mut pixels = Vec::with_capacity(grid.len() * 3 * (input * input) as usize);
    let mut targets = Vec::with_capacity(grid.len());
    for t in &grid {
        let canvas = detect::tile_of(image, t, input);
        pixels.extend(mobilenet::imagenet_normalize(&canvas));
        let boxes = t.boxes_within(&truth, 0.5);
        targets.push(boxes.clone());
        if flips {
            let side = input as f32;
            let mirrored = image::imageops::flip_horizontal(&canvas);
            pixels.extend(mobilenet::imagenet_normalize(&mirrored));
            targets.push(
                boxes
                    .iter()
                    .map(|b| LabeledBox {
                        x_min: side - b.x_max,
                        x_max: side - b.x_min,
                        ..*b
                    })
                    .collect(),
            );
            let flipped = image::imageops::flip_vertical(&canvas);
            pixels.extend(mobilenet::imagenet_normalize(&flipped));
            targets.push(
                boxes
                    .iter()
                    .map(|b| LabeledBox {
                        y_min: side - b.y_max,
                        y_max: side - b.y_min,
                        ..*b
                    })
                    .collect(),
            );
        }
    }
    Tiled {
        tiles: grid,
        pixels,
        targets,
        truth,
    }
}

/// The training images and the held-out ones, tiled; the classes; what the
/// data is called in the report.
struct Sets {
    train: Vec<Tiled>,
    held: Vec<Tiled>,
    classes: usize,
    name: String,
}

fn tree_crowns(args: &DetectArgs) -> anyhow::Result<Sets> {
    let (_, images) = annotations::read(&args.data).map_err(|errors| {
        anyhow::anyhow!(
            "{}: {} (run ops/fetch-tree-crowns.sh)",
            args.data.display(),
            errors.first().map(ToString::to_string).unwrap_or_default()
        )
    })?;
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for image in &images {
        let path = args.data.join(&image.path);
        let stem = Path::new(&image.path)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let flips = args.flips && stem != args.holdout;
        let tiled = tile(&path, crowns(image), args.input, args.overlap, flips)?;
        if stem == args.holdout {
            held.push(tiled);
        } else {
            train.push(tiled);
        }
    }
    anyhow::ensure!(
        !held.is_empty(),
        "no image {} in {}",
        args.holdout,
        args.data.display()
    );
    Ok(Sets {
        train,
        held,
        classes: 1,
        name: format!("the tree crowns, {} held out", args.holdout),
    })
}

fn fashion_canvases(args: &DetectArgs) -> anyhow::Result<Sets> {
    let held_count = (args.canvases / 10).max(1);
    let dataset =
        crate::fashion_idx::load(&args.fashion_mnist, crate::fashion_idx::Split::Train, None)?;
    let make = |first: usize, count: usize, seed: u64, flips: bool| -> Vec<Tiled> {
        crate::canvases::canvases(&dataset, first, count, args.input, 6, seed)
            .into_iter()
            .map(|c| tile_image(&c.image, c.boxes, args.input, args.overlap, flips))
            .collect()
    };
    let train = make(0, args.canvases, 1, args.flips);
    // Other items (from the second half of the split) on other canvases.
    let held = make(dataset.len() / 2, held_count, 2, false);
    Ok(Sets {
        train,
        held,
        classes: 10,
        name: format!(
            "{} Fashion-MNIST canvases, {held_count} held out",
            args.canvases
        ),
    })
}

pub fn run(args: &DetectArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.weights.exists(),
        "{} is missing: run ops/fetch-weights.sh",
        args.weights.display()
    );
    let sets = if args.canvases > 0 {
        fashion_canvases(args)?
    } else {
        tree_crowns(args)?
    };
    let device = backend::device();
    let backbone = mobilenet::load_imagenet(&args.weights, &device)?;
    // Decoded down to 0.05 so average precision sees the whole ranking
    // (as detection benchmarks score); precision and recall are read at the
    // detector's default threshold.
    let threshold = DetectorConfig::default().score_threshold;
    let config = DetectorConfig {
        classes: sets.classes,
        members: args.members,
        input: args.input,
        score_threshold: 0.05,
        ..DetectorConfig::default()
    };
    let Sets { train, held, .. } = &sets;
    let train_tiles: usize = train.iter().map(|t| t.targets.len()).sum();
    let train_boxes: usize = train.iter().map(|t| t.truth.len()).sum();
    let held_tiles: usize = held.iter().map(|t| t.tiles.len()).sum();
    let held_boxes: usize = held.iter().map(|t| t.truth.len()).sum();
    println!(
        "bench detect: {} on {}; input {}, overlap {}, {} members",
        backend::backend_name(),
        sets.name,
        args.input,
        args.overlap,
        args.members
    );
    println!(
        "training: {} images, {train_tiles} tiles, {train_boxes} boxes; held out: {} images ({held_tiles} tiles, {held_boxes} boxes)",
        train.len(),
        held.len()
    );

    reset_peak_rss();
    let started = Instant::now();
    let pixels: Vec<f32> = train
        .iter()
        .flat_map(|t| t.pixels.iter().copied())
        .collect();
    let targets: Vec<Vec<LabeledBox>> = train.iter().flat_map(|t| t.targets.clone()).collect();
    let features = detector::backbone_features(&backbone, &pixels, train_tiles, args.input)?;
    drop(pixels);
    let features_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let options = TrainOptions {
        epochs: args.epochs,
        validation_share: args.validation_share,
        learning_rate: args.learning_rate,
        ..TrainOptions::default()
    };
    let (heads, report) =
        detector::train_heads(&features, &targets, &config, &options, &device, |_| true)?;
    let train_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let held_pixels: Vec<f32> = held.iter().flat_map(|t| t.pixels.iter().copied()).collect();
    let held_features =
        detector::backbone_features(&backbone, &held_pixels, held_tiles, args.input)?;
    let predicted = heads.predict(&held_features)?;
    let detect_seconds = started.elapsed().as_secs_f64();

    // Each member's boxes per held-out image, back in the image's pixels and
    // merged across the tiles' overlaps, as the worker's detector does.
    let mut members_per_image: Vec<Vec<Vec<ScoredBox>>> =
        vec![vec![Vec::new(); args.members]; held.len()];
    let tiles = held
        .iter()
        .enumerate()
        .flat_map(|(i, t)| t.tiles.iter().map(move |tile| (i, tile)));
    for ((image, tile), members) in tiles.zip(&predicted) {
        for (member, boxes) in members.iter().enumerate() {
            members_per_image[image][member].extend(boxes.iter().map(|b| {
                let at = tile.to_image(b.as_box());
                ScoredBox {
                    score: b.score,
                    class: at.class,
                    x_min: at.x_min,
                    y_min: at.y_min,
                    x_max: at.x_max,
                    y_max: at.y_max,
                }
            }));
        }
    }
    for members in &mut members_per_image {
        for boxes in members.iter_mut() {
            *boxes = detector::nms(std::mem::take(boxes), detect::MATCH_IOU);
        }
    }
    let truth: Vec<Vec<LabeledBox>> = held.iter().map(|t| t.truth.clone()).collect();
    let ap = |found: &[Vec<ScoredBox>]| {
        box_scores::average_precision(found, &truth, detect::MATCH_IOU).unwrap_or(0.0)
    };
    let member_ap: Vec<f64> = (0..args.members)
        .map(|member| {
            let found: Vec<Vec<ScoredBox>> = members_per_image
                .iter()
                .map(|members| members[member].clone())
                .collect();
            ap(&found)
        })
        .collect();
    let committee: Vec<Vec<ScoredBox>> = members_per_image
        .iter()
        .map(|members| {
            box_scores::committee_boxes(members, detect::MATCH_IOU)
                .iter()
                .map(CommitteeBox::scored)
                .collect()
        })
        .collect();
    let committee_ap = ap(&committee);
    let at_threshold: Vec<Vec<LabeledBox>> = committee
        .iter()
        .map(|found| {
            found
                .iter()
                .filter(|b| b.score >= threshold)
                .map(ScoredBox::as_box)
                .collect()
        })
        .collect();
    let proposed: usize = at_threshold.iter().map(Vec::len).sum();
    let truth_count: usize = truth.iter().map(Vec::len).sum();
    let matched: usize = at_threshold
        .iter()
        .zip(&truth)
        .map(|(found, truth)| box_scores::matched(found, truth, detect::MATCH_IOU))
        .sum();
    let precision = matched as f64 / proposed.max(1) as f64;
    let recall = matched as f64 / truth_count.max(1) as f64;

    println!(
        "backbone features: {train_tiles} tiles in {features_seconds:.1} s ({:.1} tiles/s)",
        train_tiles as f64 / features_seconds
    );
    println!(
        "heads: {} epochs (kept {}) in {train_seconds:.1} s, {:.2} s per epoch; validation F1 {}",
        report.epochs,
        report.best_epoch,
        train_seconds / report.epochs.max(1) as f64,
        report
            .val_f1
            .map_or_else(|| "n/a".to_owned(), |f| format!("{f:.3}"))
    );
    println!(
        "detection on the held-out images: {held_tiles} tiles in {detect_seconds:.2} s ({:.1} tiles/s, backbone and heads)",
        held_tiles as f64 / detect_seconds
    );
    let members: Vec<String> = member_ap.iter().map(|ap| format!("{ap:.3}")).collect();
    println!(
        "AP@0.5 on {truth_count} held-out boxes: committee {committee_ap:.3}, members {}",
        members.join(" / ")
    );
    println!(
        "at the threshold {threshold}: {proposed} boxes, precision {precision:.3}, recall {recall:.3}"
    );
    println!("peak RSS {:.0} MiB", peak_rss_mib());
    Ok(())
}
