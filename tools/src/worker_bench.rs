//! `sieve-tools bench forward|train|accuracy`: the worker's throughput and model-quality figures.
//!
//! - `forward`: the committee's bare forward pass on preprocessed inputs, then the real queue
//!   path (jobs on RabbitMQ under a private prefix, images in a temporary store, a worker
//!   running [`service::run`], results consumed from the results queue) at the same batch
//!   sizes, with pipelining on and off; MobileNetV2's bare forward at 96x96 and 224x224.
//! - `train`: one epoch of the small CNN on 10,000 28x28 images, one epoch of MobileNetV2
//!   fine-tuning (forward, backward, AdamW) at 96x96, and heads-only training on cached
//!   1280-wide embeddings.
//! - `accuracy` (`bench_accuracy/`): the training recipe's model quality on real labels.
//!
//! `forward --task detection` measures the detector instead (frozen ImageNet backbone, K
//! heads, whole images cut into tiles): bare detection of decoded images against the queue
//! path, at the same batch sizes.
//!
//! `forward --peer ort` also runs the same MobileNetV2 weights in ONNX Runtime
//! (`ops/peer-ort.sh`) with the same threads, batch sizes and inputs, prints sieve / ORT per
//! row, and fails unless both give the same top-1 class on the real photos.
//!
//! FLOPs are counted by layer arithmetic (2 per multiply-add, convolutions and linear layers
//! only). Peak RSS is the process's `VmHWM`, reset before each measurement through
//! `/proc/self/clear_refs`, so each figure is that phase's peak (plus what stayed resident).

use std::collections::HashSet;
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::procstat::{own_cpu, peak_rss_mib, reset_peak_rss, service_cpu};
use anyhow::Context as _;
use burn::tensor::{Device, Tensor, TensorData};
use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sieve_shared::Settings;
use sieve_shared::broker::{self, Publisher};
use sieve_shared::embedding_table::{Embeddings, TableWriter};
use sieve_shared::ids::{ItemId, JobId, ModelVersionId, ProjectId};
use sieve_shared::messages::{
    ModelArch, ModelRef, PrelabelJob, PrelabelOutcome, SCHEMA_VERSION, Snapshot, SnapshotExample,
    Split, TrainMode, TrainParams, decode_results,
};
use sieve_shared::store::Store;
use sieve_shared::topology::Topology;
use tokio_util::sync::CancellationToken;

use crate::bench_accuracy::{self, AccuracyArgs};
use sieve_scheduler::kind::TaskKind;
use sieve_worker::context::Capability;
use sieve_worker::jobs::prelabel;
use sieve_worker::model::{
    ArchitectureConfig, Committee, Detector, EmbeddingData, HeadsOptions, Model, TrainData,
    TrainOptions, detector, mobilenet, train, train_heads,
};
use sieve_worker::service;
use sieve_worker::{artifact, backend, images};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    /// Inference: bare forward vs the queue path; MobileNetV2 forward.
    Forward,
    /// Training: small CNN and MobileNetV2 epochs, heads on embeddings.
    Train,
    /// Model quality: the loop's training recipe on N real Fashion-MNIST labels, scored on
    /// the test split (accuracy, and the share labelable at 95 / 97 / 99%).
    Accuracy,
}

/// A runtime `bench forward --peer` runs the same MobileNetV2 weights in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// ONNX Runtime from PyPI (CPU provider), through `ops/peer-ort.sh`.
    Ort,
}

/// Which queue-path runs `bench forward` makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pipeline {
    On,
    Off,
    Both,
    None,
}

