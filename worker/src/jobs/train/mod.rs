//! The training loop: one `TrainJob` at a time, from snapshot to artifact.
//!
//! The run is reported on `sieve.train.events` (started, each epoch,
//! completed or failed) and the job is acknowledged only after its outcome
//! was confirmed. A worker asked to stop mid-run cancels at the next epoch
//! boundary and rejects the job back onto the queue: the run is re-queued,
//! never half-registered (the scheduler registers a version only on
//! `completed`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use sieve_shared::embedding_table::{Embeddings, TableError};
use sieve_shared::messages::{
    HoldoutEvaluation, HoldoutMetrics, LrSchedule, ModelArch, PairedOutcomes, SCHEMA_VERSION,
    Snapshot, Split, TrainEvent, TrainEventKind, TrainJob, TrainMode, decode,
};
use sieve_shared::{broker, retry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::artifact;
use crate::context::Worker;
use crate::images;
use crate::model::{
    self, ArchitectureConfig, Committee, CommitteeProbs, EmbeddingData, EpochReport, HeadsOptions,
    MobileNetV2, Model, ModelError, TrainData, TrainOptions,
};

mod boxes;

/// Why a run did not complete, and so what happens to its job.
#[derive(Debug, thiserror::Error)]
pub(super) enum RunError {
    /// Nothing will make this job succeed: report `failed`, acknowledge.
    #[error("{0}")]
    Permanent(String),
    /// Try again (possibly elsewhere): reject with requeue.
    #[error("{0}")]
    Transient(String),
    #[error("cancelled by shutdown")]
    Cancelled,
    #[error("cancelled on request")]
    CancelledByRequest,
}

pub async fn run(
    worker: Arc<Worker>,
    connection: Arc<Connection>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let queue = worker.topology().train_queue();
    let (channel, mut consumer) =
        broker::consume(&connection, &queue, 1, &format!("{}-train", worker.id))
            .await
            .with_context(|| format!("consuming {queue}"))?;
    let _consuming = worker.health.consuming("train", &channel);
    loop {
        let delivery = tokio::select! {
            () = stop.cancelled() => break,
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "train consumer error");
                    continue;
                }
                None => anyhow::bail!("the {queue} consumer was cancelled by the broker"),
            },
        };
        handle(&worker, delivery, &stop).await;
    }
    channel.close(200, "draining".into()).await.ok();
    Ok(())
}

async fn publish(worker: &Worker, job: &TrainJob, kind: TrainEventKind) -> anyhow::Result<()> {
    worker
        .publisher
        .publish(&TrainEvent {
            schema: SCHEMA_VERSION,
            run_id: job.run_id,
            project_id: job.project_id,
            version_id: job.version_id,
            kind,
        })
        .await
        .context("publishing a training event")
}

async fn handle(worker: &Arc<Worker>, delivery: Delivery, stop: &CancellationToken) {
    let job = match decode::<TrainJob>(&delivery.data) {
        Ok(job) => job,
        Err(err) => {
            tracing::warn!(error = %err, "undecodable train job; dead-lettering it");
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            return;
        }
    };
    if worker.is_cancelled(job.run_id) {
        tracing::info!(run = %job.run_id, "skipping a cancelled training run");
        let _ = delivery.ack(BasicAckOptions::default()).await;
        return;
    }
    if worker.is_finished(job.run_id) {
        // Redelivered while this worker trained it (its acknowledgement was
        // stale after a broker restart): the outcome is already reported.
        tracing::info!(run = %job.run_id, "skipping a redelivered run this worker already finished");
        let _ = delivery.ack(BasicAckOptions::default()).await;
        return;
    }
    tracing::info!(run = %job.run_id, version = job.version, "training started");
    let _ = publish(
        worker,
        &job,
        TrainEventKind::Started {
            worker_id: worker.id.clone(),
        },
    )
    .await;
    let outcome = train(worker, &job, stop).await;
    let settled = match outcome {
        Ok(completed) => publish(worker, &job, completed).await,
        Err(RunError::Permanent(reason)) => {
            tracing::warn!(run = %job.run_id, %reason, "training failed");
            publish(worker, &job, TrainEventKind::Failed { reason }).await
        }
        Err(RunError::CancelledByRequest) => {
            // The scheduler has ended the run already; nothing to report.
            tracing::info!(run = %job.run_id, "training cancelled on request; dropping the job");
            let _ = delivery.ack(BasicAckOptions::default()).await;
            return;
        }
        Err(RunError::Cancelled) => {
            tracing::warn!(run = %job.run_id, "training interrupted by shutdown; requeueing the job");
            requeue(&delivery).await;
            return;
        }
        Err(RunError::Transient(reason)) => {
            let pause = requeue_backoff(retry::delivery_count(&delivery.properties));
            tracing::warn!(
                run = %job.run_id,
                %reason,
                pause_s = pause.as_secs(),
                "training failed transiently; requeueing the job after a pause"
            );
            // Held, not requeued at once: a store that is down would otherwise
            // pass the job round the fleet as fast as the broker can.
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stop.cancelled() => {}
            }
            requeue(&delivery).await;
            return;
        }
    };
    match settled {
        Ok(()) => {
            worker.finish_run(job.run_id);
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Err(err) => {
            tracing::error!(
                error = format!("{err:#}"),
                "could not report the run; requeueing it"
            );
            requeue(&delivery).await;
        }
    }
}

