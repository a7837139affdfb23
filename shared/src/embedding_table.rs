//! A snapshot's cached embeddings as one binary object beside it.
//!
//! Heads mode trains on the frozen backbone's embeddings: 1,280 numbers per
//! item for MobileNetV2. Inline in the snapshot's JSON they took about 13 KB
//! per item, and the whole document had to be built, held and parsed at
//! once (some 650 MB at 50,000 labels). Here they are rows of little-endian
//! `f32` (5 KB per item), written as they are read from the database and
//! uploaded in parts, so the scheduler holds one part at a time whatever
//! the size of the labeled set; a worker checks the table's length and
//! SHA-256 before it trusts a row.

use sha2::{Digest, Sha256};

use crate::messages::EmbeddingTable;
use crate::store::{Store, StoreError, Upload, sha256_hex};

/// The only row format written and read.
pub const FORMAT: &str = "f32le";

/// Writes a table row by row ([`TableWriter::push`]), then
/// [`TableWriter::finish`] describes it for the snapshot.
#[derive(Debug)]
pub struct TableWriter {
    upload: Upload,
    key: String,
    dim: usize,
    rows: u32,
    hasher: Sha256,
    row: Vec<u8>,
}

impl TableWriter {
    /// Start the table `key` of rows `dim` wide.
    pub async fn create(store: &Store, key: &str, dim: usize) -> Result<Self, StoreError> {
        Ok(Self {
            upload: store.upload(key).await?,
            key: key.to_owned(),
            dim,
            rows: 0,
            hasher: Sha256::new(),
            row: Vec::with_capacity(dim * 4),
        })
    }

    /// The width every row must have.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Append `embedding` and return its row, or `None` (writing nothing)
    /// when it is not `dim` finite numbers: such a row would only be
    /// refused by the worker.
    pub async fn push(&mut self, embedding: &[f32]) -> Result<Option<u32>, StoreError> {
        if embedding.len() != self.dim || !embedding.iter().all(|x| x.is_finite()) {
            return Ok(None);
        }
        self.row.clear();
        for value in embedding {
            self.row.extend_from_slice(&value.to_le_bytes());
        }
        self.hasher.update(&self.row);
        self.upload.write(&self.row).await?;
        let row = self.rows;
        self.rows += 1;
        Ok(Some(row))
    }

    /// Rows written so far.
    pub fn rows(&self) -> u32 {
        self.rows
    }

    /// Make the table visible and describe it; `None` (and no object) when
    /// no row was written.
    pub async fn finish(self) -> Result<Option<EmbeddingTable>, StoreError> {
        if self.rows == 0 {
            self.upload.abort().await?;
            return Ok(None);
        }
        self.upload.finish().await?;
        Ok(Some(EmbeddingTable {
            key: self.key,
            format: FORMAT.to_owned(),
            dim: self.dim as u32,
            rows: self.rows,
            sha256: hex::encode(self.hasher.finalize()),
        }))
    }

    /// Give up: nothing is left under the key.
    pub async fn abort(self) -> Result<(), StoreError> {
        self.upload.abort().await
    }
}

/// Why a table cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("embedding table {key}: {source}")]
    Store { key: String, source: StoreError },
    #[error("embedding table {key} is {format:?}; this worker reads only {FORMAT:?}")]
    Format { key: String, format: String },
    #[error(
        "embedding table {key} has {actual} bytes; {rows} rows of {dim} numbers take {expected}"
    )]
    Length {
        key: String,
        actual: usize,
        rows: u32,
        dim: u32,
        expected: usize,
    },
    #[error(
        "embedding table {key} does not match its checksum (expected {expected}, got {actual})"
    )]
    Checksum {
        key: String,
        expected: String,
        actual: String,
    },
}

/// A table read back, its rows as numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    dim: usize,
    values: Vec<f32>,
}

