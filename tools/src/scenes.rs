//! The de-identification scene set: real faces at known places on real photos.
//!
//! The faces are the 100 face crops of scikit-image's `lfw_subset` (25×25 grayscale crops of
//! Labeled Faces in the Wild, forehead to chin, `ops/fetch-test-photos.sh` puts the file in
//! `ops/test-photos/`); the photos are scikit-image's photos without people (a cat, a coffee
//! cup, a rocket, a motorcycle). Each scene is a random crop of a photo (80–100% a side) with
//! up to [`MAX_FACES`] faces scaled to 40–130 pixels and pasted apart from each other, so the
//! exact box of every face is known: the pasted square. A few scenes have none, as real
//! batches do.

use std::path::Path;

use anyhow::Context as _;
use image::{GrayImage, RgbImage, imageops};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sieve_shared::boxes::LabeledBox;

/// The photos the faces are pasted on, in `ops/test-photos/`.
pub const BACKGROUNDS: [&str; 4] = [
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
];
/// `lfw_subset.npy`: 200 crops of 25×25, the first 100 faces.
pub const FACES_FILE: &str = "lfw_subset.npy";
const FACE_CROPS: usize = 100;
const CROP: usize = 25;
/// The most faces on one scene.
pub const MAX_FACES: usize = 5;
const SMALLEST: u32 = 40;
const LARGEST: u32 = 130;

/// One scene and the exact boxes of its faces (class 0) and plates (class 1, after
/// [`add_plates`]).
pub struct Scene {
    pub image: RgbImage,
    pub faces: Vec<LabeledBox>,
    pub plates: Vec<LabeledBox>,
}

impl Scene {
    /// Every box on the scene, faces first.
    pub fn boxes(&self) -> Vec<LabeledBox> {
        self.faces.iter().chain(&self.plates).copied().collect()
    }
}

/// The most plates [`add_plates`] puts on one scene.
pub const MAX_PLATES: usize = 2;
const PLATE_WIDEST: u32 = 150;
const PLATE_NARROWEST: u32 = 90;

/// The 100 face crops of `lfw_subset.npy` (a NumPy file of little-endian float64 in
/// `[0, 1]`, shape `(200, 25, 25)`).
pub fn load_faces(path: &Path) -> anyhow::Result<Vec<GrayImage>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("{}: run ops/fetch-test-photos.sh", path.display()))?;
    anyhow::ensure!(
        bytes.starts_with(b"\x93NUMPY") && bytes.len() > 10,
        "{} is not a NumPy file",
        path.display()
    );
    let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    let header = std::str::from_utf8(&bytes[10..10 + header_len.min(bytes.len() - 10)])?;
    anyhow::ensure!(
        header.contains("'descr': '<f8'") && header.contains("(200, 25, 25)"),
        "{}: expected float64 crops of shape (200, 25, 25), found {header}",
        path.display()
    );
    let data = &bytes[10 + header_len..];
    anyhow::ensure!(
        data.len() >= FACE_CROPS * CROP * CROP * 8,
        "{} is truncated",
        path.display()
    );
    Ok((0..FACE_CROPS)
        .map(|f| {
            GrayImage::from_fn(CROP as u32, CROP as u32, |x, y| {
                let at = ((f * CROP + y as usize) * CROP + x as usize) * 8;
                let mut v = [0u8; 8];
                v.copy_from_slice(&data[at..at + 8]);
                image::Luma([(f64::from_le_bytes(v).clamp(0.0, 1.0) * 255.0).round() as u8])
            })
        })
        .collect())
}

/// `count` scenes, the same for the same `seed`.
pub fn scenes(
    faces: &[GrayImage],
    backgrounds: &[RgbImage],
    count: usize,
    seed: u64,
) -> Vec<Scene> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            // A random crop of 80-100% of the photo a side: no two scenes alike, even
            // those without faces (identical images would be one item).
            let photo = &backgrounds[i % backgrounds.len()];
            let (pw, ph) = photo.dimensions();
            let share = rng.random_range(0.8..=1.0_f64);
            let (width, height) = (
                ((f64::from(pw) * share) as u32).max(1),
                ((f64::from(ph) * share) as u32).max(1),
            );
            let (cx, cy) = (
                rng.random_range(0..=pw - width),
                rng.random_range(0..=ph - height),
            );
            let mut image = imageops::crop_imm(photo, cx, cy, width, height).to_image();
            let wanted = rng.random_range(0..=MAX_FACES);
            let mut boxes: Vec<LabeledBox> = Vec::new();
            for _ in 0..wanted {
                let side = rng.random_range(SMALLEST..=LARGEST.min(width.min(height)));
                let free = free_place(&mut rng, (width, height), (side, side), 0, &boxes);
                if let Some(b) = free {
                    let face = &faces[rng.random_range(0..faces.len())];
                    let scaled = imageops::resize(face, side, side, imageops::FilterType::Triangle);
                    let rgb = image::DynamicImage::ImageLuma8(scaled).to_rgb8();
                    imageops::replace(&mut image, &rgb, b.x_min as i64, b.y_min as i64);
                    boxes.push(b);
                }
            }
            Scene {
                image,
                faces: boxes,
                plates: Vec::new(),
            }
        })
        .collect()
}