async fn requeue(delivery: &Delivery) {
    let _ = delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await;
}

/// How long a training job that failed transiently is held before it goes
/// back to the queue: 2 s after its first delivery, doubling with each
/// redelivery, at most a minute.
fn requeue_backoff(deliveries_before: u32) -> Duration {
    let seconds = 2u64.saturating_mul(1 << deliveries_before.min(5));
    Duration::from_secs(seconds.min(60))
}

async fn load_images(
    worker: &Worker,
    config: &ArchitectureConfig,
    keys: Vec<String>,
) -> Result<Vec<Result<Vec<f32>, String>>, RunError> {
    let fetched: Vec<_> = futures_util::stream::iter(keys)
        .map(|k| {
            let store = worker.store.clone();
            async move {
                let got = store.get(&k).await;
                (k, got)
            }
        })
        .buffered(16)
        .collect()
        .await;
    let mut bytes: Vec<Result<Bytes, String>> = Vec::with_capacity(fetched.len());
    for (key, got) in fetched {
        bytes.push(match got {
            Ok(b) => Ok(b),
            Err(err) if err.is_transient() => return Err(RunError::Transient(err.to_string())),
            Err(err) => Err(format!("{key}: {err}")),
        });
    }
    let config = config.clone();
    let max_pixels = worker.settings.ingest.max_pixels;
    tokio::task::spawn_blocking(move || {
        bytes
            .into_iter()
            .map(|b| {
                b.and_then(|b| {
                    images::preprocess(&b, &config, max_pixels).map_err(|e| e.to_string())
                })
            })
            .collect()
    })
    .await
    .map_err(|e| RunError::Permanent(format!("image decoding panicked: {e}")))
}

/// What a mode's training produced, ready to register.
pub(super) struct Trained {
    pub(super) model: Model,
    pub(super) evaluations: Vec<HoldoutEvaluation>,
    /// The base version's verdicts on the same holdout, in the same order, when it can be
    /// scored there.
    pub(super) base: Option<Vec<HoldoutEvaluation>>,
    pub(super) train_size: usize,
    /// A detector's average precision at IoU 0.5 on the holdout.
    pub(super) average_precision: Option<f64>,
}

