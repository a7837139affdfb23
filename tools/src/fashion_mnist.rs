//! Fashion-MNIST for the demo: the loader lives in `sieve_shared`; this adds
//! exporting the images as PNG files and the ground truth by file name.

use std::path::Path;

use anyhow::Context;

pub use crate::fashion_idx::{CLASSES, DEFAULT_DIR, Dataset, SIDE, Split, TOTAL, TRAIN_SIZE, load};

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
}