/// Licence plates on `scenes`, apart from their faces and each other: up to [`MAX_PLATES`]
/// a scene, some scenes none. No pretrained plate detector or plate photo set can be installed
/// here, so a plate is drawn: a light panel 3:1 with a dark rim and a row of dark glyphs of
/// random shapes, 90-150 pixels wide. What it is for is teaching detection heads a class
/// people box; its box is exact.
pub fn add_plates(scenes: &mut [Scene], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for scene in scenes {
        let (width, height) = scene.image.dimensions();
        let wanted = rng.random_range(0..=MAX_PLATES);
        for _ in 0..wanted {
            let w = rng.random_range(PLATE_NARROWEST..=PLATE_WIDEST.min(width));
            let h = (w / 3).min(height);
            let free = free_place(&mut rng, (width, height), (w, h), 1, &scene.boxes());
            if let Some(b) = free {
                draw_plate(&mut scene.image, &b, &mut rng);
                scene.plates.push(b);
            }
        }
    }
}

/// A plate over `at`: a white or yellow panel, a 2-pixel dark rim, six or seven glyphs.
fn draw_plate(image: &mut RgbImage, at: &LabeledBox, rng: &mut StdRng) {
    let (x0, y0) = (at.x_min as u32, at.y_min as u32);
    let (w, h) = (at.width() as u32, at.height() as u32);
    let panel = if rng.random_bool(0.5) {
        image::Rgb([240, 240, 235])
    } else {
        image::Rgb([245, 205, 40])
    };
    let ink = image::Rgb([20, 20, 30]);
    for y in 0..h {
        for x in 0..w {
            let rim = x < 2 || y < 2 || x + 2 >= w || y + 2 >= h;
            image.put_pixel(x0 + x, y0 + y, if rim { ink } else { panel });
        }
    }
    // Glyphs: in cells across the panel, each a few random strokes (bars and a frame).
    let glyphs = rng.random_range(6..=7);
    let cell = (w - 8) / glyphs;
    let (top, bottom) = (h / 5, h - h / 5);
    let stroke = (cell / 5).max(1);
    for g in 0..glyphs {
        let left = x0 + 4 + g * cell + cell / 6;
        let right = x0 + 4 + (g + 1) * cell - cell / 6;
        for _ in 0..rng.random_range(2..=4) {
            let vertical = rng.random_bool(0.5);
            let (from_x, to_x, from_y, to_y) = if vertical {
                let x = rng.random_range(left..right.saturating_sub(stroke).max(left + 1));
                (x, x + stroke, y0 + top, y0 + bottom)
            } else {
                let y = rng
                    .random_range(y0 + top..(y0 + bottom).saturating_sub(stroke).max(y0 + top + 1));
                (left, right, y, y + stroke)
            };
            for y in from_y..to_y.min(y0 + h - 2) {
                for x in from_x..to_x.min(x0 + w - 2) {
                    image.put_pixel(x, y, ink);
                }
            }
        }
    }
}

/// A place for a `w`×`h` box of `class` in a `width`×`height` scene that touches none of
/// `taken`: up to 50 random tries, so a crowded scene keeps fewer boxes.
fn free_place(
    rng: &mut StdRng,
    (width, height): (u32, u32),
    (w, h): (u32, u32),
    class: u32,
    taken: &[LabeledBox],
) -> Option<LabeledBox> {
    (0..50)
        .map(|_| {
            let x = rng.random_range(0..=width - w);
            let y = rng.random_range(0..=height - h);
            LabeledBox {
                class,
                x_min: x as f32,
                y_min: y as f32,
                x_max: (x + w) as f32,
                y_max: (y + h) as f32,
            }
        })
        .find(|b| taken.iter().all(|o| !touches(b, o)))
}

