//! The real-photo face fixture: photos the packages ship (`ops/fetch-face-weights.sh`,
//! `ops/fetch-test-photos.sh` put them in `ops/test-photos/`) and the faces in them, boxed by
//! hand: each box was drawn over the photo and looked at (forehead to chin, ear to ear as the
//! face turns). `t1.jpg` (insightface 2.1) has six people; the hand on the table and the
//! reflection in the ashtray are not faces, nor is the tiny painted portrait on the wall. The
//! last three photos (scikit-image's) have none.

use std::path::{Path, PathBuf};

use sieve_shared::boxes::LabeledBox;

/// Each photo and its faces as `[x_min, y_min, x_max, y_max]` in its pixels.
pub const FIXTURE: [(&str, &[[f32; 4]]); 6] = [
    (
        "t1.jpg",
        &[
            [465.0, 262.0, 570.0, 405.0],
            [55.0, 263.0, 165.0, 397.0],
            [908.0, 62.0, 1014.0, 202.0],
            [268.0, 150.0, 375.0, 272.0],
            [743.0, 346.0, 844.0, 474.0],
            [1135.0, 276.0, 1228.0, 395.0],
        ],
    ),
    ("Tom_Hanks_54745.png", &[[0.0, 0.0, 83.0, 112.0]]),
    ("astronaut.png", &[[181.0, 62.0, 268.0, 172.0]]),
    ("chelsea.png", &[]),
    ("coffee.png", &[]),
    ("rocket.jpg", &[]),
];

/// A fixture box as a face (class 0).
pub fn face(b: [f32; 4]) -> LabeledBox {
    LabeledBox {
        class: 0,
        x_min: b[0],
        y_min: b[1],
        x_max: b[2],
        y_max: b[3],
    }
}

/// The faces of `photo` (none for a photo the fixture does not list).
pub fn faces_of(photo: &str) -> Vec<LabeledBox> {
    FIXTURE
        .iter()
        .find(|(name, _)| *name == photo)
        .map(|(_, boxes)| boxes.iter().copied().map(face).collect())
        .unwrap_or_default()
}

/// A photo of `ops/test-photos/`, or a panic that says how to get it.
pub fn photo(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ops/test-photos")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `bash ops/install-deps.sh`",
        path.display()
    );
    path
}