async fn train(
    worker: &Arc<Worker>,
    job: &TrainJob,
    stop: &CancellationToken,
) -> Result<TrainEventKind, RunError> {
    let snapshot_bytes = worker.store.get(&job.snapshot_key).await.map_err(|e| {
        if e.is_transient() {
            RunError::Transient(e.to_string())
        } else {
            RunError::Permanent(format!("snapshot unavailable: {e}"))
        }
    })?;
    let snapshot: Snapshot = serde_json::from_slice(&snapshot_bytes)
        .map_err(|e| RunError::Permanent(format!("corrupt snapshot {}: {e}", job.snapshot_key)))?;
    drop(snapshot_bytes);
    let classes = job.class_names.len();
    if let Some(bad) = snapshot
        .examples
        .iter()
        .find(|e| e.class_index as usize >= classes)
    {
        return Err(RunError::Permanent(format!(
            "snapshot example {} has class {} but the project has {classes} classes",
            bad.item_id, bad.class_index
        )));
    }
    let mode = job.params.mode;
    if let Some(problem) = job.params.problem() {
        return Err(RunError::Permanent(problem));
    }
    let trained = match (job.params.arch, mode) {
        // Measurement only: the same answer for every image, nothing to learn.
        (ModelArch::Null, _) => Trained {
            model: Model::Classifier(
                Committee::init(
                    &ArchitectureConfig::null(classes, job.params.members.max(2) as usize),
                    0,
                    &crate::backend::device(),
                )
                .map_err(|e| RunError::Permanent(e.to_string()))?,
            ),
            evaluations: Vec::new(),
            base: None,
            train_size: 0,
            average_precision: None,
        },
        (ModelArch::Detector, _) => boxes::train(worker, job, &snapshot, stop).await?,
        // Pretrained faces: the run packages MTCNN's networks into the version, trains
        // plate heads once people have boxed plates, and evaluates both on people's boxes.
        (ModelArch::Faces, _) => boxes::package_faces(worker, job, &snapshot, stop).await?,
        (_, TrainMode::Full) => train_full(worker, job, &snapshot, stop).await?,
        (_, TrainMode::Heads) => train_heads(worker, job, &snapshot, stop).await?,
    };
    let Trained {
        model,
        evaluations,
        base,
        train_size,
        average_precision,
    } = trained;
    let holdout_size = evaluations.len();
    let accuracy = accuracy_of(&evaluations);
    let base_accuracy = base.as_deref().and_then(accuracy_of);
    let paired = base
        .as_deref()
        .and_then(|base| PairedOutcomes::of(&evaluations, base));

    let architecture = serde_json::to_value(model.config()).unwrap_or_default();
    let (bytes, checksum) = tokio::task::spawn_blocking(move || artifact::encode_model(&model))
        .await
        .map_err(|e| RunError::Permanent(format!("encoding the artifact panicked: {e}")))?
        .map_err(|e| RunError::Permanent(e.to_string()))?;
    // Named by its content as well: a second training of the same run (a
    // redelivered job on another worker) writes its own object and can
    // never replace the artifact the scheduler registered.
    let artifact_key = format!(
        "projects/{}/models/{}-{}.bin",
        job.project_id,
        job.version_id,
        checksum.get(..16).unwrap_or(&checksum)
    );
    worker
        .store
        .put(&artifact_key, Bytes::from(bytes))
        .await
        .map_err(|e| RunError::Transient(e.to_string()))?;
    tracing::info!(run = %job.run_id, version = job.version, ?mode, train = train_size, holdout = holdout_size, ?accuracy, "training completed");
    Ok(TrainEventKind::Completed {
        artifact_key,
        checksum,
        architecture,
        metrics: HoldoutMetrics {
            holdout_size: holdout_size as u32,
            accuracy,
            train_size: train_size as u32,
            evaluations,
            base_accuracy,
            average_precision,
            paired,
        },
    })
}

/// The base version from the model cache, if the job names one.
async fn base_model(worker: &Worker, job: &TrainJob) -> Result<Option<Arc<Committee>>, RunError> {
    let Some(base) = &job.base else {
        return Ok(None);
    };
    match worker.cache.get(base).await {
        // A classification run builds on a classifier only.
        Ok(model) => Ok(model.classifier().cloned().map(Arc::new)),
        Err(err) if err.is_transient() => Err(RunError::Transient(err.to_string())),
        Err(err) => Err(RunError::Permanent(format!("base model refused: {err}"))),
    }
}

