//! What every loop of a worker shares: [`Worker`], its [`Capability`]s and
//! the counters its heartbeat reports.
//!
//! The jobs, the control listener and the heartbeat take a `Worker`; the
//! process that starts them (`service::run`) builds it. Keeping it here
//! and not beside `run` means no loop imports the module that starts it.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use sieve_shared::Settings;
use sieve_shared::broker::Publisher;
use sieve_shared::ids::TrainingRunId;
use sieve_shared::store::Store;
use sieve_shared::topology::Topology;

use crate::cache::ModelCache;
use crate::health::Health;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    Prelabel,
    Train,
}

impl Capability {
    pub fn parse(raw: &str) -> anyhow::Result<Self> {
        match raw.trim() {
            "prelabel" => Ok(Self::Prelabel),
            "train" => Ok(Self::Train),
            other => anyhow::bail!("unknown capability {other:?}: use prelabel, train, or both"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Prelabel => "prelabel",
            Self::Train => "train",
        }
    }
}

/// Counters the heartbeat reports.
#[derive(Default)]
pub struct Stats {
    pub batches: AtomicU64,
    pub items: AtomicU64,
}

/// What every loop of a worker shares.
pub struct Worker {
    pub id: String,
    pub settings: Arc<Settings>,
    pub capabilities: Vec<Capability>,
    pub store: Store,
    pub publisher: Publisher,
    pub cache: ModelCache,
    pub stats: Stats,
    pub started: Instant,
    /// Training runs cancelled by the scheduler since this worker started.
    pub cancelled_runs: std::sync::Mutex<std::collections::HashSet<TrainingRunId>>,
    /// Training runs this worker completed (or failed) and reported: a
    /// redelivery of their job (the broker restarted while it ran) is
    /// acknowledged without training it again.
    pub finished_runs: std::sync::Mutex<std::collections::HashSet<TrainingRunId>>,
    /// Broker connections and consumers, for `/healthz`.
    pub health: Health,
}

impl Worker {
    pub fn topology(&self) -> &Topology {
        self.publisher.topology()
    }

    /// Remember that `run` was cancelled (a control notice).
    pub fn cancel_run(&self, run: TrainingRunId) {
        if let Ok(mut runs) = self.cancelled_runs.lock() {
            runs.insert(run);
        }
    }

    pub fn is_cancelled(&self, run: TrainingRunId) -> bool {
        self.cancelled_runs
            .lock()
            .is_ok_and(|runs| runs.contains(&run))
    }

    /// Remember that `run`'s outcome was reported (confirmed by the broker).
    pub fn finish_run(&self, run: TrainingRunId) {
        if let Ok(mut runs) = self.finished_runs.lock() {
            runs.insert(run);
        }
    }

    pub fn is_finished(&self, run: TrainingRunId) -> bool {
        self.finished_runs
            .lock()
            .is_ok_and(|runs| runs.contains(&run))
    }
}

/// A worker id unique across the fleet: host, process, and a random tail.
pub fn new_worker_id() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let tail = uuid::Uuid::now_v7().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &tail[tail.len() - 6..])
}
