//! Fashion-MNIST from the Debian package `dataset-fashion-mnist` (gzipped IDX
//! files under `/usr/share/datasets/fashion-mnist/`), for the demo and tests.

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
    fn prefix(self) -> &'static str {
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

/// The file name an exported image gets; [`index_of`] reverses it.
pub fn file_name(split: Split, index: usize) -> String {
    format!("{}-{index:05}.png", split.prefix())
}

/// The index encoded in an exported file's name (`train-00042.png` -> 42).
pub fn index_of(path: &str) -> Option<(Split, usize)> {
    let name = Path::new(path).file_name()?.to_str()?;
    let stem = name.strip_suffix(".png")?;
    let (prefix, index) = stem.split_once('-')?;
    let split = match prefix {
        "train" => Split::Train,
        "t10k" => Split::Test,
        _ => return None,
    };
    Some((split, index.parse().ok()?))
}

/// Write images `0..n` of a data set as grayscale PNG files into `out`.
pub fn export_png(dataset: &Dataset, split: Split, n: usize, out: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let n = n.min(dataset.len());
    for i in 0..n {
        let path = out.join(file_name(split, i));
        if path.exists() {
            continue;
        }
        let img = image::GrayImage::from_raw(SIDE as u32, SIDE as u32, dataset.image(i).to_vec())
            .context("image buffer has the wrong size")?;
        img.save_with_format(&path, image::ImageFormat::Png)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(n)
}

/// The true class of every exported image, for both splits: what simulated
/// reviewers answer and what the final scoring compares with.
pub struct Truth {
    train: Vec<u8>,
    test: Vec<u8>,
}

impl Truth {
    /// The true class index of an exported image, by its file name.
    pub fn class_of(&self, source: &str) -> Option<usize> {
        let (split, index) = index_of(source)?;
        let labels = match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        };
        labels.get(index).map(|&class| usize::from(class))
    }
}

/// Export the first `n` images — the training split first, then the test
/// split — as PNG files into `out` (files already there are kept), and
/// return how many there are and their truth.
pub fn export_first(dir: &Path, n: usize, out: &Path) -> anyhow::Result<(usize, Truth)> {
    let n = n.min(TOTAL);
    let train = load(dir, Split::Train, Some(n.min(TRAIN_SIZE)))?;
    let mut exported = export_png(&train, Split::Train, train.len(), out)?;
    let test = if n > TRAIN_SIZE {
        let test = load(dir, Split::Test, Some(n - TRAIN_SIZE))?;
        exported += export_png(&test, Split::Test, test.len(), out)?;
        test.labels
    } else {
        Vec::new()
    };
    Ok((
        exported,
        Truth {
            train: train.labels,
            test,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        let name = file_name(Split::Train, 42);
        assert_eq!(name, "train-00042.png");
        assert_eq!(index_of(&format!("/x/y/{name}")), Some((Split::Train, 42)));
        assert_eq!(index_of("/x/cat.png"), None);
    }

    #[test]
    fn truth_covers_both_splits() {
        let truth = Truth {
            train: vec![3, 4],
            test: vec![7],
        };
        assert_eq!(truth.class_of("train-00001.png"), Some(4));
        assert_eq!(truth.class_of("/a/t10k-00000.png"), Some(7));
        assert_eq!(truth.class_of("t10k-00001.png"), None);
        assert_eq!(truth.class_of("cat.png"), None);
    }

    #[test]
    fn a_missing_data_set_says_what_to_install() {
        let err = match load(Path::new("/nonexistent"), Split::Train, Some(1)) {
            Ok(_) => panic!("must fail"),
            Err(err) => err,
        };
        assert!(format!("{err:#}").contains("apt-get install dataset-fashion-mnist"));
    }
}