/// Where a MobileNetV2 run starts: the base version when it has the same
/// backbone shape, input size and classes (its embeddings, cached or not,
/// are what the new heads will read, so both can be compared on them), or
/// the ImageNet import with fresh heads for a project's first model. Also
/// the base itself, to score on the same holdout, and where the backbone
/// came from, for the log.
async fn mobilenet_start(
    worker: &Worker,
    job: &TrainJob,
) -> Result<(Arc<Committee>, Option<Arc<Committee>>, String), RunError> {
    let classes = job.class_names.len();
    let members = job.params.members.max(2) as usize;
    let config =
        ArchitectureConfig::mobilenet_v2(classes, members, job.params.input_size() as usize);
    let base = base_model(worker, job).await?.filter(|m| {
        m.has_frozen_backbone()
            && m.config().input_size == config.input_size
            && m.config().num_classes == classes
    });
    if let Some(model) = &base {
        return Ok((model.clone(), base.clone(), "the base version".to_string()));
    }
    let from = worker
        .settings
        .worker
        .mobilenet_weights
        .display()
        .to_string();
    let backbone = imagenet_backbone(worker).await?;
    let start = Committee::from_backbone(&config, backbone, &crate::backend::device())
        .map_err(|e| RunError::Permanent(e.to_string()))?;
    Ok((Arc::new(start), None, from))
}

/// torchvision's MobileNetV2 with its ImageNet weights, from the file
/// `worker.mobilenet_weights` names, on this worker's device.
pub(super) async fn imagenet_backbone(worker: &Worker) -> Result<MobileNetV2, RunError> {
    let path = worker.settings.worker.mobilenet_weights.clone();
    tokio::task::spawn_blocking(move || {
        model::mobilenet::load_imagenet(&path, &crate::backend::device()).map_err(|e| {
            RunError::Permanent(format!(
                "the MobileNetV2 ImageNet weights at {} do not load ({e}); run ops/fetch-weights.sh or set worker.mobilenet_weights",
                path.display()
            ))
        })
    })
    .await
    .map_err(|e| RunError::Permanent(format!("loading the backbone panicked: {e}")))?
}

/// Runs `work` (a blocking training loop) with its epochs reported on
/// `sieve.train.events` and a cancel flag raised by shutdown or a cancel
/// notice; maps a cancelled loop to the right [`RunError`].
pub(super) async fn supervised<T: Send + 'static>(
    worker: &Arc<Worker>,
    job: &TrainJob,
    stop: &CancellationToken,
    work: impl FnOnce(&mut (dyn FnMut(&EpochReport) -> bool + Send)) -> Result<T, ModelError>
    + Send
    + 'static,
) -> Result<T, RunError> {
    let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<EpochReport>();
    let cancelled = Arc::new(AtomicBool::new(false));
    let cancel_flag = cancelled.clone();
    let watch_stop = stop.clone();
    let watch_worker = worker.clone();
    let run_id = job.run_id;
    let watcher = tokio::spawn(async move {
        // Shutdown or a cancel notice, whichever comes first.
        loop {
            tokio::select! {
                () = watch_stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if watch_worker.is_cancelled(run_id) {
                        break;
                    }
                }
            }
        }
        cancel_flag.store(true, Ordering::SeqCst);
    });
    let training = tokio::task::spawn_blocking(move || {
        let mut on_epoch = |report: &EpochReport| {
            let _ = progress_tx.send(report.clone());
            !cancelled.load(Ordering::SeqCst)
        };
        work(&mut on_epoch)
    });
    let forward = async {
        while let Some(report) = progress_rx.recv().await {
            let _ = publish(
                worker,
                job,
                TrainEventKind::Progress {
                    epoch: report.epoch as u32,
                    loss: report.loss,
                    val_accuracy: report.val_accuracy,
                },
            )
            .await;
        }
    };
    let (trained, ()) = tokio::join!(training, forward);
    watcher.abort();
    match trained.map_err(|e| RunError::Permanent(format!("training panicked: {e}")))? {
        Ok(value) => Ok(value),
        Err(ModelError::Cancelled) if worker.is_cancelled(job.run_id) => {
            Err(RunError::CancelledByRequest)
        }
        Err(ModelError::Cancelled) => Err(RunError::Cancelled),
        Err(err) => Err(RunError::Permanent(err.to_string())),
    }
}

