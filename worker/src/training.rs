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
use sieve_shared::messages::{
    HoldoutEvaluation, HoldoutMetrics, SCHEMA_VERSION, Snapshot, Split, TrainEvent, TrainEventKind,
    TrainJob, decode,
};
use sieve_shared::{broker, retry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::artifact;
use crate::images;
use crate::model::{
    self, ArchitectureConfig, Committee, EpochReport, ModelError, TrainData, TrainOptions,
};
use crate::service::Worker;

/// Why a run did not complete, and so what happens to its job.
#[derive(Debug, thiserror::Error)]
enum RunError {
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
    let classes = job.class_names.len();
    let config = ArchitectureConfig::small_cnn(classes, job.params.members.max(2) as usize);

    let mut base_model = None;
    let start = match &job.base {
        Some(base) => match worker.cache.get(base).await {
            Ok(model) if model.config() == &config => {
                base_model = Some(model.clone());
                (*model).clone()
            }
            Ok(_) => Committee::init(&config, job.params.seed, &crate::backend::device())
                .map_err(|e| RunError::Permanent(e.to_string()))?,
            Err(err) if err.is_transient() => return Err(RunError::Transient(err.to_string())),
            Err(err) => return Err(RunError::Permanent(format!("base model refused: {err}"))),
        },
        None => Committee::init(&config, job.params.seed, &crate::backend::device())
            .map_err(|e| RunError::Permanent(e.to_string()))?,
    };

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

    let options = TrainOptions {
        epochs: job.params.epochs as usize,
        batch_size: job.params.batch_size.max(1) as usize,
        learning_rate: job.params.learning_rate,
        seed: job.params.seed,
        ..TrainOptions::default()
    };
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
    let train_size = train_data.labels.len();
    let flag = cancelled.clone();
    let training = tokio::task::spawn_blocking(move || {
        model::train(start, &train_data, &options, |report| {
            let _ = progress_tx.send(report.clone());
            !flag.load(Ordering::SeqCst)
        })
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
    let trained =
        match trained.map_err(|e| RunError::Permanent(format!("training panicked: {e}")))? {
            Ok(model) => model,
            Err(ModelError::Cancelled) if worker.is_cancelled(job.run_id) => {
                return Err(RunError::CancelledByRequest);
            }
            Err(ModelError::Cancelled) => return Err(RunError::Cancelled),
            Err(err) => return Err(RunError::Permanent(err.to_string())),
        };

    let holdout_size = holdout.labels.len();
    let (trained, evaluations, base_evaluations) = tokio::task::spawn_blocking(move || {
        let evaluations = evaluate(&trained, &holdout, &holdout_random);
        let base_evaluations = base_model.map(|base| evaluate(&base, &holdout, &holdout_random));
        (trained, evaluations, base_evaluations)
    })
    .await
    .map_err(|e| RunError::Permanent(format!("evaluation panicked: {e}")))?;
    let evaluations = evaluations.map_err(|e| RunError::Permanent(e.to_string()))?;
    let base_accuracy = match base_evaluations {
        Some(Ok(base)) if !base.is_empty() => {
            Some(base.iter().filter(|e| e.label == e.predicted).count() as f64 / base.len() as f64)
        }
        _ => None,
    };
    let accuracy = (!evaluations.is_empty()).then(|| {
        evaluations
            .iter()
            .filter(|e| e.label == e.predicted)
            .count() as f64
            / evaluations.len() as f64
    });

    let (bytes, checksum) =
        artifact::encode(&trained).map_err(|e| RunError::Permanent(e.to_string()))?;
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
    tracing::info!(run = %job.run_id, version = job.version, train = train_size, holdout = holdout_size, ?accuracy, "training completed");
    Ok(TrainEventKind::Completed {
        artifact_key,
        checksum,
        architecture: serde_json::to_value(&config).unwrap_or_default(),
        metrics: HoldoutMetrics {
            holdout_size: holdout_size as u32,
            accuracy,
            train_size: train_size as u32,
            evaluations,
            base_accuracy,
        },
    })
}

/// The committee's verdict on every holdout example; `random[i]` says whether
/// example `i` was picked at random (what calibration may use).
fn evaluate(
    model: &Committee,
    holdout: &TrainData,
    random: &[bool],
) -> Result<Vec<HoldoutEvaluation>, ModelError> {
    if holdout.labels.is_empty() {
        return Ok(Vec::new());
    }
    let probs = model.predict(&holdout.images, holdout.labels.len())?;
    probs
        .iter()
        .zip(&holdout.labels)
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
