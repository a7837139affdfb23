//! Loaded model versions, kept in memory between batches.
//!
//! A small LRU keyed by version id. A `std::sync::Mutex` and not a Tokio
//! one: the lock is never held across an `.await` (loading happens outside
//! it), and the critical sections are a few pointer moves.

use std::sync::{Arc, Mutex};

use sieve_shared::ids::ModelVersionId;
use sieve_shared::messages::ModelRef;
use sieve_shared::store::{Store, StoreError};

use crate::artifact::{self, ArtifactError};
use crate::model::Model;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot fetch model artifact: {0}")]
    Store(#[from] StoreError),
    #[error("model version {version} refused: {source}")]
    Artifact { version: i32, source: ArtifactError },
}

impl LoadError {
    pub fn is_transient(&self) -> bool {
        matches!(self, LoadError::Store(e) if e.is_transient())
    }
}

pub struct ModelCache {
    store: Store,
    capacity: usize,
    /// Most recently used last.
    entries: Mutex<Vec<(ModelVersionId, i32, Arc<Model>)>>,
}

impl ModelCache {
    pub fn new(store: Store, capacity: usize) -> Self {
        Self {
            store,
            capacity: capacity.max(1),
            entries: Mutex::new(Vec::new()),
        }
    }

    fn lookup(&self, id: ModelVersionId) -> Option<Arc<Model>> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let pos = entries.iter().position(|(v, _, _)| *v == id)?;
        let entry = entries.remove(pos);
        let model = entry.2.clone();
        entries.push(entry);
        Some(model)
    }

    /// The model for `model`, loading and verifying it on first use.
    pub async fn get(&self, model: &ModelRef) -> Result<Arc<Model>, LoadError> {
        if let Some(found) = self.lookup(model.version_id) {
            return Ok(found);
        }
        let bytes = self.store.get(&model.artifact_key).await?;
        let checksum = model.checksum.clone();
        let version = model.version;
        let loaded = tokio::task::spawn_blocking(move || artifact::decode(&bytes, &checksum))
            .await
            .map_err(|e| LoadError::Artifact {
                version,
                source: ArtifactError::Format(format!("loader panicked: {e}")),
            })?
            .map_err(|source| LoadError::Artifact { version, source })?;
        let loaded = Arc::new(loaded);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if !entries.iter().any(|(v, _, _)| *v == model.version_id) {
            if entries.len() >= self.capacity {
                entries.remove(0);
            }
            entries.push((model.version_id, model.version, loaded.clone()));
        }
        tracing::info!(version = model.version, "model version loaded");
        Ok(loaded)
    }

    /// Loaded versions, as `version` numbers, most recent last.
    pub fn loaded(&self) -> Vec<i32> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.iter().map(|(_, v, _)| *v).collect()
    }
}
