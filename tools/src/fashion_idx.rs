//! Fashion-MNIST from the Debian package `dataset-fashion-mnist` (gzipped IDX
//! files under `/usr/share/datasets/fashion-mnist/`): the scheduler's demo
//! exports it as image files, the worker's accuracy benchmark trains on it.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use flate2::read::GzDecoder;

pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The ten classes, in label order.
pub const CLASSES: [&str; 10] = [
    "tshirt-top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
];

pub const SIDE: usize = 28;

/// Images in the training split; the test split holds the other 10,000.
pub const TRAIN_SIZE: usize = 60_000;

/// Images in both splits together.
pub const TOTAL: usize = 70_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// How the split's IDX files (and the demo's exported images) are named.
    pub fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// Images (row-major 28×28 bytes each) and their labels.
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * SIDE * SIDE..(i + 1) * SIDE * SIDE]
    }
}

fn read_gz(path: &Path) -> anyhow::Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| {
        format!(
            "cannot open {}: install the data set with `apt-get install dataset-fashion-mnist` (ops/install-deps.sh does)",
            path.display()
        )
    })?;
    let mut bytes = Vec::new();
    GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{} is not a valid gzip file", path.display()))?;
    Ok(bytes)
}

fn be_u32(bytes: &[u8], at: usize) -> anyhow::Result<usize> {
    let b = bytes.get(at..at + 4).context("IDX header is truncated")?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Load one split, at most `limit` images.
pub fn load(dir: &Path, split: Split, limit: Option<usize>) -> anyhow::Result<Dataset> {
    let file = |kind: &str| -> PathBuf {
        dir.join(format!(
            "{}-{kind}-idx{}-ubyte.gz",
            split.prefix(),
            if kind == "images" { 3 } else { 1 }
        ))
    };
    let images = read_gz(&file("images"))?;
    let labels = read_gz(&file("labels"))?;
    if be_u32(&images, 0)? != 0x0803 || be_u32(&labels, 0)? != 0x0801 {
        bail!("{} does not hold IDX image/label files", dir.display());
    }
    let count = be_u32(&images, 4)?;
    ensure!(
        count == be_u32(&labels, 4)?,
        "image and label counts differ"
    );
    ensure!(
        be_u32(&images, 8)? == SIDE && be_u32(&images, 12)? == SIDE,
        "images are not 28×28"
    );
    let n = limit.map_or(count, |l| l.min(count));
    let pixels = images
        .get(16..16 + n * SIDE * SIDE)
        .context("image file is truncated")?
        .to_vec();
    let labels = labels
        .get(8..8 + n)
        .context("label file is truncated")?
        .to_vec();
    Ok(Dataset {
        images: pixels,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_data_set_says_what_to_install() {
        let err = match load(Path::new("/nonexistent"), Split::Train, Some(1)) {
            Ok(_) => panic!("must fail"),
            Err(err) => err,
        };
        assert!(format!("{err:#}").contains("apt-get install dataset-fashion-mnist"));
    }
}
