//! MTCNN's pretrained networks on burn, against real photos the packages ship: every face found,
//! nothing else above the face threshold, and the same boxes as the original implementation.
//!
//! Needs `ops/weights/mtcnn/` and `ops/test-photos/` (`bash ops/install-deps.sh` fetches both):
//! the group photo `t1.jpg` and `Tom_Hanks_54745.png` from insightface 2.1, and scikit-image's
//! astronaut, cat, coffee cup and rocket (no faces).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::tensor::Device;
use sieve_shared::boxes::LabeledBox;
use sieve_testkit::faces::{FIXTURE, face as corners, photo};
use sieve_worker::model::ModelError;
use sieve_worker::model::mtcnn::{DEFAULT_WEIGHTS_DIR, FACE_THRESHOLD, Face, Mtcnn, MtcnnConfig};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn detector() -> &'static Mtcnn {
    static MODEL: OnceLock<Mtcnn> = OnceLock::new();
    MODEL.get_or_init(|| {
        Mtcnn::load(
            &repo_path(DEFAULT_WEIGHTS_DIR),
            MtcnnConfig::default(),
            &Device::flex(),
        )
        .expect("MTCNN's weights: run `bash ops/install-deps.sh`")
    })
}

fn faces_in(photo_name: &str) -> Vec<Face> {
    let image = image::open(photo(photo_name)).unwrap().to_rgb8();
    detector().detect(&image).unwrap()
}

#[test]
fn every_face_in_the_real_photos_is_found_and_nothing_else_above_the_threshold() {
    for (photo, truth) in FIXTURE {
        let found: Vec<Face> = faces_in(photo)
            .into_iter()
            .filter(|f| f.at.score >= FACE_THRESHOLD)
            .collect();
        for face in truth {
            let face = corners(*face);
            let best = found
                .iter()
                .map(|f| f.at.as_box().iou(&face))
                .fold(0.0_f32, f32::max);
            assert!(
                best >= 0.5,
                "{photo}: the face at {face:?} was missed (best IoU {best}): {found:?}"
            );
        }
        for f in &found {
            assert!(
                truth.iter().any(|t| corners(*t).iou(&f.at.as_box()) >= 0.5),
                "{photo}: {f:?} is not a face but scores over {FACE_THRESHOLD}"
            );
        }
        assert_eq!(found.len(), truth.len(), "{photo}: {found:?}");
    }
}

/// What facenet-pytorch 2.6.0's `MTCNN(keep_all=True).detect` returns on the same photos (torch
/// 2.9 on the CPU, images read by PIL): box corners and scores, candidates under the face
/// threshold included. Pins the port stage by stage: one transposed dense layer, one PReLU left
/// at its initial slope or a resize that is not area averaging, and boxes move or vanish. The
/// tolerance allows for the two JPEG decoders' rounding: measured, the port is within 0.5 px
/// of every reference box, and within 0.011 of the scores (the largest gap on the weakest
/// candidate of the JPEG; the PNGs', decoded alike, within 1e-3).
#[test]
fn the_port_finds_the_boxes_facenet_pytorch_finds() {
    type Found = [([f32; 4], f32)];
    let reference: [(&str, &Found); 3] = [
        (
            "t1.jpg",
            &[
                ([464.97, 261.78, 570.38, 405.17], 0.99964),
                ([54.62, 262.77, 165.26, 397.31], 0.99994),
                ([908.18, 61.96, 1013.65, 201.54], 0.99999),
                ([268.18, 149.75, 375.05, 272.43], 0.99988),
                ([742.99, 346.03, 843.51, 473.85], 0.99989),
                ([1134.53, 276.29, 1227.67, 395.42], 0.97547),
                ([690.72, 539.34, 741.39, 599.7], 0.86943),
                ([1093.9, 691.59, 1135.36, 741.5], 0.8632),
            ],
        ),
        (
            "Tom_Hanks_54745.png",
            &[([-2.87, -0.91, 82.82, 119.55], 0.99904)],
        ),
        ("astronaut.png", &[([181.05, 62.16, 267.75, 172.05], 1.0)]),
    ];
    for (photo, expected) in reference {
        let found = faces_in(photo);
        assert_eq!(found.len(), expected.len(), "{photo}: {found:?}");
        for (b, score) in expected {
            let f = found
                .iter()
                .max_by(|x, y| {
                    let iou = |f: &&Face| f.at.as_box().iou(&corners(*b));
                    iou(x).total_cmp(&iou(y))
                })
                .unwrap();
            let got = [f.at.x_min, f.at.y_min, f.at.x_max, f.at.y_max];
            let off = got
                .iter()
                .zip(b)
                .map(|(g, e)| (g - e).abs())
                .fold(0.0_f32, f32::max);
            let score_tolerance = if photo.ends_with(".png") { 1e-3 } else { 0.02 };
            assert!(
                off < 2.0 && (f.at.score - score).abs() < score_tolerance,
                "{photo}: reference {b:?} at {score}, port {got:?} at {}",
                f.at.score
            );
        }
    }
    // Landmarks lie inside their face: eyes above the mouth corners.
    for f in faces_in("astronaut.png") {
        let [left_eye, right_eye, _nose, left_mouth, right_mouth] = f.landmarks;
        for [x, y] in f.landmarks {
            assert!(x > f.at.x_min && x < f.at.x_max && y > f.at.y_min && y < f.at.y_max);
        }
        assert!(left_eye[1].max(right_eye[1]) < left_mouth[1].min(right_mouth[1]));
        assert!(left_eye[0] < right_eye[0]);
    }
}