/// Full mode: the small CNN trained whole, from the base version's weights
/// (or a fresh initialisation); or MobileNetV2 fine-tuned with its heads,
/// whole or its last `unfrozen_blocks`, from the base version (or the
/// ImageNet import with fresh heads). A fine-tuned backbone is recorded as
/// this version's own ([`ArchitectureConfig::backbone`]): embeddings of
/// other versions no longer describe it.
async fn train_full(
    worker: &Arc<Worker>,
    job: &TrainJob,
    snapshot: &Snapshot,
    stop: &CancellationToken,
) -> Result<Trained, RunError> {
    let classes = job.class_names.len();
    let members = job.params.members.max(2) as usize;
    let (config, start, base_model) = match job.params.arch {
        ModelArch::SmallCnn | ModelArch::ResCnn => {
            let config = ArchitectureConfig {
                arch: job.params.arch.as_str().to_string(),
                ..ArchitectureConfig::small_cnn(classes, members)
            };
            let base = base_model(worker, job).await?;
            let base_model = base.filter(|model| model.config() == &config);
            let start = match &base_model {
                Some(model) => (**model).clone(),
                None => Committee::init(&config, job.params.seed, &crate::backend::device())
                    .map_err(|e| RunError::Permanent(e.to_string()))?,
            };
            (config, start, base_model)
        }
        ModelArch::Null => {
            return Err(RunError::Permanent(
                "the null architecture has nothing to train".into(),
            ));
        }
        // Matched before: the face detector is not trained.
        ModelArch::Faces => {
            return Err(RunError::Permanent(
                "the face detector is pretrained and has nothing to train".into(),
            ));
        }
        // Refused by `TrainParams::problem` before a run starts.
        ModelArch::Detector => {
            return Err(RunError::Permanent(
                "the detector trains in heads mode only".into(),
            ));
        }
        ModelArch::MobilenetV2 => {
            let (start, base, _) = mobilenet_start(worker, job).await?;
            let start = Committee::clone(&start).with_backbone_of(job.version_id.to_string());
            (start.config().clone(), start, base)
        }
    };
    // Every image is held as model input for the whole run: refuse at once,
    // with the figure, what would otherwise end in an out-of-memory kill.
    let needed = snapshot.examples.len() as u64 * config.input_len() as u64 * 4;
    let allowed = worker.settings.worker.train_images_mib << 20;
    if needed > allowed {
        return Err(RunError::Permanent(format!(
            "full mode holds every training image as model input: {} images at {}x{}x{} need {} MiB, above worker.train_images_mib = {} MiB; raise it on workers with the memory, or train on fewer labels, a smaller input size, or in heads mode",
            snapshot.examples.len(),
            config.channels,
            config.input_size,
            config.input_size,
            needed >> 20,
            allowed >> 20
        )));
    }
    let keys = snapshot
        .examples
        .iter()
        .map(|e| e.object_key.clone())
        .collect();
    let inputs = load_images(worker, &config, keys).await?;
    let mut train_data = TrainData {
        images: Vec::new(),
        labels: Vec::new(),
    };
    let mut holdout = TrainData {
        images: Vec::new(),
        labels: Vec::new(),
    };
    // Per holdout example: picked at random (seed set, audit sample)?
    let mut holdout_random = Vec::new();
    let mut skipped = 0usize;
    for (example, input) in snapshot.examples.iter().zip(inputs) {
        let Ok(input) = input else {
            skipped += 1;
            continue;
        };
        let target = match example.split {
            Split::Train => &mut train_data,
            Split::Holdout => {
                holdout_random.push(example.random);
                &mut holdout
            }
        };
        target.images.extend_from_slice(&input);
        target.labels.push(example.class_index as usize);
    }
    if skipped > 0 {
        tracing::warn!(run = %job.run_id, skipped, "snapshot images that could not be used were skipped");
    }

    let validation_share = TrainOptions::default().validation_share;
    let options = TrainOptions {
        epochs: job
            .params
            .epochs_for(train_data.labels.len(), validation_share) as usize,
        batch_size: job.params.batch_size.max(1) as usize,
        learning_rate: job.params.learning_rate,
        cosine: job.params.schedule == LrSchedule::Cosine,
        seed: job.params.seed,
        unfrozen_blocks: job.params.unfrozen_blocks.map(|n| n as usize),
        ..TrainOptions::default()
    };
    let train_size = train_data.labels.len();
    let trained = supervised(worker, job, stop, move |on_epoch| {
        model::train(start, &train_data, &options, on_epoch)
    })
    .await?;

    evaluated(
        trained,
        base_model,
        Committee::predict,
        holdout.images,
        holdout.labels,
        holdout_random,
        train_size,
    )
    .await
}

