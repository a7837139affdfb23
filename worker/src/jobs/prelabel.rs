//! The prediction loop: micro-batches of `PrelabelJob`s through the
//! committee, one `PrelabelResult` per job.
//!
//! A batch is up to `worker.batch_size` jobs, or `worker.batch_max_bytes`
//! of images by the sizes the jobs declare, or whatever arrived within
//! `worker.batch_timeout_ms` of the first. A job that came back unanswered
//! (the worker that had it died) runs alone, with nothing else held, and is
//! quarantined at `broker.delivery_limit` returns (see [`alone`]). Jobs are
//! acknowledged only after
//! the broker confirmed their results. Failures are sorted by kind: a
//! permanent one (bytes that are not an image, too many pixels) becomes a
//! `failed` result and is acknowledged; a transient one (the object store not
//! answering) is retried later: a copy goes, with confirms, to the delay
//! queue of its attempt (`broker.retry_delays_ms`), then the job is
//! acknowledged, and past the last delay it goes to the dead-letter queue
//! with its reason (see `sieve_shared::retry`); a message that does not
//! decode at all goes straight to the dead-letter queue. A fault of this
//! worker's own (a model it cannot load, a store where no image of a batch
//! can be found) is not the items': their jobs are retried the same way,
//! for another worker to take, without spending their attempts; the worker
//! stops consuming for a while, and `/healthz` answers 503 with the reason.
//!
//! With `worker.pipeline` on (the default) the loop fetches and decodes the
//! next batch while a model stage runs the current one, publishes its results
//! and acknowledges its jobs; acknowledgements still follow the confirms.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt;
use image::RgbImage;
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use sieve_shared::blocking::map_blocking;
use sieve_shared::box_scores::{ImageScores, ScoredBox};
use sieve_shared::ids::ModelVersionId;
use sieve_shared::messages::{
    ModelRef, PredictionOutput, PrelabelJob, PrelabelOutcome, PrelabelResult, PrelabelResults,
    SCHEMA_VERSION, decode,
};
use sieve_shared::scores::committee_scores;
use sieve_shared::store::{BlockingStore, Store, StoreError};
use sieve_shared::topology::Route;
use sieve_shared::{broker, retry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::context::Worker;
use crate::images;
use crate::model::{Committee, Detector, FaceCommittee, Model, detect};

/// Image fetches in flight per batch from a remote store.
const FETCH_CONCURRENCY: usize = 16;

pub async fn run(
    worker: Arc<Worker>,
    connection: Arc<Connection>,
    mut activations: mpsc::Receiver<ModelRef>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let settings = &worker.settings.worker;
    let batch_size = settings.batch_size.max(1);
    let window = Duration::from_millis(settings.batch_timeout_ms);
    let max_bytes = settings.batch_max_bytes;
    // Pipelined, one batch is on the model, the next is being prepared and a
    // third is arriving: the prefetch covers all three.
    let in_flight = if settings.pipeline { 3 } else { 2 };
    let mut intake = Intake::start(
        connection.clone(),
        worker.topology().prelabel_queue(),
        format!("{}-prelabel", worker.id),
        u16::try_from(batch_size * in_flight).unwrap_or(u16::MAX),
    )
    .await?;
    let _consuming = worker.health.consuming("prelabel", &intake.channel);
    let stage = ModelStage::start(&worker);

    let mut faulted_batches = 0u32;
    // A job that would have taken its batch past `batch_max_bytes`: the
    // first of the next one.
    let mut held_over: Option<Delivery> = None;
    let outcome = loop {
        // Between batches, never inside one: switch to newly activated models.
        while let Ok(model) = activations.try_recv() {
            if let Err(err) = worker.cache.get(&model).await {
                tracing::error!(version = model.version, error = %err, "cannot load the activated model; keeping the current ones");
            }
        }
        let first = match held_over.take() {
            Some(d) => d,
            None => tokio::select! {
                () = stop.cancelled() => break Ok(()),
                next = intake.next() => match next {
                    Ok(Some(d)) => d,
                    Ok(None) => continue,
                    Err(err) => break Err(err),
                },
            },
        };
        // A job that came back unanswered may be what killed the worker
        // that had it: it runs alone (see `alone`), after this batch.
        let mut suspect = None;
        let mut deliveries = Vec::new();
        if retry::returns(&first.properties) > 0 {
            suspect = Some(first);
        } else if intake.solo {
            // An ordinary job again: it runs (alone, as it came), then the
            // intake goes back to batches and the prefetch.
            let prepared = prepare(&worker, vec![first]).await;
            let back = async {
                stage.run(&worker, prepared).await?;
                stage.flush().await?;
                let held = intake.pause().await?;
                defer(&worker, held).await;
                intake.solo = false;
                intake.resume(&worker.health).await
            };
            if let Err(err) = back.await {
                break Err(err);
            }
            continue;
        } else {
            let mut bytes = declared_size(&first);
            deliveries.push(first);
            let deadline = tokio::time::sleep(window);
            tokio::pin!(deadline);
            while deliveries.len() < batch_size {
                tokio::select! {
                    () = &mut deadline => break,
                    () = stop.cancelled() => break,
                    next = intake.next() => match next {
                        Ok(Some(d)) if retry::returns(&d.properties) > 0 => {
                            suspect = Some(d);
                            break;
                        }
                        Ok(Some(d)) => {
                            // Past the byte cap, the job opens the next batch.
                            let size = declared_size(&d);
                            if bytes.saturating_add(size) > max_bytes {
                                held_over = Some(d);
                                break;
                            }
                            bytes += size;
                            deliveries.push(d);
                        }
                        Ok(None) => {}
                        Err(_) => break,
                    },
                }
            }
        }
        if !deliveries.is_empty() {
            let prepared = prepare(&worker, deliveries).await;
            faulted_batches = if prepared.own_fault {
                faulted_batches + 1
            } else {
                0
            };
            if let Err(err) = stage.run(&worker, prepared).await {
                break Err(err);
            }
        }
        if let Some(suspect) = suspect
            && let Err(err) = alone(&worker, &mut intake, &stage, suspect, held_over.take()).await
        {
            break Err(err);
        }
        if faulted_batches > 0 {
            // A worker that cannot run jobs other workers can run stops
            // taking them for a while, longer each time, until a batch goes
            // through again (or its failing probe restarts it). It holds
            // none meanwhile: what was delivered and not started is tried
            // now (and put back for the others, the fault being the same).
            let pause = fault_backoff(faulted_batches);
            tracing::warn!(
                pause_ms = pause.as_millis() as u64,
                "a fault of this worker's own; taking no jobs for a while"
            );
            let held = match intake.pause().await {
                Ok(mut held) => {
                    held.extend(held_over.take());
                    held
                }
                Err(err) => break Err(err),
            };
            // Jobs that came back are not run among others: put back first
            // (a batch's acknowledgement covers every earlier delivery).
            let (suspects, others): (Vec<Delivery>, Vec<Delivery>) = held
                .into_iter()
                .partition(|d| retry::returns(&d.properties) > 0);
            defer(&worker, suspects).await;
            if !others.is_empty() {
                let prepared = prepare(&worker, others).await;
                if let Err(err) = stage.run(&worker, prepared).await {
                    break Err(err);
                }
            }
            if let Err(err) = stage.flush().await {
                break Err(err);
            }
            tokio::select! {
                () = stop.cancelled() => break Ok(()),
                () = tokio::time::sleep(pause) => {}
            }
            if let Err(err) = intake.resume(&worker.health).await {
                break Err(err);
            }
        }
    };
    // Drain: the batches handed to the model stage finish and are acked.
    stage.close().await?;
    // Jobs delivered but not started go back as they were, for a second.
    // Returned with the channel instead, each would count as a return (as
    // if this worker had died on it), and the next worker would run them
    // one at a time as suspects. (Those RabbitMQ had on their way when the
    // consumer was cancelled, at most one batch's refill, still return with
    // the channel.)
    if outcome.is_ok() {
        match intake.pause().await {
            Ok(mut held) => {
                held.extend(held_over.take());
                defer(&worker, held).await;
            }
            Err(err) => tracing::warn!(
                error = format!("{err:#}"),
                "could not stop the prelabel consumer; what it holds returns to the queue"
            ),
        }
    }
    // Anything still unsettled returns to the queue with the channel.
    intake.channel.close(200, "draining".into()).await.ok();
    outcome
}

/// The prelabel consumer, which can stop and start again, and take one job
/// at a time while jobs that came back are about (`solo`).
struct Intake {
    connection: Arc<Connection>,
    channel: lapin::Channel,
    consumer: lapin::Consumer,
    queue: String,
    tag: String,
    prefetch: u16,
    solo: bool,
}

impl Intake {
    async fn start(
        connection: Arc<Connection>,
        queue: String,
        tag: String,
        prefetch: u16,
    ) -> anyhow::Result<Self> {
        let (channel, consumer) = broker::consume(&connection, &queue, prefetch, &tag)
            .await
            .with_context(|| format!("consuming {queue}"))?;
        Ok(Self {
            connection,
            channel,
            consumer,
            queue,
            tag,
            prefetch,
            solo: false,
        })
    }

    /// The next delivery; `None` for one that errs (logged); an error once
    /// the broker cancelled the consumer.
    async fn next(&mut self) -> anyhow::Result<Option<Delivery>> {
        match self.consumer.next().await {
            Some(Ok(delivery)) => Ok(Some(delivery)),
            Some(Err(err)) => {
                tracing::warn!(error = %err, "prelabel consumer error");
                Ok(None)
            }
            None => Err(anyhow::anyhow!(
                "the {} consumer was cancelled by the broker",
                self.queue
            )),
        }
    }

    /// Stop the deliveries; returns those already delivered and not yet
    /// taken, which this worker still holds.
    async fn pause(&mut self) -> anyhow::Result<Vec<Delivery>> {
        self.channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await
            .context("pausing the prelabel consumer")?;
        let mut held = Vec::new();
        while let Ok(Some(next)) =
            tokio::time::timeout(Duration::from_millis(100), self.consumer.next()).await
        {
            held.extend(next.ok());
        }
        Ok(held)
    }

    /// Deliveries again, on a new channel: one at a time while `solo`,
    /// else the prefetch. Call only when every delivery of the old channel
    /// this worker took is settled. Closing it hands back what RabbitMQ had
    /// on its way when the consumer was cancelled (lapin drops those, with
    /// no consumer left to take them; they come back counted as returned).
    /// A new channel, not a new consumer on the old one: RabbitMQ 3.10
    /// closes the connection (INTERNAL_ERROR, a `function_clause` in
    /// `rabbit_channel:handle_deliver0`) when a quorum queue's late delivery
    /// for a cancelled consumer reaches a channel that consumes again.
    async fn resume(&mut self, health: &crate::health::Health) -> anyhow::Result<()> {
        self.channel.close(200, "paused".into()).await.ok();
        let prefetch = if self.solo { 1 } else { self.prefetch };
        let (channel, consumer) =
            broker::consume(&self.connection, &self.queue, prefetch, &self.tag)
                .await
                .context("resuming the prelabel consumer")?;
        health.moved("prelabel", &channel);
        self.channel = channel;
        self.consumer = consumer;
        Ok(())
    }
}

/// What goes to the model stage: a batch, or a barrier that answers once
/// every batch sent before it has finished.
enum Staged {
    Batch(Prepared),
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// The model stage: inference, publish, ack, one prepared batch at a time,
/// while the intake fetches and decodes the next one (`worker.pipeline`);
/// or, lock-step, each batch finished where it was prepared. A capacity of
/// one keeps at most one prepared batch waiting.
struct ModelStage {
    to_model: Option<mpsc::Sender<Staged>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ModelStage {
    fn start(worker: &Arc<Worker>) -> Self {
        if !worker.settings.worker.pipeline {
            return Self {
                to_model: None,
                task: None,
            };
        }
        let (tx, mut rx) = mpsc::channel::<Staged>(1);
        let worker = worker.clone();
        let task = tokio::spawn(async move {
            while let Some(staged) = rx.recv().await {
                match staged {
                    Staged::Batch(batch) => finish(&worker, batch).await,
                    Staged::Barrier(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Self {
            to_model: Some(tx),
            task: Some(task),
        }
    }

    async fn run(&self, worker: &Worker, batch: Prepared) -> anyhow::Result<()> {
        match &self.to_model {
            Some(tx) => tx
                .send(Staged::Batch(batch))
                .await
                .map_err(|_| anyhow::anyhow!("the prelabel model stage stopped")),
            None => {
                finish(worker, batch).await;
                Ok(())
            }
        }
    }

    /// Wait until every batch handed over so far is finished (acknowledged).
    async fn flush(&self) -> anyhow::Result<()> {
        let Some(tx) = &self.to_model else {
            return Ok(());
        };
        let (done, finished) = tokio::sync::oneshot::channel();
        tx.send(Staged::Barrier(done))
            .await
            .map_err(|_| anyhow::anyhow!("the prelabel model stage stopped"))?;
        finished
            .await
            .map_err(|_| anyhow::anyhow!("the prelabel model stage stopped"))
    }

    async fn close(self) -> anyhow::Result<()> {
        drop(self.to_model);
        if let Some(task) = self.task {
            task.await.context("the prelabel model stage panicked")?;
        }
        Ok(())
    }
}

/// Run a job that came back unanswered with nothing else held: a worker
/// that dies on it (an image that crashes the decoder, a model that runs out
/// of memory on it) then returns it alone, and no other job's delivery
/// count is spent. Before, every crash spent the count of every job the
/// worker held, and an image that crashed workers dead-lettered the jobs
/// around it with its own.
///
/// The intake pauses; the batches already staged finish; what else was
/// delivered is put back for later, as it was (it comes again in a second:
/// [`defer`]); the suspect runs alone; the intake resumes. A job that came
/// back `broker.delivery_limit` times over all its copies is quarantined
/// instead: dead-lettered with reason `quarantined`, which marks its item,
/// for people to look at.
async fn alone(
    worker: &Worker,
    intake: &mut Intake,
    stage: &ModelStage,
    suspect: Delivery,
    held_over: Option<Delivery>,
) -> anyhow::Result<()> {
    let mut held = intake.pause().await?;
    held.extend(held_over);
    stage.flush().await?;
    defer(worker, held).await;
    // Jobs that came back come first (the queue hands returned ones back
    // first), often many: take them one at a time until an ordinary one
    // comes, so that none waits in this worker's hands while another runs.
    intake.solo = true;
    let returned = retry::returns(&suspect.properties);
    if returned >= worker.settings.broker.delivery_limit {
        quarantine(worker, suspect, returned).await;
    } else {
        tracing::info!(
            returned,
            "a job that came back unanswered; running it alone"
        );
        let prepared = prepare(worker, vec![suspect]).await;
        finish(worker, prepared).await;
    }
    intake.resume(&worker.health).await
}

/// Put jobs back as they are, for later: a copy to the first delay queue
/// (their counts carried on, see [`retry::deferred`]), then an
/// acknowledgement of each. Without a delay queue, or if the copies cannot
/// be stored, they are requeued (which spends one delivery).
async fn defer(worker: &Worker, deliveries: Vec<Delivery>) {
    if deliveries.is_empty() {
        return;
    }
    let stored = match worker.topology().retry_route(1) {
        Some(route) => {
            let headers: Vec<FieldTable> = deliveries
                .iter()
                .map(|d| retry::deferred(&d.properties))
                .collect();
            let messages: Vec<(&[u8], Option<&FieldTable>)> = deliveries
                .iter()
                .zip(&headers)
                .map(|(d, h)| (d.data.as_slice(), Some(h)))
                .collect();
            match worker
                .publisher
                .publish_with_headers(route, &messages)
                .await
            {
                Ok(()) => true,
                Err(err) => {
                    tracing::warn!(error = %err, "could not put jobs back for later; requeueing them");
                    false
                }
            }
        }
        None => false,
    };
    metrics::counter!("sieve_worker_jobs_deferred_total").increment(deliveries.len() as u64);
    for delivery in deliveries {
        let settled = if stored {
            delivery.ack(BasicAckOptions::default()).await
        } else {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        };
        if !matches!(settled, Ok(true)) {
            tracing::warn!("settling a job put back for later failed; it will be redelivered");
        }
    }
}

/// Dead-letter a job that came back `returned` times (workers died while
/// it was in flight) with reason `quarantined`: the scheduler marks its
/// item, nothing sends it again until `sieve failed retry`.
async fn quarantine(worker: &Worker, delivery: Delivery, returned: u32) {
    let error = format!(
        "came back unanswered {returned} times: workers died while it was in flight (broker.delivery_limit {})",
        worker.settings.broker.delivery_limit
    );
    tracing::warn!(returned, "quarantining a job that workers died on");
    let mut headers = retry::dead_letter_headers(
        &worker.topology().prelabel_queue(),
        retry::QUARANTINED,
        &error,
    );
    if let Some(own) = delivery.properties.headers() {
        for (name, value) in own.inner() {
            if !name.as_str().starts_with("x-") && !headers.contains_key(name.as_str()) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    let message = [(delivery.data.as_slice(), Some(&headers))];
    let settled = match worker
        .publisher
        .publish_with_headers(Route::Dead, &message)
        .await
    {
        Ok(()) => {
            metrics::counter!("sieve_worker_jobs_dead_lettered_total").increment(1);
            delivery.ack(BasicAckOptions::default()).await
        }
        Err(err) => {
            tracing::error!(error = %err, "could not quarantine the job; rejecting it to the broker's dead letters");
            delivery.reject(BasicRejectOptions { requeue: false }).await
        }
    };
    if !matches!(settled, Ok(true)) {
        tracing::warn!("settling a quarantined job failed; it will be redelivered");
    }
}

/// The image size a job declares (0 when it does not, or does not decode:
/// [`prepare`] deals with those).
fn declared_size(delivery: &Delivery) -> u64 {
    #[derive(serde::Deserialize)]
    struct Size {
        #[serde(default)]
        size_bytes: Option<u64>,
    }
    serde_json::from_slice::<Size>(&delivery.data)
        .ok()
        .and_then(|s| s.size_bytes)
        .unwrap_or(0)
}

/// How long a worker pauses after `faulted` batches in a row that showed a
/// fault of its own: half a second, doubling, at most half a minute.
fn fault_backoff(faulted: u32) -> Duration {
    let doublings = faulted.saturating_sub(1).min(6);
    Duration::from_millis(500 << doublings).min(Duration::from_secs(30))
}

/// What becomes of one job in a batch.
enum Fate {
    Result(PrelabelResult),
    /// Try again later, after a delay: a transient failure, with why, or a
    /// fault of this worker's own (`own`), which does not spend the job's
    /// attempts.
    Retry {
        reason: String,
        own: bool,
    },
}

impl Fate {
    fn retry(reason: String) -> Self {
        Fate::Retry { reason, own: false }
    }

    fn own_fault(reason: String) -> Self {
        Fate::Retry { reason, own: true }
    }
}

fn failed(worker: &Worker, job: &PrelabelJob, reason: String) -> Fate {
    metrics::counter!("sieve_worker_jobs_failed_total").increment(1);
    Fate::Result(PrelabelResult {
        schema: SCHEMA_VERSION,
        job_id: job.job_id,
        project_id: job.project_id,
        item_id: job.item_id,
        model_version_id: job.model.version_id,
        worker_id: worker.id.clone(),
        outcome: PrelabelOutcome::Failed { reason },
    })
}

/// Fetch, decode and predict one batch, then publish its results and
/// acknowledge its jobs (lock-step: [`prepare`] then [`finish`]).
pub async fn process_batch(worker: &Worker, deliveries: Vec<Delivery>) {
    let prepared = prepare(worker, deliveries).await;
    finish(worker, prepared).await;
}

/// A batch with its images fetched and decoded, ready for the model.
struct Prepared {
    started: Instant,
    jobs: Vec<(Delivery, PrelabelJob)>,
    /// Decided before inference (failures, requeues); `None` for jobs in `groups`.
    fates: Vec<Option<Fate>>,
    /// Whether this worker could not run some job for a fault of its own.
    own_fault: bool,
    groups: Vec<Group>,
}

/// The jobs of a batch that one model predicts: the model, the jobs'
/// positions in the batch, and their decoded inputs (or why not).
struct Group {
    model: Arc<Model>,
    positions: Vec<usize>,
    inputs: Inputs,
}

/// A group's decoded images, as its model takes them.
enum Inputs {
    /// A classifier's: resized and normalized to its input.
    Pixels(Vec<Result<Vec<f32>, String>>),
    /// A detector's: whole, to be tiled.
    Images(Vec<Result<RgbImage, String>>),
}

/// A model's jobs in a batch: their positions and their image bytes.
type Fetched = (Arc<Model>, Vec<usize>, Vec<bytes::Bytes>);

/// Decode the messages, load the models, fetch the images and decode them.
async fn prepare(worker: &Worker, deliveries: Vec<Delivery>) -> Prepared {
    let started = Instant::now();
    let mut jobs = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        match decode::<PrelabelJob>(&delivery.data) {
            Ok(job) => jobs.push((delivery, job)),
            Err(err) => {
                // No ids to report a result against: dead-letter it for people to see.
                tracing::warn!(error = %err, "undecodable prelabel job; dead-lettering it");
                metrics::counter!("sieve_worker_jobs_dead_lettered_total").increment(1);
                let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            }
        }
    }
    let mut fates: Vec<Option<Fate>> = (0..jobs.len()).map(|_| None).collect();
    if jobs.is_empty() {
        return Prepared {
            started,
            jobs,
            fates,
            own_fault: false,
            groups: Vec::new(),
        };
    }

    // Models first: one load per distinct version in the batch. A model
    // this worker cannot load (missing, a bad checksum, NaN weights) is this
    // worker's fault, not the items': their jobs are retried after a delay,
    // when another worker may take them, and /healthz says why.
    let mut models: HashMap<ModelVersionId, Result<Arc<Model>, String>> = HashMap::new();
    for (_, job) in &jobs {
        if let std::collections::hash_map::Entry::Vacant(slot) = models.entry(job.model.version_id)
        {
            let loaded = worker.cache.get(&job.model).await.map_err(|e| {
                let reason = format!("model v{} does not load here: {e}", job.model.version);
                worker.health.fault("model", reason.clone());
                metrics::counter!("sieve_worker_own_faults_total", "kind" => "model").increment(1);
                reason
            });
            if loaded.is_ok() {
                worker.health.clear("model");
            }
            slot.insert(loaded);
        }
    }

    let keys: Vec<String> = jobs.iter().map(|(_, job)| job.object_key.clone()).collect();
    let fetched = fetch_images(&worker.store, keys).await;
    // Objects missing while none of the batch could be read, nor the model
    // the batch was sent for: this worker's store is the suspect (not
    // mounted, a wrong root), not the items. Their jobs are retried after a
    // delay instead of failing the items. A missing object beside ones that
    // read, or in a store that holds the batch's model, is that object's
    // fault.
    let nothing_read = !fetched.iter().any(Result::is_ok)
        && fetched
            .iter()
            .any(|f| matches!(f, Err(StoreError::NotFound(_))));
    let store_suspect = nothing_read && !holds_a_model_of(&worker.store, &jobs).await;
    if store_suspect {
        worker.health.fault(
            "store",
            format!(
                "no image of the last batch could be read from the store at {}: is its volume mounted (or its bucket prefix right)?",
                worker.store.describe()
            ),
        );
        metrics::counter!("sieve_worker_own_faults_total", "kind" => "store").increment(1);
    } else if fetched.iter().any(Result::is_ok) {
        worker.health.clear("store");
    }

    let mut by_model: HashMap<ModelVersionId, Fetched> = HashMap::new();
    for (i, ((_, job), bytes)) in jobs.iter().zip(fetched).enumerate() {
        let model = match &models[&job.model.version_id] {
            Ok(model) => model.clone(),
            Err(reason) => {
                fates[i] = Some(Fate::own_fault(reason.clone()));
                continue;
            }
        };
        match bytes {
            Ok(bytes) => {
                let group = by_model
                    .entry(job.model.version_id)
                    .or_insert_with(|| (model, Vec::new(), Vec::new()));
                group.1.push(i);
                group.2.push(bytes);
            }
            Err(err @ StoreError::NotFound(_)) if store_suspect => {
                fates[i] = Some(Fate::own_fault(format!(
                    "image unavailable on this worker's store: {err}"
                )));
            }
            Err(err) if err.is_transient() => {
                fates[i] = Some(Fate::retry(format!("image unavailable: {err}")));
            }
            Err(err) => fates[i] = Some(failed(worker, job, format!("image unavailable: {err}"))),
        }
    }

    let max_pixels = worker.settings.ingest.max_pixels;
    let mut groups = Vec::with_capacity(by_model.len());
    for (_, (model, positions, images)) in by_model {
        let config = model.config().clone();
        let detector = matches!(*model, Model::Detector(_) | Model::Faces(_));
        let decoded = tokio::task::spawn_blocking(move || {
            if detector {
                Inputs::Images(decode_images(&images, max_pixels))
            } else {
                Inputs::Pixels(decode_all(&images, &config, max_pixels))
            }
        })
        .await;
        let inputs = match decoded {
            Ok(inputs) => inputs,
            Err(err) => {
                let reason = format!("image decoding panicked: {err}");
                Inputs::Pixels(positions.iter().map(|_| Err(reason.clone())).collect())
            }
        };
        groups.push(Group {
            model,
            positions,
            inputs,
        });
    }
    let own_fault = store_suspect || models.values().any(Result::is_err);
    Prepared {
        started,
        jobs,
        fates,
        own_fault,
        groups,
    }
}

/// Whether `store` holds the artifact of a model some job of the batch was
/// sent for: then the store is the one the scheduler writes to, mounted.
async fn holds_a_model_of(store: &Store, jobs: &[(Delivery, PrelabelJob)]) -> bool {
    let mut keys: Vec<&str> = jobs
        .iter()
        .map(|(_, job)| job.model.artifact_key.as_str())
        .collect();
    keys.dedup();
    for key in keys {
        if store.size(key).await.is_ok() {
            return true;
        }
    }
    false
}

/// A batch's images, in order, read on a few blocking threads (a run of
/// keys each): a local store is read a core's worth of files per thread,
/// a remote one [`FETCH_CONCURRENCY`] requests at a time.
async fn fetch_images(store: &Store, keys: Vec<String>) -> Vec<Result<bytes::Bytes, StoreError>> {
    let blocking = store.blocking();
    let tasks = match blocking {
        BlockingStore::Local(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        BlockingStore::Remote(..) => FETCH_CONCURRENCY,
    };
    let count = keys.len();
    match map_blocking(keys, tasks, move |key| blocking.get(&key)).await {
        Ok(fetched) => fetched,
        // A bug, not the images' fault: retried (transient), then dead-lettered.
        Err(err) => {
            let reason = format!("image read panicked: {err}");
            (0..count)
                .map(|_| {
                    Err(StoreError::Backend {
                        key: "(a batch's images)".into(),
                        source: object_store::Error::Generic {
                            store: "sieve",
                            source: reason.clone().into(),
                        },
                    })
                })
                .collect()
        }
    }
}

/// Run the model over a prepared batch, publish the results and the delayed
/// retries with confirms, then acknowledge every job.
async fn finish(worker: &Worker, batch: Prepared) {
    let Prepared {
        started,
        jobs,
        mut fates,
        groups,
        ..
    } = batch;
    if jobs.is_empty() {
        return;
    }
    for Group {
        model,
        positions,
        inputs,
    } in groups
    {
        let computed = tokio::task::spawn_blocking(move || match (&*model, inputs) {
            (Model::Classifier(committee), Inputs::Pixels(inputs)) => {
                predict_inputs(committee, inputs)
            }
            (Model::Detector(detector), Inputs::Images(images)) => detect_images(detector, images),
            (Model::Faces(faces), Inputs::Images(images)) => find_faces(faces, images),
            // Decoding panicked: the reasons are all there is.
            (_, Inputs::Pixels(inputs)) => inputs
                .into_iter()
                .map(|input| input.and(Err("image decoding failed".into())))
                .collect(),
            (_, Inputs::Images(images)) => images
                .into_iter()
                .map(|image| image.and(Err("image decoding failed".into())))
                .collect(),
        })
        .await;
        let outputs = match computed {
            Ok(outputs) => outputs,
            Err(err) => {
                let reason = format!("inference panicked: {err}");
                positions.iter().map(|_| Err(reason.clone())).collect()
            }
        };
        for (i, output) in positions.into_iter().zip(outputs) {
            let job = &jobs[i].1;
            fates[i] = Some(match output {
                Ok(output) => Fate::Result(PrelabelResult {
                    schema: SCHEMA_VERSION,
                    job_id: job.job_id,
                    project_id: job.project_id,
                    item_id: job.item_id,
                    model_version_id: job.model.version_id,
                    worker_id: worker.id.clone(),
                    outcome: PrelabelOutcome::Scored(output),
                }),
                Err(reason) => failed(worker, job, reason),
            });
        }
    }
    let fates: Vec<Fate> = fates
        .into_iter()
        .map(|f| f.unwrap_or_else(|| Fate::retry("the job was not processed".into())))
        .collect();

    let results: Vec<PrelabelResult> = fates
        .iter()
        .filter_map(|f| match f {
            Fate::Result(r) => Some(r.clone()),
            Fate::Retry { .. } => None,
        })
        .collect();
    // One message for the batch's results: one publish and confirm, one
    // delivery for the broker, instead of one per item.
    let result_count = results.len();
    // The audit trail of published work, at debug level under its own
    // target (`RUST_LOG=sieve_worker::published=debug`): `sieve-tools bench
    // chaos` counts from it how often a result went out again for the same
    // item and version.
    let audit = tracing::enabled!(target: PUBLISHED_TARGET, tracing::Level::DEBUG)
        .then(|| published_list(&results));
    let published = if results.is_empty() {
        Ok(())
    } else {
        let batch = PrelabelResults {
            schema: SCHEMA_VERSION,
            results,
        };
        worker
            .publisher
            .publish_all(std::slice::from_ref(&batch))
            .await
    };
    if let Err(err) = published {
        tracing::error!(error = %err, "publishing results failed; requeueing the batch");
        for (delivery, _) in jobs {
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        }
        return;
    }
    if let Some(results) = audit.filter(|r| !r.is_empty()) {
        tracing::debug!(target: PUBLISHED_TARGET, worker = %worker.id, %results, "results published");
    }
    let retried = schedule_retries(worker, &jobs, &fates).await;
    let all_done = fates
        .iter()
        .zip(&retried)
        .all(|(fate, &retried)| matches!(fate, Fate::Result(_)) || retried);
    if all_done {
        // One acknowledgement for the whole batch: `multiple` covers every
        // delivery up to the batch's last, and every earlier one on this
        // channel is settled already, since batches finish in the order they
        // arrived (one model stage) and bad messages are settled in
        // `prepare`. One frame instead of one per job, which at GPU speeds
        // was most of a batch's time.
        let last = &jobs[jobs.len() - 1].0;
        let acked = last.ack(BasicAckOptions { multiple: true }).await;
        if !matches!(acked, Ok(true)) {
            tracing::warn!(
                jobs = jobs.len(),
                "acknowledgement not applied (stale deliveries); the jobs will be redelivered"
            );
        }
    } else {
        settle_one_by_one(jobs, &fates, &retried).await;
    }
    worker.stats.batches.fetch_add(1, Ordering::Relaxed);
    worker
        .stats
        .items
        .fetch_add(result_count as u64, Ordering::Relaxed);
    metrics::histogram!("sieve_worker_batch_size").record(fates.len() as f64);
    metrics::histogram!("sieve_worker_batch_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("sieve_worker_jobs_consumed_total").increment(fates.len() as u64);
}

/// The target of the debug line that lists every result a worker
/// published (after the broker confirmed it).
pub const PUBLISHED_TARGET: &str = "sieve_worker::published";

/// `item:version:job` of each result, comma separated: what the
/// `results published` line carries.
pub fn published_list(results: &[PrelabelResult]) -> String {
    let mut out = String::with_capacity(results.len() * 111);
    for (i, r) in results.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "{}:{}:{}",
            r.item_id, r.model_version_id, r.job_id
        ));
    }
    out
}

/// Acknowledge each job whose result or delayed copy is stored; requeue the
/// others.
async fn settle_one_by_one(jobs: Vec<(Delivery, PrelabelJob)>, fates: &[Fate], retried: &[bool]) {
    for (i, ((delivery, _), fate)) in jobs.into_iter().zip(fates).enumerate() {
        let acked = match fate {
            Fate::Result(_) => delivery.ack(BasicAckOptions::default()).await,
            Fate::Retry { .. } if retried[i] => delivery.ack(BasicAckOptions::default()).await,
            // The delayed copy could not be published: redeliver at once
            // rather than lose the job (this spends one delivery).
            Fate::Retry { .. } => {
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
            }
        };
        if !matches!(acked, Ok(true)) {
            // A stale delivery after a reconnect: the broker redelivers, and
            // the scheduler deduplicates the second result (a retried job
            // then has two copies in flight; both end in the same result).
            tracing::warn!(
                "acknowledgement not applied (stale delivery); the job will be redelivered"
            );
        }
    }
}

/// Publish a delayed copy of every job that failed transiently, into the
/// delay queue of its attempt, or into the dead-letter queue with its reason
/// once the retries are used up; with confirms, before the original is
/// acknowledged. Returns, per job, whether its copy is safely stored.
async fn schedule_retries(
    worker: &Worker,
    jobs: &[(Delivery, PrelabelJob)],
    fates: &[Fate],
) -> Vec<bool> {
    let mut stored = vec![false; jobs.len()];
    let mut by_route: Vec<(Route, Vec<usize>, Vec<FieldTable>)> = Vec::new();
    for (i, ((delivery, job), fate)) in jobs.iter().zip(fates).enumerate() {
        let Fate::Retry { reason, own } = fate else {
            continue;
        };
        let attempt = retry::attempt(&delivery.properties);
        let (route, headers) = if *own {
            retry::after_own_fault(worker.topology(), &delivery.properties, reason)
        } else {
            retry::after_failure(worker.topology(), &delivery.properties, reason)
        };
        match route {
            Route::Dead if *own => {
                tracing::warn!(job = %job.job_id, item = %job.item_id, %reason, "no worker could run this job (faults of their own); dead-lettering it")
            }
            Route::Dead => {
                tracing::warn!(job = %job.job_id, item = %job.item_id, attempt, %reason, "transient failure, retries used up; dead-lettering the job")
            }
            _ => {
                tracing::debug!(job = %job.job_id, attempt, %reason, "transient failure; retrying later")
            }
        }
        match by_route.iter_mut().find(|(r, _, _)| *r == route) {
            Some((_, positions, all)) => {
                positions.push(i);
                all.push(headers);
            }
            None => by_route.push((route, vec![i], vec![headers])),
        }
    }
    for (route, positions, headers) in by_route {
        let messages: Vec<(&[u8], Option<&FieldTable>)> = positions
            .iter()
            .zip(&headers)
            .map(|(&i, h)| (jobs[i].0.data.as_slice(), Some(h)))
            .collect();
        let (exchange, queue) = worker.topology().address(route);
        let target = if exchange.is_empty() { queue } else { exchange };
        match worker
            .publisher
            .publish_with_headers(route, &messages)
            .await
        {
            Ok(()) => {
                let n = positions.len() as u64;
                if route == Route::Dead {
                    metrics::counter!("sieve_worker_jobs_dead_lettered_total").increment(n);
                } else {
                    metrics::counter!("sieve_worker_jobs_retried_total").increment(n);
                    tracing::info!(jobs = n, queue = %target, "jobs failed transiently; retrying after a delay");
                }
                for i in positions {
                    stored[i] = true;
                }
            }
            Err(err) => {
                tracing::error!(error = %err, queue = %target, "could not store delayed retries; requeueing those jobs");
            }
        }
    }
    stored
}

/// Decode and normalize images, split over the cores (the model is not
/// running on this batch, and these are independent).
pub fn decode_all(
    images: &[bytes::Bytes],
    config: &crate::model::ArchitectureConfig,
    max_pixels: u64,
) -> Vec<Result<Vec<f32>, String>> {
    if config.takes_no_input() {
        return images.iter().map(|_| Ok(Vec::new())).collect();
    }
    let started = Instant::now();
    let one =
        |b: &bytes::Bytes| images::preprocess(b, config, max_pixels).map_err(|e| e.to_string());
    let decoded = over_cores(images, 8, one);
    metrics::histogram!("sieve_worker_decode_seconds").record(started.elapsed().as_secs_f64());
    decoded
}

/// `one` over every image, split over the cores when there are at least
/// `min` (the model is not running on this batch, and these are
/// independent); a part that panicked answers with that reason.
fn over_cores<T: Send>(
    images: &[bytes::Bytes],
    min: usize,
    one: impl Fn(&bytes::Bytes) -> Result<T, String> + Sync,
) -> Vec<Result<T, String>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads < 2 || images.len() < min {
        return images.iter().map(&one).collect();
    }
    let chunk = images.len().div_ceil(threads);
    let one = &one;
    std::thread::scope(|scope| {
        let parts: Vec<_> = images
            .chunks(chunk)
            .map(|part| {
                (
                    part.len(),
                    scope.spawn(move || part.iter().map(one).collect::<Vec<_>>()),
                )
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|(len, part)| {
                part.join().unwrap_or_else(|_| {
                    (0..len)
                        .map(|_| Err("image decoding panicked".to_string()))
                        .collect()
                })
            })
            .collect()
    })
}

/// Decode images whole for a detector, split over the cores like
/// [`decode_all`]; the pixel limit still applies (`worker.max_pixels`
/// bounds the memory of one image, and the detector tiles it).
pub fn decode_images(images: &[bytes::Bytes], max_pixels: u64) -> Vec<Result<RgbImage, String>> {
    let started = Instant::now();
    let one = |b: &bytes::Bytes| {
        images::decode(b, max_pixels)
            .map(|image| image.to_rgb8())
            .map_err(|e| e.to_string())
    };
    let decoded = over_cores(images, 2, one);
    metrics::histogram!("sieve_worker_decode_seconds").record(started.elapsed().as_secs_f64());
    decoded
}

/// Run the detector over all good images at once; one output per image, in
/// order (a bad image keeps its reason).
pub fn detect_images(
    detector: &Detector,
    decoded: Vec<Result<RgbImage, String>>,
) -> Vec<Result<PredictionOutput, String>> {
    let threshold = detector.proposal_threshold();
    boxes_per_image(
        decoded,
        |good| detector.detect(good),
        |members| detect::score(members, threshold),
        |b| b.score >= threshold,
        threshold,
    )
}

/// Run the face committee over all good images; one output per image, in
/// order (a bad image keeps its reason).
pub fn find_faces(
    faces: &FaceCommittee,
    decoded: Vec<Result<RgbImage, String>>,
) -> Vec<Result<PredictionOutput, String>> {
    let plates = faces.plate_threshold();
    boxes_per_image(
        decoded,
        |good| faces.detect(good),
        |members| crate::model::faces::score(members, plates),
        |b| crate::model::faces::proposed(b, plates),
        crate::model::mtcnn::FACE_THRESHOLD,
    )
}

/// A box committee's outputs for the good images of `decoded`: `find` gives
/// every member's boxes per image, `score` the image's scores, `proposed`
/// whether a member's box counts as one it proposes, `threshold` the score
/// the image's confidence is compared with (its margin).
fn boxes_per_image(
    decoded: Vec<Result<RgbImage, String>>,
    find: impl FnOnce(&[RgbImage]) -> Result<Vec<detect::MemberBoxes>, crate::model::ModelError>,
    score: impl Fn(&[Vec<ScoredBox>]) -> ImageScores,
    proposed: impl Fn(&ScoredBox) -> bool,
    threshold: f32,
) -> Vec<Result<PredictionOutput, String>> {
    let good: Vec<RgbImage> = decoded.iter().flatten().cloned().collect();
    let started = Instant::now();
    let found = find(&good);
    metrics::histogram!("sieve_worker_inference_seconds").record(started.elapsed().as_secs_f64());
    let found = match found {
        Ok(found) => found,
        Err(err) => {
            let reason = format!("inference failed: {err}");
            return decoded.iter().map(|_| Err(reason.clone())).collect();
        }
    };
    let mut scored = found.into_iter().map(|members| {
        let image = score(&members);
        PredictionOutput {
            probabilities: Vec::new(),
            member_votes: members
                .iter()
                .map(|boxes| boxes.iter().filter(|b| proposed(b)).count() as u32)
                .collect(),
            scores: image.as_scores(threshold),
            embedding: None,
            detections: Some(Box::new(image)),
        }
    });
    decoded
        .into_iter()
        .map(|d| match d {
            Ok(_) => scored
                .next()
                .ok_or_else(|| "missing prediction".to_string()),
            Err(reason) => Err(reason),
        })
        .collect()
}

/// Run the committee over all good inputs at once; one output per input, in
/// order (a bad input keeps its reason).
fn predict_inputs(
    model: &Committee,
    decoded: Vec<Result<Vec<f32>, String>>,
) -> Vec<Result<PredictionOutput, String>> {
    let input_len = model.config().input_len();
    let good = decoded.iter().filter(|d| d.is_ok()).count();
    let mut input = Vec::with_capacity(good * input_len);
    for v in decoded.iter().flatten() {
        input.extend_from_slice(v);
    }
    let inference_started = Instant::now();
    // Only a frozen backbone's embedding is worth sending: heads retrain on it without the
    // images. A small CNN's changes with every version, so nothing could reuse it, and at 256
    // values it would be most of every result message and prediction row.
    let predicted = if model.has_frozen_backbone() {
        model
            .predict_with_embeddings(&input, good)
            .map(|(probs, embeddings)| (probs, embeddings.into_iter().map(Some).collect()))
    } else {
        model.predict(&input, good).map(|probs| {
            let none = vec![None; probs.len()];
            (probs, none)
        })
    };
    metrics::histogram!("sieve_worker_inference_seconds")
        .record(inference_started.elapsed().as_secs_f64());
    let (probs, embeddings) = match predicted {
        Ok(p) => p,
        Err(err) => {
            let reason = format!("inference failed: {err}");
            return decoded.iter().map(|_| Err(reason.clone())).collect();
        }
    };
    let mut scored = probs
        .into_iter()
        .zip(embeddings)
        .map(|(members, embedding)| {
            let s = committee_scores(&members).map_err(|e| e.to_string())?;
            Ok(PredictionOutput {
                probabilities: s.mean,
                member_votes: s.member_votes,
                scores: s.scores,
                embedding,
                detections: None,
            })
        });
    decoded
        .into_iter()
        .map(|d| match d {
            Ok(_) => scored
                .next()
                .unwrap_or_else(|| Err("missing prediction".into())),
            Err(reason) => Err(reason),
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use burn::tensor::Device;

    use super::*;
    use crate::model::detect;
    use crate::model::detector::untrained_heads;
    use crate::model::mobilenet::MobileNetV2;
    use crate::model::{ArchitectureConfig, detect::Detector};

    /// The objects `detector` proposes in `image`, and their confidences.
    fn proposal(detector: &Detector, image: &RgbImage) -> Vec<f32> {
        let outputs = detect_images(detector, vec![Ok(image.clone())]);
        let output = outputs.into_iter().next().unwrap().unwrap();
        let detections = output.detections.unwrap();
        detections.boxes.iter().map(|b| b.confidence).collect()
    }

    #[test]
    fn a_detector_proposes_from_its_versions_threshold() {
        let device = Device::flex();
        let config = ArchitectureConfig::detector(1, 2, 64);
        let heads = untrained_heads(&detect::heads_config(&config), 5, &device).unwrap();
        let detector = Detector::new(&config, MobileNetV2::new(&device), heads).unwrap();
        let image = RgbImage::from_fn(128, 96, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 3) as u8, ((x + y) % 256) as u8])
        });
        // Untrained heads score every cell near their prior of 0.1: nothing
        // reaches the default threshold, and from 0.1 up many do.
        let by_default = proposal(&detector, &image);
        let low = detector.with_proposal_threshold(Some(0.1)).unwrap();
        let by_low = proposal(&low, &image);
        assert!(by_default.is_empty(), "{by_default:?}");
        assert!(!by_low.is_empty(), "nothing proposed from 0.1");
        assert!(by_low.iter().all(|&c| c >= 0.1), "{by_low:?}");
    }
}