impl Embeddings {
    /// Check `bytes` against `table` (format, length, SHA-256) and decode.
    pub fn decode(table: &EmbeddingTable, bytes: &[u8]) -> Result<Self, TableError> {
        if table.format != FORMAT {
            return Err(TableError::Format {
                key: table.key.clone(),
                format: table.format.clone(),
            });
        }
        let expected = table.rows as usize * table.dim as usize * 4;
        if bytes.len() != expected {
            return Err(TableError::Length {
                key: table.key.clone(),
                actual: bytes.len(),
                rows: table.rows,
                dim: table.dim,
                expected,
            });
        }
        let actual = sha256_hex(bytes);
        if actual != table.sha256 {
            return Err(TableError::Checksum {
                key: table.key.clone(),
                expected: table.sha256.clone(),
                actual,
            });
        }
        let values = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Self {
            dim: table.dim as usize,
            values,
        })
    }

    /// Fetch `table` from `store` and [`decode`](Self::decode) it.
    pub async fn load(store: &Store, table: &EmbeddingTable) -> Result<Self, TableError> {
        let bytes = store
            .get(&table.key)
            .await
            .map_err(|source| TableError::Store {
                key: table.key.clone(),
                source,
            })?;
        Self::decode(table, &bytes)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Row `row`, or `None` past the end.
    pub fn row(&self, row: u32) -> Option<&[f32]> {
        let start = row as usize * self.dim;
        self.values.get(start..start + self.dim)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::settings::StoreSettings;

    fn store(dir: &tempfile::TempDir) -> Store {
        Store::open(&StoreSettings::local(dir.path())).unwrap()
    }

    #[tokio::test]
    async fn rows_come_back_as_written_across_parts() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        // 1,280 numbers a row, 3,000 rows: 15 MB, so several 5 MiB parts.
        let dim = 1280;
        let mut writer = TableWriter::create(&store, "t/emb.f32", dim).await.unwrap();
        for i in 0..3000u32 {
            let row: Vec<f32> = (0..dim).map(|j| i as f32 + j as f32 / 10_000.0).collect();
            assert_eq!(writer.push(&row).await.unwrap(), Some(i));
        }
        // Refused rows take no row number.
        assert_eq!(writer.push(&[1.0; 3]).await.unwrap(), None);
        let mut bad = vec![0.0; dim];
        bad[7] = f32::NAN;
        assert_eq!(writer.push(&bad).await.unwrap(), None);
        let table = writer.finish().await.unwrap().unwrap();
        assert_eq!((table.rows, table.dim), (3000, 1280));

        let read = Embeddings::load(&store, &table).await.unwrap();
        assert_eq!(read.row(0).unwrap()[0], 0.0);
        assert_eq!(read.row(2999).unwrap()[1279], 2999.0 + 1279.0 / 10_000.0);
        assert_eq!(read.row(1234).unwrap().len(), 1280);
        assert!(read.row(3000).is_none());
    }

    #[tokio::test]
    async fn an_empty_table_leaves_no_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let writer = TableWriter::create(&store, "t/none.f32", 4).await.unwrap();
        assert_eq!(writer.finish().await.unwrap(), None);
        assert!(matches!(
            store.get("t/none.f32").await,
            Err(StoreError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_damaged_table_is_refused_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let mut writer = TableWriter::create(&store, "t/e.f32", 2).await.unwrap();
        writer.push(&[1.0, 2.0]).await.unwrap();
        writer.push(&[3.0, 4.0]).await.unwrap();
        let table = writer.finish().await.unwrap().unwrap();
        let bytes = store.get("t/e.f32").await.unwrap();

        let short = Embeddings::decode(&table, &bytes[..12]).unwrap_err();
        assert!(short.to_string().contains("has 12 bytes"), "{short}");
        let mut flipped = bytes.to_vec();
        flipped[0] ^= 1;
        let changed = Embeddings::decode(&table, &flipped).unwrap_err();
        assert!(changed.to_string().contains("checksum"), "{changed}");
        let other = EmbeddingTable {
            format: "f16le".into(),
            ..table.clone()
        };
        assert!(matches!(
            Embeddings::decode(&other, &bytes),
            Err(TableError::Format { .. })
        ));
        assert_eq!(
            Embeddings::decode(&table, &bytes).unwrap().row(1),
            Some(&[3.0, 4.0][..])
        );
    }
}