/// Snapshot examples whose embeddings are computed per backbone pass when
/// the snapshot has none cached: bounds memory (a 96x96 RGB input is 108 KiB).
const EMBED_CHUNK: usize = 256;

/// Heads mode: the backbone stays frozen (the base version's, or the
/// ImageNet import for a project's first model); K fresh heads learn from
/// embeddings, cached in the snapshot where a worker returned them with a
/// prediction, computed from the image otherwise.
async fn train_heads(
    worker: &Arc<Worker>,
    job: &TrainJob,
    snapshot: &Snapshot,
    stop: &CancellationToken,
) -> Result<Trained, RunError> {
    let classes = job.class_names.len();
    let members = job.params.members.max(2) as usize;
    let (start, base, backbone_from) = mobilenet_start(worker, job).await?;
    let dim = start.config().embedding_dim;

    // Embeddings: cached ones first (from the snapshot's table, or inline
    // in a snapshot written before the table), then the rest through the
    // backbone.
    let table = match &snapshot.embeddings {
        Some(table) => Some(Embeddings::load(&worker.store, table).await.map_err(
            |e| match &e {
                TableError::Store { source, .. } if source.is_transient() => {
                    RunError::Transient(e.to_string())
                }
                _ => RunError::Permanent(format!("corrupt snapshot: {e}")),
            },
        )?),
        None => None,
    };
    let mut embeddings: Vec<Option<Vec<f32>>> = snapshot
        .examples
        .iter()
        .map(|e| {
            let from_table = e
                .embedding_row
                .and_then(|row| table.as_ref()?.row(row))
                .map(<[f32]>::to_vec);
            from_table
                .or_else(|| e.embedding.clone())
                .filter(|v| v.len() == dim && v.iter().all(|x| x.is_finite()))
        })
        .collect();
    drop(table);
    let missing: Vec<usize> = (0..embeddings.len())
        .filter(|&i| embeddings[i].is_none())
        .collect();
    let cached = embeddings.len() - missing.len();
    tracing::info!(run = %job.run_id, cached, to_compute = missing.len(), backbone = %backbone_from, "heads mode: gathering embeddings");
    for (done, chunk) in missing.chunks(EMBED_CHUNK).enumerate() {
        if stop.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        if worker.is_cancelled(job.run_id) {
            return Err(RunError::CancelledByRequest);
        }
        let keys = chunk
            .iter()
            .map(|&i| snapshot.examples[i].object_key.clone())
            .collect();
        let inputs = load_images(worker, start.config(), keys).await?;
        let model = start.clone();
        let computed = tokio::task::spawn_blocking(move || {
            let good: Vec<usize> = (0..inputs.len()).filter(|&j| inputs[j].is_ok()).collect();
            let flat: Vec<f32> = inputs.into_iter().flatten().flatten().collect();
            model.embed(&flat, good.len()).map(|flat| (good, flat))
        })
        .await
        .map_err(|e| RunError::Permanent(format!("the backbone panicked: {e}")))?
        .map_err(|e| RunError::Permanent(e.to_string()))?;
        let (good, flat) = computed;
        for (j, embedding) in good.into_iter().zip(flat.chunks(dim)) {
            embeddings[chunk[j]] = Some(embedding.to_vec());
        }
        tracing::debug!(run = %job.run_id, computed = ((done + 1) * EMBED_CHUNK).min(missing.len()), of = missing.len(), "embeddings");
    }

    let mut train_data = EmbeddingData {
        embeddings: Vec::new(),
        dim,
        labels: Vec::new(),
    };
    let (mut holdout, mut holdout_labels, mut holdout_random) =
        (Vec::new(), Vec::new(), Vec::new());
    let mut skipped = 0usize;
    for (example, embedding) in snapshot.examples.iter().zip(embeddings) {
        let Some(embedding) = embedding else {
            skipped += 1;
            continue;
        };
        match example.split {
            Split::Train => {
                train_data.embeddings.extend_from_slice(&embedding);
                train_data.labels.push(example.class_index as usize);
            }
            Split::Holdout => {
                holdout.extend_from_slice(&embedding);
                holdout_labels.push(example.class_index as usize);
                holdout_random.push(example.random);
            }
        }
    }
    if skipped > 0 {
        tracing::warn!(run = %job.run_id, skipped, "snapshot images that could not be used were skipped");
    }
    let train_size = train_data.labels.len();
    if snapshot.examples.is_empty() {
        // A project's first model: the backbone with untrained heads, as the
        // small CNN's first model is untrained.
        return Ok(Trained {
            model: Model::Classifier(Committee::clone(&start)),
            evaluations: Vec::new(),
            base: None,
            train_size,
            average_precision: None,
        });
    }
    if train_size == 0 {
        return Err(RunError::Permanent(format!(
            "heads mode has no training example with a usable image or embedding ({skipped} of {} could not be used)",
            snapshot.examples.len()
        )));
    }
    let options = HeadsOptions {
        members,
        num_classes: classes,
        epochs: job
            .params
            .epochs_for(train_size, HeadsOptions::default().validation_share)
            as usize,
        batch_size: job.params.batch_size.max(1) as usize,
        learning_rate: job.params.learning_rate,
        seed: job.params.seed,
        ..HeadsOptions::default()
    };
    let heads_start = start.clone();
    let model = supervised(worker, job, stop, move |on_epoch| {
        let (heads, _) = model::train_heads(&train_data, &options, heads_start.device(), on_epoch)?;
        heads_start.with_heads(heads)
    })
    .await?;

    evaluated(
        model,
        base,
        Committee::predict_embeddings,
        holdout,
        holdout_labels,
        holdout_random,
        train_size,
    )
    .await
}

