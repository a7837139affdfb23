#![allow(clippy::unwrap_used)]
//! torchvision's MobileNetV2 ImageNet weights, imported into the burn MobileNetV2: every
//! tensor must load, and the network must recognise real photos.
//!
//! Needs `ops/weights/mobilenet_v2-b0353104.pth` and `ops/test-photos/` (scikit-image's
//! sample photos); `bash ops/install-deps.sh` fetches both. A photo classified right is the
//! end-to-end check of the whole import: one transposed, misnamed or skipped tensor, a wrong
//! padding or BatchNorm epsilon, and the top-1 class is garbage.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use sieve_worker::model::ModelError;
use sieve_worker::model::mobilenet::{
    EMBEDDING_DIM, ImportReport, MobileNetV2, NUM_CLASSES, imagenet_preprocess, load_imagenet,
    load_imagenet_with_report,
};

/// 52 convolutions, 52 BatchNorms with 4 tensors each, the classifier's weight and bias.
const PARAMETER_TENSORS: usize = 52 + 52 * 4 + 2;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn require(relative: &str) -> PathBuf {
    let path = repo_path(relative);
    assert!(
        path.exists(),
        "{} is missing: run `bash ops/install-deps.sh` first",
        path.display()
    );
    path
}

/// Loaded once for all tests of this binary (they run in parallel threads).
fn imported() -> &'static (MobileNetV2, ImportReport) {
    static MODEL: OnceLock<(MobileNetV2, ImportReport)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = require("ops/weights/mobilenet_v2-b0353104.pth");
        load_imagenet_with_report(&path, &Device::flex()).unwrap()
    })
}

/// Photos preprocessed like torchvision's eval transform, as one batch tensor.
///
/// # Shapes
/// - returns `[photos.len(), 3, side, side]`
fn photo_batch(photos: &[&str], side: u32) -> Tensor<4> {
    let mut values = Vec::new();
    for photo in photos {
        let path = require(&format!("ops/test-photos/{photo}"));
        let image = image::open(&path).unwrap();
        values.extend(imagenet_preprocess(&image, side).unwrap());
    }
    let side = side as usize;
    let shape = [photos.len(), 3, side, side];
    Tensor::from_data(TensorData::new(values, shape), &Device::flex())
}

/// The top `k` classes of each row as `(class, probability)`, best first.
fn top_k(logits: Tensor<2>, k: usize) -> Vec<Vec<(usize, f32)>> {
    let probs = softmax(logits, 1).try_into_vec_as::<f32>().unwrap();
    probs
        .chunks(NUM_CLASSES)
        .map(|row| {
            let mut ranked: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            ranked.truncate(k);
            ranked
        })
        .collect()
}

#[test]
fn every_tensor_of_the_file_is_loaded() {
    let (_, report) = imported();
    assert_eq!(report.applied, PARAMETER_TENSORS);
    // Only BatchNorm step counters are left over, one per BatchNorm.
    assert_eq!(report.ignored.len(), 52);
    assert!(
        report
            .ignored
            .iter()
            .all(|key| key.ends_with(".num_batches_tracked"))
    );
}

#[test]
fn recognises_real_photos() {
    let (model, _) = imported();
    // (photo, accepted ImageNet classes, how high one of them must rank)
    let cases: [(&str, &[usize], usize); 3] = [
        // Egyptian cat (p = 0.72), then tiger cat and tabby: any cat class.
        ("chelsea.png", &[281, 282, 283, 284, 285], 1),
        // espresso (p = 0.99) or cup.
        ("coffee.png", &[967, 968], 1),
        // The rocket stands in its launch tower, which the network calls a drilling platform
        // (540, p = 0.34); space shuttle (0.17) comes second and missile fourth.
        ("rocket.jpg", &[657, 744, 812], 2),
    ];
    let photos: Vec<&str> = cases.iter().map(|(photo, ..)| *photo).collect();
    let batch = photo_batch(&photos, 224);

    let start = Instant::now();
    let logits = model.forward(batch);
    let top = top_k(logits, 5);
    println!(
        "224x224: {:.0} ms per image (batch of {})",
        start.elapsed().as_secs_f64() * 1000.0 / photos.len() as f64,
        photos.len()
    );

    for ((photo, accepted, within), top) in cases.iter().zip(&top) {
        println!("{photo}: top-5 (class, p) {top:?}");
        assert!(
            top[..*within]
                .iter()
                .any(|(class, _)| accepted.contains(class)),
            "{photo}: none of {accepted:?} in the top {within}; top-5 {top:?}"
        );
    }
}

