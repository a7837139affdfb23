//! Typed settings, loaded once: defaults, then `sieve.toml`, then `SIEVE_*`
//! environment variables (`SIEVE_DATABASE__URL` sets `database.url`).
//!
//! The defaults reach PostgreSQL, Redis and RabbitMQ on their standard local
//! ports, so a developer machine needs no configuration at all. Every setting
//! is documented in `docs/operations.md`; keep the two in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub broker: BrokerSettings,
    pub redis: RedisSettings,
    pub store: StoreSettings,
    pub s3: S3Settings,
    pub http: HttpSettings,
    pub ingest: IngestSettings,
    pub review: ReviewSettings,
    pub training: TrainingSettings,
    pub worker: WorkerSettings,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingSettings {
    /// A retrain is refused until every class has this many human labels.
    pub min_labels_per_class: u32,
    /// A candidate is promoted automatically when its holdout accuracy is at
    /// least the champion's (on the same holdout) minus this margin.
    pub promotion_margin: f64,
    /// A training run that made no progress (no start, no epoch) for this
    /// long is stuck: a queued one whose job is not in the queue has it
    /// published again, once; otherwise it is failed with the reason, so
    /// the project can train again. Longer than the slowest epoch.
    pub stuck_after_seconds: u64,
    /// A finished run's snapshot (its examples, and a heads run's embedding
    /// table) is removed from the store this long after the run ended,
    /// unless its version is a project's active one. The run's row stays.
    pub snapshot_retention_hours: u64,
    /// Labels join a project's holdout in two ways: every random check (the
    /// audit and calibration samples) always does, and of the labels people
    /// gave for the model's doubt, a fifth by content hash does — until the
    /// holdout holds this many random checks. From then on those labels
    /// train: the random checks alone measure a version, without the bias
    /// of items picked as the hardest, and a small project stops spending a
    /// fifth of its labels on measurement. 0: random checks only, always.
    pub holdout_random_checks: u32,
}

impl Default for TrainingSettings {
    fn default() -> Self {
        Self {
            min_labels_per_class: 1,
            promotion_margin: 0.0,
            stuck_after_seconds: 3600,
            snapshot_retention_hours: 24 * 30,
            holdout_random_checks: 400,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// PostgreSQL URL; `sieve migrate` creates the database if it is missing.
    pub url: String,
    pub max_connections: u32,
    /// Connections of a second, small pool for review claims (and the
    /// token and project lookups in front of them), so a reviewer waiting
    /// for the next item never queues behind submits waiting for the disk.
    pub claim_connections: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/sieve".into(),
            max_connections: 10,
            claim_connections: 4,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSettings {
    pub url: String,
    /// The nodes of a RabbitMQ cluster, used instead of `url` when set:
    /// every connection tries them in turn and, losing its node, recovers
    /// on another. Same user and virtual host on every node.
    pub urls: Vec<String>,
    /// Prefix of every queue and exchange name (`sieve` -> `sieve.prelabel`).
    pub prefix: String,
    /// Deliveries of one message before it is dead-lettered.
    pub delivery_limit: u32,
    /// How long a prediction job that failed transiently (the object store
    /// not answering) waits before each retry, in milliseconds: the n-th
    /// retry waits the n-th delay; past the last, the job is dead-lettered
    /// with its reason. Each distinct delay is a delay queue of its own.
    pub retry_delays_ms: Vec<u64>,
    /// RabbitMQ management API (e.g. `http://guest:guest@127.0.0.1:15672`)
    /// for unacked counts and rates in `sieve status`; without it, status
    /// falls back to passive declares (ready counts and consumers only).
    pub management_url: Option<String>,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            urls: Vec::new(),
            prefix: "sieve".into(),
            delivery_limit: 5,
            retry_delays_ms: vec![1_000, 5_000, 30_000, 120_000, 600_000],
            management_url: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    pub url: String,
    /// Prefix of every key, so deployments and tests can share a server.
    pub prefix: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "sieve".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// Root of the object store when it is a local directory (the default)
    /// or a `file://` URL. Scheduler and workers must see the same store.
    pub root: PathBuf,
    /// The store as a URL, which wins over `root` when set:
    /// `s3://BUCKET/PREFIX` (an S3-compatible bucket reached with the `s3.*`
    /// settings; scheduler and workers then share no directory) or
    /// `file:///PATH`.
    pub url: Option<String>,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            root: PathBuf::from("sieve-data"),
            url: None,
        }
    }
}

impl BrokerSettings {
    /// The broker's nodes: `urls`, or `url` alone.
    pub fn nodes(&self) -> Vec<&str> {
        match self.urls.is_empty() {
            true => vec![self.url.as_str()],
            false => self.urls.iter().map(String::as_str).collect(),
        }
    }
}

/// Where the object store is, from [`StoreSettings`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    /// A local directory.
    Local(PathBuf),
    /// Under `prefix` (possibly empty) of an S3 bucket.
    S3 { bucket: String, prefix: String },
}