/// The trained model and its base (when there is one) scored on the same
/// holdout: `inputs` are what `predict` reads (images, or embeddings in
/// heads mode), `random[i]` whether example `i` was picked at random.
async fn evaluated(
    model: Committee,
    base: Option<Arc<Committee>>,
    predict: fn(&Committee, &[f32], usize) -> Result<CommitteeProbs, ModelError>,
    inputs: Vec<f32>,
    labels: Vec<usize>,
    random: Vec<bool>,
    train_size: usize,
) -> Result<Trained, RunError> {
    let (model, evaluations, base_evaluations) = tokio::task::spawn_blocking(move || {
        let score = |committee: &Committee| {
            predict(committee, &inputs, labels.len())
                .and_then(|probs| evaluate(&probs, &labels, &random))
        };
        let evaluations = score(&model);
        let base_evaluations = base.map(|base| score(&base));
        (model, evaluations, base_evaluations)
    })
    .await
    .map_err(|e| RunError::Permanent(format!("evaluation panicked: {e}")))?;
    Ok(Trained {
        model: Model::Classifier(model),
        evaluations: evaluations.map_err(|e| RunError::Permanent(e.to_string()))?,
        base: base_evaluations.and_then(|e| e.ok()),
        train_size,
        average_precision: None,
    })
}

pub(super) fn accuracy_of(evaluations: &[HoldoutEvaluation]) -> Option<f64> {
    (!evaluations.is_empty()).then(|| {
        evaluations.iter().filter(|e| e.is_correct()).count() as f64 / evaluations.len() as f64
    })
}

/// The committee's verdict on every holdout example from its probabilities;
/// `random[i]` says whether example `i` was picked at random (what
/// calibration may use).
fn evaluate(
    probs: &CommitteeProbs,
    labels: &[usize],
    random: &[bool],
) -> Result<Vec<HoldoutEvaluation>, ModelError> {
    probs
        .iter()
        .zip(labels)
        .zip(random)
        .map(|((members, &label), &random)| {
            let s = sieve_shared::scores::committee_scores(members).map_err(|e| {
                ModelError::BadInput {
                    reason: e.to_string(),
                }
            })?;
            Ok(HoldoutEvaluation {
                label: label as u32,
                predicted: s.scores.top_class,
                confidence: s.scores.confidence,
                random: Some(random),
                correct: None,
                boxes: None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transiently_failed_job_waits_longer_each_time_up_to_a_minute() {
        let pauses: Vec<u64> = (0..8).map(|n| requeue_backoff(n).as_secs()).collect();
        assert_eq!(pauses, [2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(requeue_backoff(u32::MAX), Duration::from_secs(60));
    }
}