/// Logits on a synthetic input, compared with a float64 NumPy MobileNetV2 written
/// independently from the torchvision architecture and run on the same `.pth` tensors
/// (torchvision itself is not available offline). Pins the numbers, not only the ranking,
/// and does not depend on image decoding or resizing.
#[test]
fn matches_an_independent_reference() {
    let (model, _) = imported();
    let input = reference_input();
    let logits = model
        .forward(input.clone())
        .try_into_vec_as::<f32>()
        .unwrap();
    // (class, [logit of item 0, logit of item 1]); 904 and 489 are the argmaxes.
    let reference: [(usize, [f32; 2]); 5] = [
        (0, [-0.467630, -0.506780]),
        (281, [0.833955, 0.777242]),
        (904, [2.938972, 2.850752]),
        (489, [2.820732, 3.158949]),
        (999, [1.367697, 1.445217]),
    ];
    for (class, expected) in reference {
        for (item, expected) in expected.iter().enumerate() {
            let actual = logits[item * NUM_CLASSES + class];
            assert!(
                (actual - expected).abs() < 1e-3,
                "item {item}, class {class}: logit {actual}, reference {expected}"
            );
        }
    }
    let argmax = |item: usize| {
        let row = &logits[item * NUM_CLASSES..(item + 1) * NUM_CLASSES];
        (0..NUM_CLASSES).max_by(|&a, &b| row[a].total_cmp(&row[b]))
    };
    assert_eq!((argmax(0), argmax(1)), (Some(904), Some(489)));

    let features = model.features(input).try_into_vec_as::<f32>().unwrap();
    for (item, expected) in [134.95225_f32, 143.62177].iter().enumerate() {
        let sum: f32 = features[item * EMBEDDING_DIM..(item + 1) * EMBEDDING_DIM]
            .iter()
            .sum();
        assert!(
            (sum - expected).abs() < 1e-2,
            "item {item}: embedding sum {sum}, reference {expected}"
        );
    }
}

/// The input the reference logits were computed on: two 64x64 images of a fixed pattern.
fn reference_input() -> Tensor<4> {
    let side = 64;
    let mut values = Vec::with_capacity(2 * 3 * side * side);
    for n in 0..2 {
        for c in 0..3 {
            for h in 0..side {
                for w in 0..side {
                    // Small integers over 8: exact in f32 and f64 alike.
                    values.push(((h * 7 + w * 3 + c * 11 + n * 5) % 17) as f32 / 8.0 - 1.0);
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(values, [2, 3, side, side]), &Device::flex())
}

/// Folding every BatchNorm into its convolution (the inference form) changes no output
/// beyond float rounding: the logits, the embedding and the stride-16 map of the reference
/// input agree.
#[test]
fn batchnorm_folded_into_the_convolutions_computes_the_same_function() {
    let (model, _) = imported();
    let folded = model.clone().fold_batchnorm();
    let input = reference_input();
    // Logits, pooled embedding and the stride-16 map the detector reads, flat.
    let outputs = |net: &MobileNetV2| -> [(&str, Vec<f32>); 3] {
        let flat = |t: Tensor<2>| t.try_into_vec_as::<f32>().unwrap();
        [
            ("logits", flat(net.forward(input.clone()))),
            ("embedding", flat(net.features(input.clone()))),
            (
                "stride-16 map",
                net.stride16_features(input.clone())
                    .try_into_vec_as::<f32>()
                    .unwrap(),
            ),
        ]
    };
    for ((what, plain), (_, folded)) in outputs(model).into_iter().zip(outputs(&folded)) {
        let worst = plain
            .iter()
            .zip(&folded)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0_f32, f32::max);
        assert!(worst < 1e-3, "{what}: folded differs by up to {worst}");
        println!("{what}: folded within {worst:e}");
    }
}

#[test]
fn features_are_the_pooled_embedding_at_any_size() {
    let (model, _) = imported();
    let batch = photo_batch(&["chelsea.png", "astronaut.png"], 96);

    let start = Instant::now();
    let embedding = model.features(batch.clone());
    println!(
        "96x96 features: {:.0} ms per image (batch of 2)",
        start.elapsed().as_secs_f64() * 1000.0 / 2.0
    );
    assert_eq!(embedding.dims(), [2, EMBEDDING_DIM]);
    let values = embedding.try_into_vec_as::<f32>().unwrap();
    // After ReLU6 and averaging: finite, within [0, 6], and not all zero.
    assert!(values.iter().all(|v| (0.0..=6.0).contains(v)));
    assert!(values.iter().any(|v| *v > 0.0));

    let logits = model.forward(batch);
    assert_eq!(logits.dims(), [2, NUM_CLASSES]);
    assert!(
        logits
            .try_into_vec_as::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    );
}

#[test]
fn a_missing_or_foreign_file_is_a_weights_error() {
    let device = Device::flex();
    let missing = repo_path("ops/weights/no-such-file.pth");
    match load_imagenet(&missing, &device) {
        Err(ModelError::Weights(message)) => assert!(message.contains("no-such-file.pth")),
        other => panic!("expected a weights error, got {other:?}"),
    }
    // A real file that is not a PyTorch checkpoint.
    let foreign = require("ops/test-photos/chelsea.png");
    assert!(matches!(
        load_imagenet(&foreign, &device),
        Err(ModelError::Weights(_))
    ));
}
