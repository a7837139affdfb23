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
    export_png_where(dataset, split, n, out, |_| true)
}

/// Write the images of a data set whose index `keep` accepts as grayscale
/// PNG files into `out` (files already there are kept), at most `n` of
/// them; returns how many were written or found.
fn export_png_where(
    dataset: &Dataset,
    split: Split,
    n: usize,
    out: &Path,
    keep: impl Fn(usize) -> bool,
) -> anyhow::Result<usize> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut exported = 0;
    for i in (0..dataset.len()).filter(|&i| keep(i)).take(n) {
        exported += 1;
        let path = out.join(file_name(split, i));
        if path.exists() {
            continue;
        }
        let img = image::GrayImage::from_raw(SIDE as u32, SIDE as u32, dataset.image(i).to_vec())
            .context("image buffer has the wrong size")?;
        img.save_with_format(&path, image::ImageFormat::Png)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(exported)
}

/// The Fashion-MNIST classes a project labels, in the project's order: all
/// ten, or a subset (`--classes trouser,bag,sneaker` makes an easy set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classes(Vec<usize>);

impl Classes {
    /// All ten classes.
    pub fn all() -> Self {
        Self((0..CLASSES.len()).collect())
    }

    /// The classes named (case-insensitively) in `names`; none means all.
    pub fn parse(names: &[String]) -> anyhow::Result<Self> {
        if names.is_empty() {
            return Ok(Self::all());
        }
        let mut picked = Vec::with_capacity(names.len());
        for name in names {
            let index = CLASSES
                .iter()
                .position(|c| c.eq_ignore_ascii_case(name.trim()))
                .with_context(|| {
                    format!(
                        "{name:?} is not a Fashion-MNIST class (they are {})",
                        CLASSES.join(", ")
                    )
                })?;
            anyhow::ensure!(!picked.contains(&index), "{name:?} is named twice");
            picked.push(index);
        }
        anyhow::ensure!(picked.len() >= 2, "a project needs at least two classes");
        Ok(Self(picked))
    }

    /// Whether these are all ten, in the data set's order.
    pub fn is_all(&self) -> bool {
        *self == Self::all()
    }

    /// The project's class names.
    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|&c| CLASSES[c]).collect()
    }

    /// The project's index of the data set's class `class`, if picked.
    fn index_of(&self, class: u8) -> Option<usize> {
        self.0.iter().position(|&c| c == usize::from(class))
    }
}

/// The true class of every exported image, for both splits: what simulated
/// reviewers answer and what the final scoring compares with.
pub struct Truth {
    train: Vec<u8>,
    test: Vec<u8>,
    classes: Classes,
}

impl Truth {
    /// The true class of an exported image, by its file name, as the
    /// project's class index.
    pub fn class_of(&self, source: &str) -> Option<usize> {
        let (split, index) = index_of(source)?;
        let labels = match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        };
        self.classes.index_of(*labels.get(index)?)
    }

    /// The project's classes.
    pub fn classes(&self) -> &Classes {
        &self.classes
    }
}

/// Export the first `n` images of `classes` — the training split first, then
/// the test split — as PNG files into `out` (files already there are kept),
/// and return how many there are and their truth.
pub fn export_first(
    dir: &Path,
    n: usize,
    out: &Path,
    classes: &Classes,
) -> anyhow::Result<(usize, Truth)> {
    let n = n.min(TOTAL);
    let picked = |labels: &[u8], i: usize| classes.index_of(labels[i]).is_some();
    // All classes: the first `n` images are the ones exported, so only they
    // are read.
    let limit = |size: usize| classes.is_all().then_some(size);
    let train = load(dir, Split::Train, limit(n.min(TRAIN_SIZE)))?;
    let mut exported =
        export_png_where(&train, Split::Train, n, out, |i| picked(&train.labels, i))?;
    let test = if exported < n {
        let test = load(dir, Split::Test, limit(n - exported))?;
        exported += export_png_where(&test, Split::Test, n - exported, out, |i| {
            picked(&test.labels, i)
        })?;
        test.labels
    } else {
        Vec::new()
    };
    Ok((
        exported,
        Truth {
            train: train.labels,
            test,
            classes: classes.clone(),
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
            classes: Classes::all(),
        };
        assert_eq!(truth.class_of("train-00001.png"), Some(4));
        assert_eq!(truth.class_of("/a/t10k-00000.png"), Some(7));
        assert_eq!(truth.class_of("t10k-00001.png"), None);
        assert_eq!(truth.class_of("cat.png"), None);
    }

    #[test]
    fn a_subset_renumbers_its_classes_in_the_order_named() -> anyhow::Result<()> {
        let names = ["Bag".to_owned(), "trouser".to_owned()];
        let classes = Classes::parse(&names)?;
        assert_eq!(classes.names(), vec!["bag", "trouser"]);
        assert!(!classes.is_all());
        let truth = Truth {
            train: vec![8, 1, 3],
            test: vec![],
            classes,
        };
        assert_eq!(truth.class_of("train-00000.png"), Some(0));
        assert_eq!(truth.class_of("train-00001.png"), Some(1));
        assert_eq!(truth.class_of("train-00002.png"), None, "not picked");
        Ok(())
    }

    #[test]
    fn unknown_twice_named_or_lone_classes_are_refused() -> anyhow::Result<()> {
        let parse = |names: &[&str]| {
            Classes::parse(&names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        };
        let err = parse(&["bag", "hat"])
            .expect_err("no such class")
            .to_string();
        assert!(
            err.contains("\"hat\" is not a Fashion-MNIST class"),
            "{err}"
        );
        assert!(parse(&["bag", "bag"]).is_err());
        assert!(parse(&["bag"]).is_err());
        assert!(parse(&[])?.is_all());
        Ok(())
    }
}