#[test]
fn a_missing_weights_folder_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = Mtcnn::load(dir.path(), MtcnnConfig::default(), &Device::flex()).unwrap_err();
    assert!(matches!(err, ModelError::Weights(_)), "{err}");
    assert!(
        err.to_string().contains("pnet.pt") && err.to_string().contains("fetch-face-weights"),
        "{err}"
    );
}

/// What `sieve export --format blurred` delivers is no longer a face to the detector that found
/// it: every fixture face, blurred at each style's default strength, scores under the face
/// threshold, while the faces left unblurred in the same photo are still found.
#[test]
fn blurred_faces_are_no_longer_found() {
    use sieve_scheduler::export::blur::{Blur, BlurStyle};
    for style in [BlurStyle::Gaussian, BlurStyle::Pixelate] {
        let blur = Blur::new(style, None, None).unwrap();
        for (photo, truth) in FIXTURE.iter().filter(|(_, t)| !t.is_empty()) {
            let mut image = image::open(sieve_testkit::faces::photo(photo))
                .unwrap()
                .to_rgba8();
            // Every face but the first blurred: the first shows the photo is still readable.
            let blurred: Vec<LabeledBox> = truth.iter().skip(1).map(|b| corners(*b)).collect();
            blur.apply(&mut image, &blurred);
            let found: Vec<Face> = detector()
                .detect(&image::DynamicImage::ImageRgba8(image).to_rgb8())
                .unwrap()
                .into_iter()
                .filter(|f| f.at.score >= FACE_THRESHOLD)
                .collect();
            for b in &blurred {
                assert!(
                    found.iter().all(|f| f.at.as_box().iou(b) < 0.5),
                    "{style:?} {photo}: the blurred face {b:?} is still found: {found:?}"
                );
            }
            if truth.len() > 1 {
                let first = corners(truth[0]);
                assert!(
                    found.iter().any(|f| f.at.as_box().iou(&first) >= 0.5),
                    "{style:?} {photo}: the unblurred face is lost: {found:?}"
                );
            }
        }
    }
    // A lone face (the astronaut's) blurred leaves nothing.
    let mut image = image::open(photo("astronaut.png")).unwrap().to_rgba8();
    Blur::default().apply(&mut image, &[corners(FIXTURE[2].1[0])]);
    let left: Vec<Face> = detector()
        .detect(&image::DynamicImage::ImageRgba8(image).to_rgb8())
        .unwrap()
        .into_iter()
        .filter(|f| f.at.score >= FACE_THRESHOLD)
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