impl StoreSettings {
    /// A store in a local directory.
    pub fn local(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            url: None,
        }
    }

    /// Where the store is: `url` when set, else `root`. The error says
    /// what is wrong with the URL.
    pub fn location(&self) -> Result<StoreLocation, String> {
        let Some(url) = self.url.as_deref().map(str::trim) else {
            let raw = self.root.to_string_lossy();
            let root = raw.strip_prefix("file://").unwrap_or(&raw);
            return Ok(StoreLocation::Local(PathBuf::from(root)));
        };
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err(format!("store.url {url:?} names no directory"));
            }
            return Ok(StoreLocation::Local(PathBuf::from(path)));
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(format!(
                "store.url {url:?} is neither s3://BUCKET/PREFIX nor file:///PATH"
            ));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("store.url {url:?} names no bucket"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|segment| {
            matches!(segment, "." | "..") || (segment.is_empty() && !prefix.is_empty())
        }) {
            return Err(format!(
                "store.url {url:?}: the prefix may not have empty, '.' or '..' segments"
            ));
        }
        Ok(StoreLocation::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

/// A value that must never be shown: `Debug` and serialization print
/// `[redacted]`; only [`Secret::expose`] gives it out, where it is used.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

/// An S3-compatible service that `sieve ingest s3://BUCKET/PREFIX` reads
/// from (AWS, MinIO, ...). Only ingest uses it: the images are copied into
/// sieve's own store, which workers read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Settings {
    /// The service's URL (MinIO: `http://minio:9000`); unset: AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    /// With `secret_access_key`; both unset: the instance's credentials.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    /// Allow a plain `http://` endpoint (a local MinIO).
    pub allow_http: bool,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Where `sieve serve` listens (API, review page; `/metrics` for `ops`
    /// and `admin` tokens unless `metrics_bind` is set).
    pub bind: SocketAddr,
    /// A separate listener for the scheduler's `/metrics`, served there
    /// without a token and no longer on `bind`. Unset: `/metrics` is on
    /// `bind` and needs a bearer token with role `ops` or `admin`.
    pub metrics_bind: Option<SocketAddr>,
    /// Where `sieve-worker` serves `/healthz` and `/metrics`.
    pub worker_bind: SocketAddr,
    /// Base URL CLI commands use to reach a running scheduler.
    pub api_url: String,
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_bind: None,
            worker_bind: SocketAddr::from(([127, 0, 0, 1], 9090)),
            api_url: "http://127.0.0.1:8080".into(),
            body_limit: 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestSettings {
    /// Items inserted per multi-row INSERT.
    pub batch_size: usize,
    /// Images with more pixels than this are refused from their header,
    /// before decoding (decompression bombs).
    pub max_pixels: u64,
    /// Largest image file accepted, in bytes.
    pub max_file_bytes: u64,
    /// Longest manifest line accepted, in bytes; a longer one is reported
    /// and skipped without being held in memory.
    pub max_line_bytes: u64,
    /// Ingests started over HTTP that may run at once in one project, and
    /// in all (each holds a few pooled connections and a reading task): a
    /// start past either gets 429.
    pub max_running_per_project: u32,
    pub max_running: u32,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            max_pixels: 50_000_000,
            max_file_bytes: 64 * 1024 * 1024,
            max_line_bytes: 64 * 1024,
            max_running_per_project: 2,
            max_running: 8,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReviewSettings {
    /// How long a claim is held before the task returns to the queue.
    pub lease_seconds: u64,
    /// Results routed per transaction by the result consumer.
    pub results_batch: usize,
}

impl Default for ReviewSettings {
    fn default() -> Self {
        Self {
            lease_seconds: 300,
            results_batch: 256,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// Jobs per micro-batch (also the consumer prefetch).
    pub batch_size: usize,
    /// How long to wait to fill a batch before running a partial one.
    pub batch_timeout_ms: u64,
    /// The most image bytes one micro-batch holds (the sizes jobs carry):
    /// a batch closes early rather than pass it, so a run of large photos
    /// cannot take `batch_size` × the largest image in memory. An image
    /// larger than the cap alone is a batch of one.
    pub batch_max_bytes: u64,
    /// `prelabel`, `train`, or both.
    pub capabilities: Vec<String>,
    /// On SIGTERM, how long in-flight work may take before the worker exits.
    pub drain_seconds: u64,
    pub heartbeat_seconds: u64,
    /// Loaded model versions kept in memory.
    pub model_cache: usize,
    /// Fetch and decode the next batch while the current one is on the
    /// model (off: one batch at a time, lock-step).
    pub pipeline: bool,
    /// torchvision's MobileNetV2 ImageNet weights (`ops/fetch-weights.sh`
    /// puts them here): the frozen backbone of a `mobilenet_v2` project's
    /// first model. Later versions carry the backbone in their artifact.
    pub mobilenet_weights: PathBuf,
    /// MTCNN's three networks, `pnet.pt`, `rnet.pt` and `onet.pt`
    /// (`ops/fetch-face-weights.sh` puts them here): a `deidentify`
    /// project's face detector, packaged into its first version.
    pub face_weights: PathBuf,
    /// The most memory a full-mode training run may take for its input
    /// images (every snapshot image as `f32` model input); a run that would
    /// need more is refused, saying how much. Heads mode needs none of it.
    pub train_images_mib: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            batch_size: 64,
            batch_timeout_ms: 50,
            batch_max_bytes: 256 * 1024 * 1024,
            capabilities: vec!["prelabel".into(), "train".into()],
            drain_seconds: 30,
            heartbeat_seconds: 5,
            model_cache: 4,
            pipeline: true,
            mobilenet_weights: PathBuf::from("ops/weights/mobilenet_v2-b0353104.pth"),
            face_weights: PathBuf::from("ops/weights/mtcnn"),
            train_images_mib: 4096,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct SettingsError(#[from] Box<figment::Error>);

impl Settings {
    /// Load settings from the defaults, the TOML file (`sieve.toml` in the
    /// working directory unless `file` names another), and the environment.
    /// A named file that does not exist is an error; the default one is
    /// optional.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(SettingsError(Box::new(figment::Error::from(format!(
                        "configuration file {} does not exist",
                        path.display()
                    )))));
                }
                figment = figment.merge(Toml::file_exact(path));
            }
            None => figment = figment.merge(Toml::file("sieve.toml")),
        }
        let settings: Self = figment
            .merge(Env::prefixed("SIEVE_").split("__").ignore(&["config"]))
            .extract()
            .map_err(|err| SettingsError(Box::new(err)))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Refuse values that parse but cannot work (a zero lease, an empty
    /// batch), at start and with the setting's name, rather than as a
    /// division by zero or a loop that never ends later on.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let positive: [(&str, u64); 22] = [
            (
                "database.max_connections",
                self.database.max_connections.into(),
            ),
            (
                "database.claim_connections",
                self.database.claim_connections.into(),
            ),
            ("broker.delivery_limit", self.broker.delivery_limit.into()),
            ("http.body_limit", self.http.body_limit as u64),
            ("ingest.batch_size", self.ingest.batch_size as u64),
            ("ingest.max_pixels", self.ingest.max_pixels),
            ("ingest.max_file_bytes", self.ingest.max_file_bytes),
            ("ingest.max_line_bytes", self.ingest.max_line_bytes),
            (
                "ingest.max_running_per_project",
                self.ingest.max_running_per_project.into(),
            ),
            ("ingest.max_running", self.ingest.max_running.into()),
            ("review.lease_seconds", self.review.lease_seconds),
            ("review.results_batch", self.review.results_batch as u64),
            (
                "training.stuck_after_seconds",
                self.training.stuck_after_seconds,
            ),
            (
                "training.snapshot_retention_hours",
                self.training.snapshot_retention_hours,
            ),
            ("worker.batch_size", self.worker.batch_size as u64),
            ("worker.drain_seconds", self.worker.drain_seconds),
            ("worker.heartbeat_seconds", self.worker.heartbeat_seconds),
            ("worker.model_cache", self.worker.model_cache as u64),
            ("worker.train_images_mib", self.worker.train_images_mib),
            ("worker.batch_timeout_ms", self.worker.batch_timeout_ms),
            ("worker.batch_max_bytes", self.worker.batch_max_bytes),
            (
                "broker.retry_delays_ms (each)",
                self.broker
                    .retry_delays_ms
                    .iter()
                    .copied()
                    .min()
                    .unwrap_or(1),
            ),
        ];
        let mut wrong: Vec<String> = positive
            .iter()
            .filter(|(_, value)| *value == 0)
            .map(|(name, _)| format!("{name} must be more than 0"))
            .collect();
        if !(0.0..=1.0).contains(&self.training.promotion_margin) {
            wrong.push(format!(
                "training.promotion_margin must be within 0..=1, got {}",
                self.training.promotion_margin
            ));
        }
        if self.broker.prefix.is_empty() {
            wrong.push("broker.prefix must not be empty".into());
        }
        if let Err(reason) = self.store.location() {
            wrong.push(reason);
        }
        if self.worker.capabilities.is_empty() {
            wrong.push("worker.capabilities must name prelabel, train, or both".into());
        }
        match wrong.is_empty() {
            true => Ok(()),
            false => Err(SettingsError(Box::new(figment::Error::from(
                wrong.join("; "),
            )))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail API returns its own large error
mod tests {
    use super::*;

    #[test]
    fn defaults_reach_local_services() {
        let s = Settings::default();
        assert!(s.database.url.contains("127.0.0.1:5432"));
        assert!(s.broker.url.contains("127.0.0.1:5672"));
        assert!(s.redis.url.contains("127.0.0.1:6379"));
        assert_eq!(s.broker.prefix, "sieve");
    }

    #[test]
    fn file_then_environment_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "custom.toml",
                "[broker]\nprefix = \"from-file\"\n[worker]\nbatch_size = 8\n",
            )?;
            jail.set_env("SIEVE_WORKER__BATCH_SIZE", "16");
            let s = Settings::load(Some(Path::new("custom.toml"))).expect("load");
            assert_eq!(s.broker.prefix, "from-file");
            assert_eq!(s.worker.batch_size, 16, "environment wins over the file");
            assert_eq!(
                s.review.lease_seconds, 300,
                "untouched settings keep defaults"
            );
            Ok(())
        });
    }

    #[test]
    fn secrets_load_but_never_show() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SIEVE_S3__SECRET_ACCESS_KEY", "hunter2-very-secret");
            jail.set_env("SIEVE_S3__ALLOW_HTTP", "true");
            let s = Settings::load(None).expect("load");
            let secret = s.s3.secret_access_key.as_ref().expect("set");
            assert_eq!(secret.expose(), "hunter2-very-secret");
            assert!(s.s3.allow_http);
            let shown = format!("{s:?} {}", serde_json::to_string(&s).expect("json"));
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("[redacted]"));
            Ok(())
        });
    }

    #[test]
    fn typos_and_missing_files_are_reported() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[broker]\nprefx = \"x\"\n")?;
            let err = Settings::load(Some(Path::new("bad.toml"))).expect_err("typo");
            assert!(err.to_string().contains("prefx"), "{err}");
            let err = Settings::load(Some(Path::new("missing.toml"))).expect_err("missing");
            assert!(err.to_string().contains("missing.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn values_that_cannot_work_are_refused_with_their_names() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SIEVE_REVIEW__LEASE_SECONDS", "0");
            jail.set_env("SIEVE_WORKER__BATCH_SIZE", "0");
            jail.set_env("SIEVE_TRAINING__PROMOTION_MARGIN", "2.5");
            let err = Settings::load(None).expect_err("zero lease");
            let text = err.to_string();
            for name in [
                "review.lease_seconds",
                "worker.batch_size",
                "training.promotion_margin",
            ] {
                assert!(text.contains(name), "{text}");
            }
            jail.set_env("SIEVE_REVIEW__LEASE_SECONDS", "300");
            jail.set_env("SIEVE_WORKER__BATCH_SIZE", "64");
            jail.set_env("SIEVE_TRAINING__PROMOTION_MARGIN", "0.01");
            assert!(Settings::load(None).is_ok());
            Ok(())
        });
    }
}