/// Whether two boxes overlap or share an edge.
fn touches(a: &LabeledBox, b: &LabeledBox) -> bool {
    a.x_min <= b.x_max && b.x_min <= a.x_max && a.y_min <= b.y_max && b.y_min <= a.y_max
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn faces_land_apart_inside_the_photo_and_the_set_repeats_for_a_seed() {
        let faces: Vec<GrayImage> = (0..3)
            .map(|i| GrayImage::from_pixel(25, 25, image::Luma([80 * i as u8 + 10])))
            .collect();
        // A colour gradient: every crop of it differs, and no pixel of it is gray.
        let backgrounds = [RgbImage::from_fn(300, 200, |x, y| {
            image::Rgb([(x % 200) as u8 + 50, y as u8, 0])
        })];
        let set = scenes(&faces, &backgrounds, 20, 7);
        assert_eq!(set.len(), 20);
        let total: usize = set.iter().map(|s| s.faces.len()).sum();
        assert!(total > 20, "{total} faces on 20 scenes");
        for scene in &set {
            for (i, a) in scene.faces.iter().enumerate() {
                let (w, h) = scene.image.dimensions();
                assert!(a.x_min >= 0.0 && a.y_min >= 0.0);
                assert!(a.x_max <= w as f32 && a.y_max <= h as f32);
                assert_eq!(a.width(), a.height());
                // The face is there: the pixel at its centre is gray, as the crops are.
                let centre = scene.image.get_pixel(
                    ((a.x_min + a.x_max) / 2.0) as u32,
                    ((a.y_min + a.y_max) / 2.0) as u32,
                );
                assert!(
                    centre.0[0] == centre.0[1] && centre.0[1] == centre.0[2],
                    "{centre:?}"
                );
                for b in &scene.faces[i + 1..] {
                    assert!(!touches(a, b), "{a:?} {b:?}");
                }
            }
        }
        let again = scenes(&faces, &backgrounds, 20, 7);
        assert!(set.iter().zip(&again).all(|(a, b)| a.faces == b.faces));
        // No two scenes are the same image, faces or not.
        for (i, a) in set.iter().enumerate() {
            for b in &set[i + 1..] {
                assert!(a.image.dimensions() != b.image.dimensions() || a.image != b.image);
            }
        }
    }

    #[test]
    fn plates_land_apart_from_faces_drawn_where_their_boxes_say() {
        let faces: Vec<GrayImage> = vec![GrayImage::from_pixel(25, 25, image::Luma([128]))];
        let backgrounds = [RgbImage::from_pixel(400, 300, image::Rgb([0, 90, 0]))];
        let mut set = scenes(&faces, &backgrounds, 30, 3);
        add_plates(&mut set, 5);
        let plates: usize = set.iter().map(|s| s.plates.len()).sum();
        assert!(plates > 15, "{plates} plates on 30 scenes");
        for scene in &set {
            assert!(scene.plates.len() <= MAX_PLATES);
            let all = scene.boxes();
            for (i, a) in all.iter().enumerate() {
                for b in &all[i + 1..] {
                    assert!(!touches(a, b), "{a:?} {b:?}");
                }
            }
            for p in &scene.plates {
                assert_eq!(p.class, 1);
                assert!((PLATE_NARROWEST as f32..=PLATE_WIDEST as f32).contains(&p.width()));
                // The rim is dark and the panel light, where the box says.
                let rim = scene.image.get_pixel(p.x_min as u32, p.y_min as u32);
                assert_eq!(rim.0, [20, 20, 30]);
                let panel = scene
                    .image
                    .get_pixel(p.x_min as u32 + 3, p.y_min as u32 + 3);
                assert!(panel.0[0] > 200, "{panel:?}");
                // Nothing of the plate outside its box: the background is untouched just left
                // of it (unless another box is there).
                if p.x_min >= 1.0 {
                    let (x, y) = (p.x_min - 1.0, p.y_min + 3.0);
                    let covered = all.iter().any(|b| {
                        (b.x_min..b.x_max).contains(&x) && (b.y_min..b.y_max).contains(&y)
                    });
                    if !covered {
                        assert_eq!(scene.image.get_pixel(x as u32, y as u32).0, [0, 90, 0]);
                    }
                }
            }
        }
    }

    #[test]
    fn the_real_face_crops_load() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../ops/test-photos")
            .join(FACES_FILE);
        let faces = load_faces(&path).unwrap();
        assert_eq!(faces.len(), 100);
        // Real crops: not flat.
        let (lo, hi) = faces[0]
            .pixels()
            .fold((255, 0), |(lo, hi), p| (lo.min(p.0[0]), hi.max(p.0[0])));
        assert!(hi - lo > 100, "{lo}..{hi}");
        let bad = std::env::temp_dir().join(format!("not-npy-{}", std::process::id()));
        std::fs::write(&bad, b"hello").unwrap();
        assert!(
            load_faces(&bad)
                .unwrap_err()
                .to_string()
                .contains("not a NumPy file")
        );
        std::fs::remove_file(&bad).ok();
    }
}
