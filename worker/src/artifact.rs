//! Model artifacts: the architecture config plus the weights, in one object
//! with a SHA-256 checksum.
//!
//! Layout: the magic line `SIEVE-MODEL 1\n`, a little-endian u32 length, the
//! config as JSON, then the weight bytes. A corrupt or mismatched artifact is
//! refused with a typed error; nothing here panics on bad bytes.

use sieve_shared::store::sha256_hex;

use crate::backend;
use crate::model::{ArchitectureConfig, Committee, Model, ModelError};

const MAGIC: &[u8] = b"SIEVE-MODEL 1\n";

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact checksum mismatch: expected {expected}, found {found}")]
    Checksum { expected: String, found: String },
    #[error("not a sieve model artifact: {0}")]
    Format(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Serialize a committee. Returns the bytes and their checksum.
pub fn encode(model: &Committee) -> Result<(Vec<u8>, String), ArtifactError> {
    encode_parts(model.config(), &model.weights_to_bytes()?)
}

/// Serialize a model version of any architecture. Returns the bytes and their checksum.
pub fn encode_model(model: &Model) -> Result<(Vec<u8>, String), ArtifactError> {
    encode_parts(model.config(), &model.weights_to_bytes()?)
}

fn encode_parts(
    config: &ArchitectureConfig,
    weights: &[u8],
) -> Result<(Vec<u8>, String), ArtifactError> {
    let config = serde_json::to_vec(config).map_err(|e| ArtifactError::Format(e.to_string()))?;
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + config.len() + weights.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(config.len() as u32).to_le_bytes());
    out.extend_from_slice(&config);
    out.extend_from_slice(weights);
    let checksum = sha256_hex(&out);
    Ok((out, checksum))
}

/// Verify and rebuild a model version from artifact bytes.
pub fn decode(bytes: &[u8], expected_checksum: &str) -> Result<Model, ArtifactError> {
    let found = sha256_hex(bytes);
    if found != expected_checksum {
        return Err(ArtifactError::Checksum {
            expected: expected_checksum.to_owned(),
            found,
        });
    }
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| ArtifactError::Format("missing header".into()))?;
    let len_bytes: [u8; 4] = rest
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ArtifactError::Format("truncated header".into()))?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    let config_bytes = rest
        .get(4..4 + len)
        .ok_or_else(|| ArtifactError::Format("truncated config".into()))?;
    let config: ArchitectureConfig = serde_json::from_slice(config_bytes)
        .map_err(|e| ArtifactError::Format(format!("bad config: {e}")))?;
    let weights = &rest[4 + len..];
    Ok(Model::from_weights(&config, weights, &backend::device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_artifact_loads_back_with_identical_outputs() {
        let config = ArchitectureConfig::small_cnn(4, 2);
        let model = Committee::init(&config, 7, &backend::device()).expect("init");
        let (bytes, checksum) = encode(&model).expect("encode");
        let loaded = decode(&bytes, &checksum).expect("decode");
        assert_eq!(loaded.config(), &config);
        let loaded = loaded.classifier().expect("a classifier");
        let input: Vec<f32> = (0..2 * config.input_len())
            .map(|i| (i % 17) as f32 / 17.0)
            .collect();
        let a = model.predict(&input, 2).expect("predict");
        let b = loaded.predict(&input, 2).expect("predict");
        assert_eq!(a.len(), b.len());
        for (x, y) in a
            .iter()
            .flatten()
            .flatten()
            .zip(b.iter().flatten().flatten())
        {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
    }

    #[test]
    fn corrupt_artifacts_are_refused() {
        let config = ArchitectureConfig::small_cnn(4, 2);
        let model = Committee::init(&config, 7, &backend::device()).expect("init");
        let (mut bytes, checksum) = encode(&model).expect("encode");
        assert!(matches!(
            decode(&bytes, "00"),
            Err(ArtifactError::Checksum { .. })
        ));
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert!(matches!(
            decode(&bytes, &checksum),
            Err(ArtifactError::Checksum { .. })
        ));
        let junk = b"not a model".to_vec();
        let junk_sum = sha256_hex(&junk);
        assert!(matches!(
            decode(&junk, &junk_sum),
            Err(ArtifactError::Format(_))
        ));
    }
}