impl Pipeline {
    fn modes(self) -> Vec<bool> {
        match self {
            Pipeline::On => vec![true],
            Pipeline::Off => vec![false],
            Pipeline::Both => vec![false, true],
            Pipeline::None => vec![],
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to measure: set by the subcommand (`bench forward|train|accuracy`).
    #[arg(skip = What::Forward)]
    pub what: What,
    /// Batch sizes for the forward figures.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub batch_sizes: Vec<usize>,
    /// Committee members K.
    #[arg(long, default_value_t = 3)]
    pub members: usize,
    /// `forward` of which task kind's model: the classifiers (`classification`) or the
    /// detector (`detection`).
    #[arg(long = "task", default_value_t = TaskKind::Classification)]
    pub task: TaskKind,
    /// Side of the detector's square bench images (one tile each at the default input size
    /// of 384; larger images are cut into overlapping tiles).
    #[arg(long, default_value_t = 384)]
    pub detect_side: u32,
    /// Jobs sent through the detector's queue path per batch size (batch 1 gets a quarter).
    #[arg(long, default_value_t = 256)]
    pub detect_queue_items: usize,
    /// Minimum seconds per bare-forward measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Jobs sent through the queue path per batch size (batch 1 gets a quarter).
    #[arg(long, default_value_t = 4096)]
    pub queue_items: usize,
    /// Jobs sent through MobileNetV2's queue path per batch size at 96x96 (224x224 gets a
    /// quarter, batch 1 a quarter again).
    #[arg(long, default_value_t = 1024)]
    pub mobilenet_queue_items: usize,
    /// Queue path with pipelining: on, off, both (compared in the same run), or none (bare
    /// forward only: no broker needed, e.g. on a GPU machine without RabbitMQ).
    #[arg(long, value_enum, default_value_t = Pipeline::Both)]
    pub pipeline: Pipeline,
    /// On a GPU build, also measure every bare forward on the CPU backend (flex) in the same
    /// run, as the baseline the GPU figures are compared with.
    #[arg(long)]
    pub cpu_baseline: bool,
    /// MobileNetV2 ImageNet weights (ops/fetch-weights.sh); skipped when absent.
    #[arg(long, default_value = "ops/weights/mobilenet_v2-b0353104.pth")]
    pub weights: PathBuf,
    /// Skip the MobileNetV2 figures.
    #[arg(long)]
    pub skip_mobilenet: bool,
    /// Also run MobileNetV2's bare forward, same weights, in a peer runtime with the same
    /// threads, batch sizes and inputs, and print sieve / peer per row; fails unless both
    /// give the same top-1 class on the real photos of `ops/test-photos/`.
    #[arg(long, value_enum, conflicts_with = "skip_mobilenet")]
    pub peer: Option<Peer>,
    /// Images of the one-epoch training runs.
    #[arg(long, default_value_t = 10_000)]
    pub train_images: usize,
    /// Images of the MobileNetV2 epoch (default: --train-images).
    #[arg(long)]
    pub mobilenet_train_images: Option<usize>,
    /// Beside the whole network, the MobileNetV2 epoch is also timed training only the last
    /// this many blocks (full mode's `unfrozen_blocks`; a list, or none).
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub unfreeze_last: Vec<usize>,
    /// Labeled embeddings for the heads runs.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000")]
    pub head_sizes: Vec<usize>,
    /// Epochs of a heads run (early stopping may end it sooner).
    #[arg(long, default_value_t = 10)]
    pub head_epochs: usize,
    #[command(flatten)]
    pub accuracy: AccuracyArgs,
}

pub async fn run(settings: Settings, args: BenchArgs) -> anyhow::Result<()> {
    println!(
        "# sieve-tools bench {:?}: backend {}, {} cores, {} build",
        args.what,
        backend::backend_name(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        if cfg!(debug_assertions) {
            "debug (deps optimised)"
        } else {
            "release"
        }
    );
    println!("load average at start: {}", load_average());
    match args.what {
        What::Forward => forward(settings, &args).await?,
        What::Train => {
            snapshot_formats(&args).await?;
            tokio::task::block_in_place(|| training(&args))?;
        }
        What::Accuracy => {
            tokio::task::block_in_place(|| bench_accuracy::run(&args.accuracy, args.members))?
        }
    }
    println!("load average at end: {}", load_average());
    Ok(())
}

// ---------------------------------------------------------------- forward

async fn forward(settings: Settings, args: &BenchArgs) -> anyhow::Result<()> {
    if args.task == TaskKind::Detection {
        return forward_detection(&settings, args).await;
    }
    if args.task == TaskKind::Deidentify {
        return forward_faces(&settings, args).await;
    }
    let config = ArchitectureConfig::small_cnn(10, args.members);
    let committee = Committee::init(&config, 1, &backend::device())?;
    let flops = 2 * small_cnn_multiply_adds(&config);
    println!(
        "\n## small CNN committee (28x28x1, K={}), {:.2} MFLOP per image",
        args.members,
        flops as f64 / 1e6
    );

    let pngs = sample_pngs(256, 28, 1);
    let decode_started = Instant::now();
    let rounds = 20;
    for _ in 0..rounds {
        for png in &pngs {
            images::preprocess(png, &config, u64::MAX)?;
        }
    }
    let per_image = decode_started.elapsed().as_secs_f64() / (rounds * pngs.len()) as f64;
    println!(
        "decode+normalize of a 28x28 PNG: {:.1} us per image (one thread)",
        per_image * 1e6
    );

    let items = |b: usize| queue_items(args.queue_items, b);
    let model = Arc::new(Model::Classifier(committee));
    let pngs = sample_pngs(1024, 28, 2);
    compare_paths(&settings, args, &model, Some(flops), &pngs, items).await?;
    if args.skip_mobilenet {
        return Ok(());
    }
    if !args.weights.exists() {
        anyhow::ensure!(
            args.peer.is_none(),
            "--peer needs the MobileNetV2 weights: {} is missing (bash ops/fetch-weights.sh)",
            args.weights.display()
        );
        println!(
            "\nMobileNetV2 skipped: {} is missing (ops/fetch-weights.sh)",
            args.weights.display()
        );
        return Ok(());
    }
    let mut devices = vec![backend::device()];
    devices.extend(cpu_baseline_device(args));
    for (i, device) in devices.into_iter().enumerate() {
        // The build's own backend is the one compared with a peer.
        let peer = if i == 0 { args.peer } else { None };
        let weights = args.weights.clone();
        let batches = args.batch_sizes.clone();
        let seconds = args.seconds;
        tokio::task::spawn_blocking(move || match peer {
            Some(Peer::Ort) => ort_peer(&weights, &batches, seconds, &device),
            None => mobilenet_forward(&weights, &batches, seconds, &device, None).map(drop),
        })
        .await??;
    }

    // The MobileNetV2 committee (frozen ImageNet backbone, K heads) as a worker runs it:
    // bare forward against the queue path, as for the small CNN. The bench's images are
    // 28x28 grayscale PNGs, so the queue path also resizes them and makes them RGB.
    for side in [96, 224] {
        let config = ArchitectureConfig::mobilenet_v2(10, args.members, side);
        let weights = args.weights.clone();
        let committee = tokio::task::spawn_blocking(move || -> anyhow::Result<Committee> {
            let device = backend::device();
            let backbone = mobilenet::load_imagenet(&weights, &device)?;
            Ok(Committee::from_backbone(&config, backbone, &device)?)
        })
        .await??;
        let flops = 2 * mobilenet::multiply_adds(side, side, false);
        println!(
            "\n## MobileNetV2 committee ({side}x{side}x3, frozen ImageNet backbone, K={} heads), {:.3} GFLOP per image",
            args.members,
            flops as f64 / 1e9
        );
        let per_side = if side > 96 { 4 } else { 1 };
        let items = |b: usize| queue_items(args.mobilenet_queue_items / per_side, b);
        let model = Arc::new(Model::Classifier(committee));
        compare_paths(&settings, args, &model, Some(flops), &pngs, items).await?;
    }
    Ok(())
}

/// The detector as a worker runs it: the frozen ImageNet backbone and K heads as they are
/// before any training (their scores start at 0.1 everywhere, above the decode threshold, so
/// every cell is a candidate for NMS: more box work than a trained detector does), on square
/// noisy images of `--detect-side`, bare against the queue path.
async fn forward_detection(settings: &Settings, args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.weights.exists(),
        "the detector needs the MobileNetV2 weights: {} is missing (bash ops/fetch-weights.sh)",
        args.weights.display()
    );
    let config = ArchitectureConfig::detector(1, args.members, 384);
    let weights = args.weights.clone();
    let model = tokio::task::spawn_blocking(move || -> anyhow::Result<Model> {
        let device = backend::device();
        let backbone = mobilenet::load_imagenet(&weights, &device)?;
        let heads = detector::untrained_heads(
            &sieve_worker::model::detect::heads_config(&config),
            1,
            &device,
        )?;
        Ok(Model::Detector(Detector::new(&config, backbone, heads)?))
    })
    .await??;
    let side = args.detect_side;
    let pngs = sample_pngs(64, side, 4);
    let started = Instant::now();
    let decoded = decode_all(&pngs);
    let per_image = started.elapsed().as_secs_f64() / pngs.len() as f64;
    let tiles = sieve_worker::model::detect::tile_pixels(
        decoded[0].as_ref().map_err(|e| anyhow::anyhow!("{e}"))?,
        384,
        sieve_worker::model::detect::TILE_OVERLAP,
    )
    .0
    .len();
    println!(
        "\n## detector ({side}x{side} images, {tiles} tile(s) of 384x384 each, frozen ImageNet backbone, K={} heads, untrained)",
        args.members
    );
    println!(
        "decode of a {side}x{side} PNG: {:.1} ms per image (two threads)",
        per_image * 1e3
    );
    let items = |b: usize| queue_items(args.detect_queue_items, b);
    compare_paths(settings, args, &Arc::new(model), None, &pngs, items).await
}

/// The real photos of the face fixture (`worker/tests/it/faces.rs`), and the faces in them.
const FACE_PHOTOS: [(&str, usize); 6] = [
    ("t1.jpg", 6),
    ("astronaut.png", 1),
    ("Tom_Hanks_54745.png", 1),
    ("chelsea.png", 0),
    ("coffee.png", 0),
    ("rocket.jpg", 0),
];

/// The de-identification committee (MTCNN on each photo and its mirror image) on the real
/// photos of the face fixture, bare against the queue path.
async fn forward_faces(settings: &Settings, args: &BenchArgs) -> anyhow::Result<()> {
    let dir = settings.worker.face_weights.clone();
    let model = tokio::task::spawn_blocking(move || {
        sieve_worker::model::FaceCommittee::load(&dir, 2, &backend::device())
    })
    .await?
    .map_err(|e| {
        anyhow::anyhow!("{e}: run ops/fetch-face-weights.sh or set worker.face_weights")
    })?;
    let mut photos = Vec::new();
    for (name, _) in FACE_PHOTOS {
        let path = std::path::Path::new("ops/test-photos").join(name);
        photos.push(
            std::fs::read(&path)
                .with_context(|| format!("{}: run ops/fetch-face-weights.sh", path.display()))?,
        );
    }
    let faces: usize = FACE_PHOTOS.iter().map(|(_, n)| n).sum();
    println!(
        "
## face committee (MTCNN, K=2: each photo and its mirror image) on the {} fixture photos \
         ({faces} faces, 1280x886 to 112x112); faces/s = images/s x {:.2}",
        photos.len(),
        faces as f64 / photos.len() as f64
    );
    let items = |b: usize| queue_items(args.detect_queue_items, b);
    if args.peer == Some(Peer::Ort) {
        let dir = settings.worker.face_weights.clone();
        let seconds = args.seconds;
        tokio::task::spawn_blocking(move || faces_beside_ort(&dir, seconds)).await??;
    }
    compare_paths(
        settings,
        args,
        &Arc::new(Model::Faces(model)),
        None,
        &photos,
        items,
    )
    .await
}

/// The face peer (`ops/peer-faces.sh`: the same three networks in ONNX Runtime, the cascade in
/// NumPy).
const FACE_PEER_SCRIPT: &str = "ops/peer-faces.sh";

/// One JSON line of `ops/peer_faces.py`.
#[derive(serde::Deserialize)]
struct FacePeerRow {
    photo: String,
    ms: f64,
    faces: Vec<[f32; 5]>,
}

/// MTCNN once per photo (the original's thresholds), sieve on burn beside the same weights
/// in ONNX Runtime, same threads, same photos: milliseconds per photo, and whether both find
/// the same faces (every face over 0.9 of one matched by the other at IoU 0.9).
fn faces_beside_ort(weights: &std::path::Path, seconds: f64) -> anyhow::Result<()> {
    use sieve_worker::model::mtcnn::{FACE_THRESHOLD, Mtcnn, MtcnnConfig};
    anyhow::ensure!(
        std::path::Path::new(FACE_PEER_SCRIPT).exists(),
        "--peer ort runs {FACE_PEER_SCRIPT}, relative to the working directory: run from the repository root"
    );
    let threads = burn_cpu_threads();
    let output = std::process::Command::new("bash")
        .arg(FACE_PEER_SCRIPT)
        .args(["--threads", &threads.to_string()])
        .args(["--seconds", &seconds.to_string()])
        .args(["--weights-dir", &weights.display().to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {FACE_PEER_SCRIPT}"))?;
    anyhow::ensure!(output.status.success(), "{FACE_PEER_SCRIPT} failed");
    let rows: Vec<FacePeerRow> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    anyhow::ensure!(!rows.is_empty(), "{FACE_PEER_SCRIPT} printed no photo");
    let detector = Mtcnn::load(weights, MtcnnConfig::default(), &backend::device())?;
    println!(
        "\n## MTCNN against ONNX Runtime on the same weights: one pass per photo, {threads} threads (ORT: intra-op {threads}, inter-op 1, sequential; its cascade in NumPy)"
    );
    println!(
        "\n| photo | sieve ms | ORT ms | sieve / ORT speed | faces sieve / ORT | same faces |"
    );
    println!("|---|---|---|---|---|---|");
    let (mut ours, mut theirs) = (0.0, 0.0);
    for row in &rows {
        let path = std::path::Path::new("ops/test-photos").join(&row.photo);
        let image = image::open(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .to_rgb8();
        let found: Vec<_> = detector
            .detect(&image)?
            .into_iter()
            .filter(|f| f.at.score >= FACE_THRESHOLD)
            .collect();
        let rate = measure(seconds, 1, || detector.detect(&image).map(drop))?;
        let ms = 1000.0 / rate;
        let same = found.len() == row.faces.len()
            && found.iter().all(|f| {
                row.faces.iter().any(|p| {
                    let peer = sieve_shared::boxes::LabeledBox {
                        class: 0,
                        x_min: p[0],
                        y_min: p[1],
                        x_max: p[2],
                        y_max: p[3],
                    };
                    f.at.as_box().iou(&peer) >= 0.9
                })
            });
        ours += ms;
        theirs += row.ms;
        println!(
            "| {} | {ms:.1} | {:.1} | {:.2} | {} / {} | {} |",
            row.photo,
            row.ms,
            row.ms / ms,
            found.len(),
            row.faces.len(),
            if same { "yes" } else { "NO" }
        );
        anyhow::ensure!(
            same,
            "{}: sieve and ONNX Runtime find different faces on the same weights",
            row.photo
        );
    }
    println!(
        "| all | {ours:.1} | {theirs:.1} | {:.2} | | |",
        theirs / ours
    );
    Ok(())
}

/// The bench's PNGs decoded as the worker decodes a detector's images (two threads, no pixel
/// limit); one result per image.
fn decode_all(pngs: &[Vec<u8>]) -> Vec<Result<image::RgbImage, String>> {
    let bytes: Vec<bytes::Bytes> = pngs.iter().cloned().map(bytes::Bytes::from).collect();
    prelabel::decode_images(&bytes, u64::MAX)
}

/// Jobs through the queue path at batch size `batch`, of `total` asked for: a quarter at batch
/// 1 (one image at a time is slow), and always at least four batches.
fn queue_items(total: usize, batch: usize) -> usize {
    if batch == 1 { total / 4 } else { total }.max(batch * 4)
}

/// For each batch size: the model's bare forward, then the real queue path (a worker
/// consuming jobs for `pngs` from RabbitMQ, results out), alternating so that both see the
/// same machine load. `items(b)` jobs per queue run. A classifier's bare forward takes
/// preprocessed inputs; a detector's, the decoded `pngs`. `flops` per image, where known.
async fn compare_paths(
    settings: &Settings,
    args: &BenchArgs,
    model: &Arc<Model>,
    flops: Option<u64>,
    pngs: &[Vec<u8>],
    items: impl Fn(usize) -> usize,
) -> anyhow::Result<()> {
    let input_len = model.config().input_len();
    let decoded: Arc<Vec<_>> = Arc::new(match model.as_ref() {
        Model::Classifier(_) => Vec::new(),
        Model::Detector(_) | Model::Faces(_) => decode_all(pngs)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("a bench image: {e}"))?,
    });
    let gflops =
        |rate: f64| flops.map_or("-".to_owned(), |f| format!("{:.2}", rate * f as f64 / 1e9));
    // The same weights on the CPU backend, when this build computes elsewhere and a baseline
    // was asked for.
    let cpu = cpu_baseline_device(args).and_then(|cpu| {
        model
            .classifier()
            .map(|c| Arc::new(Model::Classifier(c.to_device(&cpu))))
    });
    let modes = args.pipeline.modes();
    println!(
        "\n| batch | path | items | items/s | GFLOP/s | / bare | scored | failed | duplicates | peak RSS MiB | CPU µs/item bench+worker / RabbitMQ |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let bench = if modes.is_empty() {
        None
    } else {
        Some(QueueBench::start(settings, model, pngs).await?)
    };
    let outcome = async {
        for &b in &args.batch_sizes {
            let input = Arc::new(match model.as_ref() {
                Model::Classifier(_) => random_inputs(b * input_len, 7),
                Model::Detector(_) | Model::Faces(_) => Vec::new(),
            });
            if let Some(cpu) = &cpu {
                reset_peak_rss();
                let rate = bare_forward(cpu, &input, &decoded, b, args.seconds).await?;
                println!(
                    "| {b} | bare forward, cpu (flex) | - | {rate:.0} | {} | - | - | - | - | {:.0} | - |",
                    gflops(rate),
                    peak_rss_mib()
                );
            }
            reset_peak_rss();
            let bare = bare_forward(model, &input, &decoded, b, args.seconds).await?;
            println!(
                "| {b} | bare forward, {} | - | {bare:.1} | {} | 1.00 | - | - | - | {:.0} | - |",
                backend::backend_name(),
                gflops(bare),
                peak_rss_mib()
            );
            let Some(bench) = &bench else { continue };
            let items = items(b);
            for &pipeline in &modes {
                reset_peak_rss();
                // The broker shares the machine: its CPU per item is the
                // part of the gap to the bare forward that is not ours.
                let (own_before, services_before) = (own_cpu(), service_cpu());
                let figures = bench.run(b, pipeline, items).await?;
                let per_item = |seconds: f64| seconds / items as f64 * 1e6;
                let broker = (service_cpu() - services_before).rabbitmq;
                println!(
                    "| {b} | queue, pipeline {} | {items} | {:.1} | {} | {:.2} | {} | {} | {} | {:.0} | {:.0} / {:.0} |",
                    if pipeline { "on" } else { "off" },
                    figures.rate(),
                    gflops(figures.rate()),
                    figures.rate() / bare,
                    figures.scored,
                    figures.failed,
                    figures.duplicates,
                    peak_rss_mib(),
                    per_item(own_cpu() - own_before),
                    per_item(broker)
                );
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Some(bench) = bench {
        bench.cleanup().await;
    }
    outcome
}

/// The CPU device for `--cpu-baseline`, when this build's device is not already the CPU.
fn cpu_baseline_device(args: &BenchArgs) -> Option<Device> {
    let cpu = Device::flex();
    (args.cpu_baseline && backend::device() != cpu).then_some(cpu)
}

/// Items per second of the model's bare forward: a classifier's on preprocessed `input`
/// (upload, forward, read-back), a detector's on `batch` of the `decoded` images (tiles,
/// forward, boxes merged and scored, as the worker does after decoding).
async fn bare_forward(
    model: &Arc<Model>,
    input: &Arc<Vec<f32>>,
    decoded: &Arc<Vec<image::RgbImage>>,
    batch: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let (model, input, decoded) = (model.clone(), input.clone(), decoded.clone());
    tokio::task::spawn_blocking(move || match model.as_ref() {
        Model::Classifier(c) => measure(seconds, batch, || {
            c.predict_with_embeddings(&input, batch).map(|_| ())
        }),
        Model::Detector(_) | Model::Faces(_) => {
            anyhow::ensure!(!decoded.is_empty(), "no images for the detector");
            let images: Vec<_> = decoded
                .iter()
                .cycle()
                .take(batch)
                .cloned()
                .map(Ok)
                .collect();
            measure(seconds, batch, || {
                let out = match model.as_ref() {
                    Model::Faces(f) => prelabel::find_faces(f, images.clone()),
                    Model::Detector(d) => prelabel::detect_images(d, images.clone()),
                    Model::Classifier(_) => unreachable!("matched above"),
                };
                match out.into_iter().find_map(Result::err) {
                    Some(reason) => Err(anyhow::anyhow!(reason)),
                    None => Ok(()),
                }
            })
        }
    })
    .await?
}

/// One row of MobileNetV2's bare forward: input side, batch size, images per second.
#[derive(Clone, Copy, Debug, PartialEq)]
struct ForwardRow {
    side: usize,
    batch: usize,
    img_per_s: f64,
}

/// MobileNetV2's input sides in the forward figures.
const MOBILENET_SIDES: [usize; 2] = [96, 224];
/// Seed of MobileNetV2's bench inputs (`random_inputs`), which the peer reads too.
const MOBILENET_INPUT_SEED: u64 = 3;

/// MobileNetV2's bare forward rows; with a `peer`, each row is followed by the peer's same
/// row, so that both see the same machine load.
fn mobilenet_forward(
    weights: &std::path::Path,
    batches: &[usize],
    seconds: f64,
    device: &Device,
    mut peer: Option<&mut OrtPeer>,
) -> anyhow::Result<Vec<ForwardRow>> {
    let net = mobilenet::load_imagenet(weights, device)?;
    let folded = net.clone().fold_batchnorm();
    println!(
        "\n## MobileNetV2 (ImageNet weights) on {device:?}, bare forward to the 1280-wide embedding; BatchNorm as imported, and folded into the convolutions\n"
    );
    println!("| side | batch | img/s | folded img/s | GFLOP per image | GFLOP/s | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for side in MOBILENET_SIDES {
        let flops = 2 * mobilenet::multiply_adds(side, side, false);
        for &b in batches {
            reset_peak_rss();
            let input = random_inputs(b * 3 * side * side, MOBILENET_INPUT_SEED);
            let rate_of = |net: &mobilenet::MobileNetV2| {
                measure(seconds, b, || {
                    let x = Tensor::<4>::from_data(
                        TensorData::new(input.clone(), [b, 3, side, side]),
                        device,
                    );
                    net.features(x)
                        .try_into_vec_as::<f32>()
                        .map(|_| ())
                        .map_err(|e| anyhow::anyhow!("{e}"))
                })
            };
            let rate = rate_of(&net)?;
            let folded_rate = rate_of(&folded)?;
            println!(
                "| {side} | {b} | {rate:.1} | {folded_rate:.1} | {:.3} | {:.2} | {:.0} |",
                flops as f64 / 1e9,
                rate * flops as f64 / 1e9,
                peak_rss_mib()
            );
            rows.push(ForwardRow {
                side,
                batch: b,
                img_per_s: rate,
            });
            if let Some(peer) = peer.as_deref_mut() {
                peer.row(side, b)?;
            }
        }
    }
    Ok(rows)
}

/// The real photos of the top-1 check (`ops/fetch-test-photos.sh`).
const PEER_PHOTOS: [&str; 4] = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"];
const PEER_PHOTO_DIR: &str = "ops/test-photos";
const PEER_SCRIPT: &str = "ops/peer-ort.sh";
/// The side the photos are classified at, as MobileNetV2 was trained.
const PEER_PHOTO_SIDE: usize = 224;

/// One JSON line of `ops/peer_ort.py`.
#[derive(Debug, PartialEq)]
enum PeerRecord {
    /// ONNX Runtime's version, printed first.
    Version(String),
    Row(ForwardRow),
    /// A photo, its top-1 ImageNet class and that class's probability.
    Top1(String, usize, f64),
}

/// Parses one line of `ops/peer_ort.py`'s output: `None` for a line that is not JSON.
fn parse_peer_line(line: &str) -> anyhow::Result<Option<PeerRecord>> {
    if !line.trim_start().starts_with('{') {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("peer output line {line:?}"))?;
    let int = |key: &str| v[key].as_u64().map(|n| n as usize);
    let record = if let Some(version) = v["ort"].as_str() {
        PeerRecord::Version(version.to_string())
    } else if let (Some(side), Some(batch), Some(img_per_s)) =
        (int("input"), int("batch"), v["img_per_s"].as_f64())
    {
        PeerRecord::Row(ForwardRow {
            side,
            batch,
            img_per_s,
        })
    } else if let (Some(photo), Some(top1), Some(p)) =
        (v["photo"].as_str(), int("top1"), v["p"].as_f64())
    {
        PeerRecord::Top1(photo.to_string(), top1, p)
    } else {
        anyhow::bail!("unexpected peer output line {line:?}");
    };
    Ok(Some(record))
}

/// `ops/peer-ort.sh --serve` running beside the bench: it measures a row when asked, and
/// classifies the photos when its stdin closes. Killed if dropped before [`finish`].
///
/// [`finish`]: OrtPeer::finish
struct OrtPeer {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    version: String,
    rows: Vec<ForwardRow>,
}

impl OrtPeer {
    /// Starts the script and waits for its version line (after any set-up: a first run
    /// makes the virtual environment and the ONNX file).
    fn start(mut command: std::process::Command) -> anyhow::Result<Self> {
        use std::process::Stdio;
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting bash {PEER_SCRIPT}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            anyhow::bail!("{PEER_SCRIPT}: no pipes");
        };
        let mut peer = Self {
            child,
            stdin: Some(stdin),
            stdout: std::io::BufReader::new(stdout),
            version: String::new(),
            rows: Vec::new(),
        };
        match peer.next_record()? {
            Some(PeerRecord::Version(version)) => peer.version = version,
            other => anyhow::bail!("{PEER_SCRIPT} began with {other:?}, not its version"),
        }
        Ok(peer)
    }

    /// The next JSON record, `None` at the end of the script's output.
    fn next_record(&mut self) -> anyhow::Result<Option<PeerRecord>> {
        use std::io::BufRead as _;
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            if let Some(record) = parse_peer_line(&line)? {
                return Ok(Some(record));
            }
        }
    }

    /// Images per second of ONNX Runtime on `batch` inputs of `side`x`side`.
    fn row(&mut self, side: usize, batch: usize) -> anyhow::Result<f64> {
        use std::io::Write as _;
        let stdin = self.stdin.as_mut().context("the peer's stdin is closed")?;
        writeln!(stdin, "{side} {batch}")?;
        stdin.flush()?;
        match self.next_record()? {
            Some(PeerRecord::Row(row)) if row.side == side && row.batch == batch => {
                self.rows.push(row);
                Ok(row.img_per_s)
            }
            None => {
                let status = self.child.wait()?;
                anyhow::bail!(
                    "{PEER_SCRIPT} ended ({status}) before its {side}x{side} batch {batch} row"
                )
            }
            other => {
                anyhow::bail!("{PEER_SCRIPT} answered {other:?} for {side}x{side} batch {batch}")
            }
        }
    }

    /// Closes its stdin and returns the photos' top-1 classes, once the script exited well.
    fn finish(&mut self) -> anyhow::Result<Vec<(String, usize, f64)>> {
        drop(self.stdin.take());
        let mut top1 = Vec::new();
        while let Some(record) = self.next_record()? {
            match record {
                PeerRecord::Top1(photo, class, p) => top1.push((photo, class, p)),
                other => anyhow::bail!("{PEER_SCRIPT} printed {other:?} after its rows"),
            }
        }
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "{PEER_SCRIPT} failed ({status})");
        Ok(top1)
    }
}

impl Drop for OrtPeer {
    fn drop(&mut self) {
        // Only our own child, and only if it is still running (an error cut the bench short).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The threads burn's CPU backend computes on: rayon's global pool, which is
/// `RAYON_NUM_THREADS` when set and positive, else one per core.
fn burn_cpu_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// `--peer ort`: MobileNetV2's bare forward rows on `device`, each followed by the same row
/// in ONNX Runtime on the same weights, with the same threads, batch sizes and input values
/// (written to files the script reads); then the top-1 class of each real photo,
/// preprocessed once by sieve, from both. Fails if they disagree on one.
fn ort_peer(
    weights: &std::path::Path,
    batches: &[usize],
    seconds: f64,
    device: &Device,
) -> anyhow::Result<()> {
    let photo_dir = std::path::Path::new(PEER_PHOTO_DIR);
    let missing: Vec<&str> = PEER_PHOTOS
        .iter()
        .copied()
        .filter(|photo| !photo_dir.join(photo).exists())
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "--peer ort needs the real photos {missing:?} in {PEER_PHOTO_DIR}/ (bash ops/fetch-test-photos.sh)"
    );
    anyhow::ensure!(
        std::path::Path::new(PEER_SCRIPT).exists(),
        "--peer ort runs {PEER_SCRIPT}, relative to the working directory: run from the repository root"
    );
    let dir = tempfile::tempdir()?;
    let write_f32 = |name: &str, values: &[f32]| -> anyhow::Result<PathBuf> {
        let path = dir.path().join(name);
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, bytes)?;
        Ok(path)
    };
    // The bench's inputs: one file per side holding the largest batch; a smaller batch
    // reads its prefix, which is what `random_inputs` draws for it with the same seed.
    let largest = batches.iter().copied().max().unwrap_or(1);
    for side in MOBILENET_SIDES {
        let values = random_inputs(largest * 3 * side * side, MOBILENET_INPUT_SEED);
        write_f32(&format!("input-{side}.f32"), &values)?;
    }
    let mut photos = Vec::new();
    for photo in PEER_PHOTOS {
        let path = photo_dir.join(photo);
        let image = image::open(&path).with_context(|| format!("reading {}", path.display()))?;
        photos.extend(mobilenet::imagenet_preprocess(
            &image,
            PEER_PHOTO_SIDE as u32,
        )?);
    }
    let photo_file = write_f32("photos.f32", &photos)?;
    let sieve_top1 = sieve_top1(weights, photos, device)?;

    let threads = burn_cpu_threads();
    let list = |values: &[usize]| {
        values
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut command = std::process::Command::new("bash");
    command
        .arg(PEER_SCRIPT)
        .arg("--serve")
        .arg("--pth")
        .arg(weights)
        .args(["--threads", &threads.to_string()])
        .args(["--batches", &list(batches)])
        .args(["--sides", &list(&MOBILENET_SIDES)])
        .args(["--seconds", &seconds.to_string()])
        .arg("--inputs-dir")
        .arg(dir.path())
        .arg("--photo-tensors")
        .arg(&photo_file)
        .args(["--photo-names", &PEER_PHOTOS.join(",")]);
    let mut peer = OrtPeer::start(command)?;
    println!(
        "\nbeside it: ONNX Runtime {} ({PEER_SCRIPT}), each row right after sieve's",
        peer.version
    );
    let rows = mobilenet_forward(weights, batches, seconds, device, Some(&mut peer))?;
    let peer_top1 = peer.finish()?;

    println!(
        "\n## MobileNetV2 against ONNX Runtime {} on the same weights: bare forward to the 1280-wide embedding, {threads} threads (ORT: intra-op {threads}, inter-op 1, sequential), same inputs, rows alternating",
        peer.version
    );
    for side in MOBILENET_SIDES {
        println!(
            "\n### {side}x{side}, sieve on {}\n",
            backend::backend_name()
        );
        println!("| batch | sieve img/s | ORT img/s | sieve/ORT |");
        println!("|---|---|---|---|");
        for &batch in batches {
            let find = |rows: &[ForwardRow]| {
                rows.iter()
                    .find(|r| r.side == side && r.batch == batch)
                    .map(|r| r.img_per_s)
            };
            let (Some(ours), Some(theirs)) = (find(&rows), find(&peer.rows)) else {
                anyhow::bail!("no {side}x{side} batch {batch} row from sieve or the peer");
            };
            println!(
                "| {batch} | {ours:.1} | {theirs:.1} | {:.2} |",
                ours / theirs
            );
        }
    }

    anyhow::ensure!(
        peer_top1.len() == PEER_PHOTOS.len(),
        "the peer classified {} photos of {}",
        peer_top1.len(),
        PEER_PHOTOS.len()
    );
    let mut disagreements = Vec::new();
    let mut check = Vec::new();
    for ((photo, &(ours, our_p)), (peer_photo, theirs, their_p)) in
        PEER_PHOTOS.iter().zip(&sieve_top1).zip(&peer_top1)
    {
        anyhow::ensure!(
            photo == peer_photo,
            "the peer answered {peer_photo} for {photo}"
        );
        let verdict = if ours == *theirs { "same" } else { "DIFFERENT" };
        check.push(format!(
            "{photo} {ours} (p {our_p:.2}) / {theirs} (p {their_p:.2}) {verdict}"
        ));
        if ours != *theirs {
            disagreements.push(*photo);
        }
    }
    println!(
        "\ntop-1 on real photos ({PEER_PHOTO_SIDE}x{PEER_PHOTO_SIDE}, sieve's preprocessing for both), sieve / ORT: {}",
        check.join("; ")
    );
    anyhow::ensure!(
        disagreements.is_empty(),
        "sieve and ONNX Runtime disagree on the top-1 class of {disagreements:?}: the two runtimes do not compute the same network"
    );
    println!(
        "top-1 check: sieve and ONNX Runtime agree on all {} photos",
        PEER_PHOTOS.len()
    );
    Ok(())
}

/// sieve's top-1 ImageNet class and its probability for each preprocessed photo
/// (`[3, side, side]` values each, back to back), on `device`.
fn sieve_top1(
    weights: &std::path::Path,
    photos: Vec<f32>,
    device: &Device,
) -> anyhow::Result<Vec<(usize, f64)>> {
    let net = mobilenet::load_imagenet(weights, device)?;
    let side = PEER_PHOTO_SIDE;
    let n = photos.len() / (3 * side * side);
    let x = Tensor::<4>::from_data(TensorData::new(photos, [n, 3, side, side]), device);
    let logits = net
        .forward(x)
        .try_into_vec_as::<f32>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(logits
        .chunks(mobilenet::NUM_CLASSES)
        .map(top1_softmax)
        .collect())
}

/// The argmax of a row of logits and its softmax probability.
fn top1_softmax(logits: &[f32]) -> (usize, f64) {
    let (best, max) = logits
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((0, 0.0));
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    (best, 1.0 / sum)
}

/// Images per second of `step` (one batch of `batch`), after one warm-up call, over at
/// least `seconds` and three calls.
fn measure<E>(
    seconds: f64,
    batch: usize,
    mut step: impl FnMut() -> Result<(), E>,
) -> anyhow::Result<f64>
where
    anyhow::Error: From<E>,
{
    step()?;
    let started = Instant::now();
    let mut calls = 0;
    while calls < 3 || started.elapsed().as_secs_f64() < seconds {
        step()?;
        calls += 1;
    }
    Ok((calls * batch) as f64 / started.elapsed().as_secs_f64())
}

/// The queue path: a private prefix and store, the committee as an artifact, a set of PNGs.
struct QueueBench {
    settings: Settings,
    topology: Topology,
    connection: lapin::Connection,
    publisher: Publisher,
    model: ModelRef,
    keys: Vec<String>,
    store_dir: PathBuf,
}

struct QueueFigures {
    wall: Duration,
    scored: usize,
    failed: usize,
    duplicates: usize,
}

impl QueueFigures {
    fn rate(&self) -> f64 {
        (self.scored + self.failed) as f64 / self.wall.as_secs_f64()
    }
}

impl QueueBench {
    async fn start(base: &Settings, model: &Model, pngs: &[Vec<u8>]) -> anyhow::Result<Self> {
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let tag = &tag[tag.len() - 12..];
        let mut settings = base.clone();
        settings.broker.prefix = format!("bench-{tag}");
        settings.redis.prefix = format!("bench-{tag}");
        let store_dir = std::env::temp_dir().join(format!("sieve-bench-{tag}"));
        std::fs::create_dir_all(&store_dir)?;
        settings.store.root = store_dir.clone();
        settings.http.worker_bind = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        settings.worker.batch_timeout_ms = 20;

        let topology = Topology::from_settings(&settings.broker);
        let connection = broker::connect(&settings.broker, "sieve-tools bench").await?;
        let channel = connection.create_channel().await?;
        topology.declare(&channel).await.context("declaring")?;
        channel.close(200, "declared".into()).await.ok();
        let publisher = Publisher::new(&connection, topology.clone()).await?;

        let store = Store::open(&settings.store)?;
        let (bytes, checksum) = artifact::encode_model(model)?;
        let artifact_key = "models/bench/1.sievemodel".to_string();
        store.put(&artifact_key, bytes.into()).await?;
        let model = ModelRef {
            version_id: ModelVersionId::new(),
            version: 1,
            artifact_key,
            checksum,
        };
        let mut keys = Vec::new();
        for (i, png) in pngs.iter().enumerate() {
            let key = format!("images/bench/{i}.png");
            store.put(&key, png.clone().into()).await?;
            keys.push(key);
        }
        Ok(Self {
            settings,
            topology,
            connection,
            publisher,
            model,
            keys,
            store_dir,
        })
    }

    /// Start a worker with this batch size, warm it up, then time `items` jobs from the
    /// first publish to the last result received.
    async fn run(
        &self,
        batch: usize,
        pipeline: bool,
        items: usize,
    ) -> anyhow::Result<QueueFigures> {
        let mut settings = self.settings.clone();
        settings.worker.batch_size = batch;
        settings.worker.pipeline = pipeline;
        let stop = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind(settings.http.worker_bind).await?;
        let s = stop.clone();
        let worker = tokio::spawn(service::run(
            settings,
            vec![Capability::Prelabel],
            listener,
            async move { s.cancelled().await },
        ));
        let (channel, mut results) = broker::consume(
            &self.connection,
            &self.topology.results_queue(),
            2000,
            "bench-results",
        )
        .await?;

        let measured = async {
            // Warm-up: the model loads, the consumers start.
            self.round(&mut results, batch * 2).await?;
            let started = Instant::now();
            let (scored, failed, duplicates) = self.round(&mut results, items).await?;
            anyhow::Ok(QueueFigures {
                wall: started.elapsed(),
                scored,
                failed,
                duplicates,
            })
        }
        .await;
        channel.close(200, "done".into()).await.ok();
        stop.cancel();
        worker.await.context("bench worker panicked")??;
        measured
    }

    /// Publish `n` jobs and wait for their `n` results.
    async fn round(
        &self,
        results: &mut lapin::Consumer,
        n: usize,
    ) -> anyhow::Result<(usize, usize, usize)> {
        let jobs: Vec<PrelabelJob> = (0..n)
            .map(|i| PrelabelJob {
                size_bytes: None,
                schema: SCHEMA_VERSION,
                job_id: JobId::new(),
                project_id: ProjectId::new(),
                item_id: ItemId::new(),
                object_key: self.keys[i % self.keys.len()].clone(),
                model: self.model.clone(),
            })
            .collect();
        let expected: HashSet<JobId> = jobs.iter().map(|j| j.job_id).collect();
        let publish = async {
            for chunk in jobs.chunks(1000) {
                self.publisher.publish_all(chunk).await?;
            }
            anyhow::Ok(())
        };
        let collect = async {
            let mut seen = HashSet::new();
            let (mut scored, mut failed, mut duplicates) = (0, 0, 0);
            const ACK_EVERY: usize = 256;
            let (mut unacked, mut last) = (0, None);
            while seen.len() < n {
                let delivery = tokio::time::timeout(Duration::from_secs(120), results.next())
                    .await
                    .context("no result for 120 s")?
                    .context("results consumer ended")??;
                let batch = decode_results(&delivery.data)?;
                // Acknowledged in bulk, so that the bench's own consumer is
                // not what limits the rate it measures.
                unacked += 1;
                if unacked >= ACK_EVERY {
                    delivery.ack(BasicAckOptions { multiple: true }).await?;
                    unacked = 0;
                    last = None;
                } else {
                    last = Some(delivery);
                }
                for result in batch {
                    if !expected.contains(&result.job_id) {
                        continue;
                    }
                    if !seen.insert(result.job_id) {
                        duplicates += 1;
                        continue;
                    }
                    match result.outcome {
                        PrelabelOutcome::Scored(_) => scored += 1,
                        PrelabelOutcome::Failed { .. } => failed += 1,
                    }
                }
            }
            if let Some(delivery) = last {
                delivery.ack(BasicAckOptions { multiple: true }).await?;
            }
            anyhow::Ok((scored, failed, duplicates))
        };
        let (published, collected) = tokio::join!(publish, collect);
        published?;
        collected
    }

    async fn cleanup(self) {
        if let Ok(channel) = self.connection.create_channel().await {
            let _ = self.topology.delete(&channel).await;
        }
        self.connection.close(200, "bench done".into()).await.ok();
        let _ = std::fs::remove_dir_all(&self.store_dir);
    }
}

// ---------------------------------------------------------------- train

fn training(args: &BenchArgs) -> anyhow::Result<()> {
    let device = backend::device();
    let n = args.train_images;

    // Heads first: the runs below leave freed memory resident, which would blur their peaks.
    println!(
        "\n## heads mode: K={} linear heads on cached 1280-wide embeddings (synthetic: 10 Gaussian clusters)\n",
        args.members
    );
    println!("| labels | epochs run | wall s | s per epoch | val accuracy | peak RSS MiB |");
    println!("|---|---|---|---|---|---|");
    for &size in &args.head_sizes {
        let data = synthetic_embeddings(size, mobilenet::EMBEDDING_DIM, 10, 5);
        reset_peak_rss();
        let started = Instant::now();
        let options = HeadsOptions {
            members: args.members,
            num_classes: 10,
            epochs: args.head_epochs,
            ..HeadsOptions::default()
        };
        let (_, report) = train_heads(&data, &options, &device, |_| true)?;
        let wall = started.elapsed().as_secs_f64();
        println!(
            "| {size} | {} | {wall:.1} | {:.2} | {:.3} | {:.0} |",
            report.epochs,
            wall / report.epochs.max(1) as f64,
            report.val_accuracy.unwrap_or(f64::NAN),
            peak_rss_mib()
        );
    }

    println!(
        "\n## full mode, small CNN: one epoch of {n} 28x28 images (K={})",
        args.members
    );
    let config = ArchitectureConfig::small_cnn(10, args.members);
    let data = TrainData {
        images: random_inputs(n * config.input_len(), 11),
        labels: (0..n).map(|i| i % 10).collect(),
    };
    reset_peak_rss();
    let start = Committee::init(&config, 1, &device)?;
    let started = Instant::now();
    let options = TrainOptions {
        epochs: 1,
        validation_share: 0.0,
        ..TrainOptions::default()
    };
    train(start, &data, &options, |_| true)?;
    let wall = started.elapsed().as_secs_f64();
    println!(
        "model::train, batch {}, AdamW, no validation split: {wall:.1} s, {:.0} img/s, peak RSS {:.0} MiB",
        options.batch_size,
        n as f64 / wall,
        peak_rss_mib()
    );
    drop(data);

    if !args.skip_mobilenet {
        let m = args.mobilenet_train_images.unwrap_or(n);
        mobilenet_epoch(args, m, &device)?;
    }

    Ok(())
}

/// A heads-mode snapshot's cached embeddings, written to and read back from a local store
/// in both formats: inline JSON numbers (how snapshots carried them before the table) and
/// the binary table that replaced them. What the scheduler and a worker spend on them at
/// each size before any training starts.
async fn snapshot_formats(args: &BenchArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("sieve-bench-snapshots-{}", std::process::id()));
    let store = Store::open(&sieve_shared::settings::StoreSettings::local(dir.clone()))?;
    let measured = snapshot_rows(args, &store).await;
    let _ = std::fs::remove_dir_all(&dir);
    measured
}

async fn snapshot_rows(args: &BenchArgs, store: &Store) -> anyhow::Result<()> {
    println!(
        "\n## snapshots of cached 1280-wide embeddings: inline JSON (before) vs the f32 table\n"
    );
    println!("| labels | format | bytes MB | write s | read + check s | read peak RSS MiB |");
    println!("|---|---|---|---|---|---|");
    for &size in &args.head_sizes {
        let data = synthetic_embeddings(size, mobilenet::EMBEDDING_DIM, 10, 5);
        let rows = || data.embeddings.chunks(data.dim);
        let example = |i: usize, embedding: Option<Vec<f32>>, row: Option<u32>| SnapshotExample {
            item_id: ItemId::new(),
            object_key: format!("projects/p/images/{i:064x}"),
            class_index: data.labels[i] as u32,
            split: Split::Train,
            random: false,
            machine: false,
            embedding_row: row,
            embedding,
            boxes: None,
        };
        let snapshot = |examples, embeddings| Snapshot {
            schema: SCHEMA_VERSION,
            project_id: ProjectId::new(),
            class_names: (0..10).map(|c| format!("class {c}")).collect(),
            examples,
            embeddings,
        };

        // Before: every embedding inline, one JSON document built, stored and parsed whole.
        let started = Instant::now();
        let inline = snapshot(
            rows()
                .enumerate()
                .map(|(i, e)| example(i, Some(e.to_vec()), None))
                .collect(),
            None,
        );
        let bytes = serde_json::to_vec(&inline)?;
        drop(inline);
        let inline_len = bytes.len();
        store.put("inline.json", bytes.into()).await?;
        let write = started.elapsed().as_secs_f64();
        reset_peak_rss();
        let started = Instant::now();
        let read: Snapshot = serde_json::from_slice(&store.get("inline.json").await?)?;
        let decoded = read
            .examples
            .iter()
            .filter(|e| e.embedding.is_some())
            .count();
        let read_s = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            decoded == size,
            "inline: {decoded} of {size} embeddings read back"
        );
        drop(read);
        println!(
            "| {size} | inline JSON (before) | {:.0} | {write:.2} | {read_s:.2} | {:.0} |",
            inline_len as f64 / 1e6,
            peak_rss_mib()
        );

        // Now: the rows streamed into a table, the document without them.
        let started = Instant::now();
        let mut table = TableWriter::create(store, "table.f32", data.dim).await?;
        let mut examples = Vec::with_capacity(size);
        for (i, e) in rows().enumerate() {
            let row = table.push(e).await?;
            examples.push(example(i, None, row));
        }
        let header = serde_json::to_vec(&snapshot(examples, table.finish().await?))?;
        let header_len = header.len();
        store.put("table.json", header.into()).await?;
        let write = started.elapsed().as_secs_f64();
        reset_peak_rss();
        let started = Instant::now();
        let read: Snapshot = serde_json::from_slice(&store.get("table.json").await?)?;
        let table = read.embeddings.as_ref().context("the table is missing")?;
        let cached = Embeddings::load(store, table).await?;
        let decoded = read
            .examples
            .iter()
            .filter(|e| e.embedding_row.and_then(|r| cached.row(r)).is_some())
            .count();
        let read_s = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            decoded == size,
            "table: {decoded} of {size} embeddings read back"
        );
        println!(
            "| {size} | f32 table + JSON | {:.0} | {write:.2} | {read_s:.2} | {:.0} |",
            (header_len as u64 + u64::from(table.rows) * u64::from(table.dim) * 4) as f64 / 1e6,
            peak_rss_mib()
        );
    }
    Ok(())
}

/// One epoch of full-mode fine-tuning of a MobileNetV2 committee at 96x96, through
/// [`model::train`](train) as a training job runs it: K heads on the ImageNet backbone
/// (random weights when the file is absent), forward, backward and AdamW over every layer, and
/// again with only the last blocks trained (`--unfreeze-last`).
fn mobilenet_epoch(args: &BenchArgs, n: usize, device: &Device) -> anyhow::Result<()> {
    let side = 96;
    let config = ArchitectureConfig::mobilenet_v2(10, args.members, side);
    let options = TrainOptions {
        epochs: 1,
        validation_share: 0.0,
        ..TrainOptions::default()
    };
    let batch = TrainParams::for_mode(ModelArch::MobilenetV2, TrainMode::Full).batch_size as usize;
    let options = TrainOptions {
        batch_size: batch,
        ..options
    };
    let weights = if args.weights.exists() {
        "ImageNet"
    } else {
        "random"
    };
    println!(
        "\n## full mode, MobileNetV2 at {side}x{side}: one epoch of {n} images, batch {batch}, K={}, {weights} weights\n",
        args.members
    );
    println!("| layers trained | wall s | img/s | peak RSS MiB |");
    println!("|---|---|---|---|");
    let data = TrainData {
        images: random_inputs(n * config.input_len(), 3),
        labels: (0..n).map(|i| i % 10).collect(),
    };
    let backbone = if args.weights.exists() {
        mobilenet::load_imagenet(&args.weights, device)?
    } else {
        mobilenet::MobileNetV2::new(device)
    };
    let start = Committee::from_backbone(&config, backbone, device)?;
    let mut variants = vec![None];
    variants.extend(args.unfreeze_last.iter().map(|&blocks| Some(blocks)));
    for unfrozen_blocks in variants {
        reset_peak_rss();
        let options = TrainOptions {
            unfrozen_blocks,
            ..options.clone()
        };
        let started = Instant::now();
        train(start.clone(), &data, &options, |_| true)?;
        let wall = started.elapsed().as_secs_f64();
        println!(
            "| {} | {wall:.1} | {:.1} | {:.0} |",
            match unfrozen_blocks {
                None => "every layer".to_string(),
                Some(blocks) => format!("last {blocks} of 17 blocks, final conv, heads"),
            },
            n as f64 / wall,
            peak_rss_mib()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- helpers

/// Multiply-adds of one small-CNN committee forward (convolutions, embedding, heads).
pub fn small_cnn_multiply_adds(config: &ArchitectureConfig) -> u64 {
    let s = config.input_size;
    let (c1, c2) = (16, 32);
    let conv1 = s * s * c1 * config.channels * 9;
    let conv2 = (s / 2) * (s / 2) * c2 * c1 * 9;
    let embed = c2 * (s / 4) * (s / 4) * config.embedding_dim;
    let heads = config.members * config.embedding_dim * config.num_classes;
    (conv1 + conv2 + embed + heads) as u64
}

fn random_inputs(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Distinct noisy PNGs of `side`x`side` (grayscale when `channels` is 1).
fn sample_pngs(n: usize, side: u32, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let img = image::GrayImage::from_fn(side, side, |_, _| image::Luma([rng.random()]));
            let mut out = Cursor::new(Vec::new());
            // Encoding an in-memory image cannot fail.
            let _ = img.write_to(&mut out, image::ImageFormat::Png);
            out.into_inner()
        })
        .collect()
}

fn synthetic_embeddings(n: usize, dim: usize, classes: usize, seed: u64) -> EmbeddingData {
    let mut rng = StdRng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..classes)
        .map(|_| (0..dim).map(|_| rng.random_range(0.0..1.0)).collect())
        .collect();
    let labels: Vec<usize> = (0..n).map(|i| i % classes).collect();
    let mut embeddings = Vec::with_capacity(n * dim);
    for &l in &labels {
        embeddings.extend(
            centres[l]
                .iter()
                .map(|c| (c + rng.random_range(-1.5..1.5_f32)).max(0.0)),
        );
    }
    EmbeddingData {
        embeddings,
        dim,
        labels,
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flop_counts_match_the_architectures() {
        // conv1 112,896 + conv2 903,168 + embedding 401,408 + 3 heads 7,680.
        assert_eq!(
            small_cnn_multiply_adds(&ArchitectureConfig::small_cnn(10, 3)),
            1_425_152
        );
        // The MobileNetV2 paper: about 300 million multiply-adds at 224x224.
        let m = mobilenet::multiply_adds(224, 224, true);
        assert!((290_000_000..320_000_000).contains(&m), "{m}");
    }

    #[test]
    fn the_peer_output_is_read_line_by_line() -> anyhow::Result<()> {
        assert_eq!(
            parse_peer_line(r#"{"ort": "1.32.0", "threads": 2}"#)?,
            Some(PeerRecord::Version("1.32.0".into()))
        );
        assert_eq!(
            parse_peer_line(r#"{"input": 96, "batch": 16, "img_per_s": 1500.5}"#)?,
            Some(PeerRecord::Row(ForwardRow {
                side: 96,
                batch: 16,
                img_per_s: 1500.5
            }))
        );
        assert_eq!(
            parse_peer_line(r#"{"photo": "coffee.png", "top1": 967, "p": 0.99}"#)?,
            Some(PeerRecord::Top1("coffee.png".into(), 967, 0.99))
        );
        assert_eq!(parse_peer_line("making ops/.venv-peer")?, None);
        assert!(parse_peer_line(r#"{"what": 1}"#).is_err());
        Ok(())
    }

    #[test]
    fn top1_is_the_argmax_with_its_softmax_probability() {
        let (class, p) = top1_softmax(&[0.0, 2.0_f32.ln(), 0.0]);
        assert_eq!(class, 1);
        assert!((p - 0.5).abs() < 1e-6, "{p}");
    }

    /// The peer reads a smaller batch as the prefix of the largest one's inputs.
    #[test]
    fn bench_inputs_of_a_smaller_batch_are_a_prefix() {
        let large = random_inputs(64 * 10, MOBILENET_INPUT_SEED);
        let small = random_inputs(16 * 10, MOBILENET_INPUT_SEED);
        assert_eq!(&large[..small.len()], &small[..]);
    }
}
