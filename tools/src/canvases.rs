//! A detection set with exact boxes from real images: Fashion-MNIST items
//! pasted on larger canvases (issue 23's second set, for throughput and
//! learning curves; the tree crowns are the real-world one).
//!
//! Each canvas is `side`×`side` pixels of dim noise with a few items, each
//! scaled by 1 to 2 (28 to 56 px) and placed where it overlaps no other.
//! An item's box is the tight box of its non-background pixels, so boxes
//! are exact, and its class is the item's Fashion-MNIST class. Items are
//! drawn bright on the dark canvas as the data set stores them.

use image::imageops::{self, FilterType};
use image::{GrayImage, Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sieve_shared::boxes::LabeledBox;

use crate::fashion_idx::{Dataset, SIDE};

/// A canvas and the boxes of the items on it.
pub struct Canvas {
    pub image: RgbImage,
    pub boxes: Vec<LabeledBox>,
}

/// Pixels above this count as the item (Fashion-MNIST backgrounds are 0).
const INK: u8 = 16;

/// `count` canvases of `side` pixels with 1 to `most` items each, items
/// taken from `dataset` in order from `first` (wrapping), placed by `seed`.
pub fn canvases(
    dataset: &Dataset,
    first: usize,
    count: usize,
    side: u32,
    most: usize,
    seed: u64,
) -> Vec<Canvas> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next = first;
    (0..count)
        .map(|_| {
            // Noise below the ink level, so only items count as ink.
            let mut image = RgbImage::from_fn(side, side, |_, _| {
                let v = rng.random_range(0..INK);
                Rgb([v, v, v])
            });
            let mut boxes: Vec<LabeledBox> = Vec::new();
            let wanted = rng.random_range(1..=most.max(1));
            for _ in 0..wanted {
                let index = next % dataset.len().max(1);
                next += 1;
                let item =
                    GrayImage::from_raw(SIDE as u32, SIDE as u32, dataset.image(index).to_vec());
                let Some(item) = item else { continue };
                let scale = rng.random_range(1.0..2.0_f32);
                let size = ((SIDE as f32) * scale) as u32;
                let item = imageops::resize(&item, size, size, FilterType::Triangle);
                let Some(tight) = ink_box(&item) else {
                    continue;
                };
                // A few tries at a free place; a crowded canvas takes fewer items.
                for _ in 0..20 {
                    let x = rng.random_range(0..=side.saturating_sub(size));
                    let y = rng.random_range(0..=side.saturating_sub(size));
                    let placed = LabeledBox {
                        class: u32::from(dataset.labels[index]),
                        x_min: (x + tight.0) as f32,
                        y_min: (y + tight.1) as f32,
                        x_max: (x + tight.2) as f32,
                        y_max: (y + tight.3) as f32,
                    };
                    if boxes.iter().any(|b| b.iou(&placed) > 0.0) {
                        continue;
                    }
                    for (px, py, pixel) in item.enumerate_pixels() {
                        let v = pixel[0];
                        if v > INK {
                            image.put_pixel(x + px, y + py, Rgb([v, v, v]));
                        }
                    }
                    boxes.push(placed);
                    break;
                }
            }
            Canvas { image, boxes }
        })
        .collect()
}

/// The tight box of an item's ink: (x_min, y_min, x_max, y_max), the max
/// exclusive; `None` for an item with none.
fn ink_box(item: &GrayImage) -> Option<(u32, u32, u32, u32)> {
    let mut found: Option<(u32, u32, u32, u32)> = None;
    for (x, y, pixel) in item.enumerate_pixels() {
        if pixel[0] > INK {
            found = Some(match found {
                None => (x, y, x + 1, y + 1),
                Some((a, b, c, d)) => (a.min(x), b.min(y), c.max(x + 1), d.max(y + 1)),
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset() -> Dataset {
        // Two items: a 10×10 square of ink at (5, 5), and a bar.
        let mut images = vec![0u8; 2 * SIDE * SIDE];
        for y in 5..15 {
            for x in 5..15 {
                images[y * SIDE + x] = 200;
            }
        }
        for x in 0..SIDE {
            images[SIDE * SIDE + 20 * SIDE + x] = 255;
        }
        Dataset {
            images,
            labels: vec![3, 7],
        }
    }

    #[test]
    fn boxes_are_exact_apart_and_inside_the_canvas() {
        let set = canvases(&dataset(), 0, 20, 160, 4, 1);
        assert_eq!(set.len(), 20);
        let mut classes = std::collections::BTreeSet::new();
        for canvas in &set {
            assert!(!canvas.boxes.is_empty());
            for (i, b) in canvas.boxes.iter().enumerate() {
                classes.insert(b.class);
                assert!(b.x_min >= 0.0 && b.y_min >= 0.0 && b.x_max <= 160.0 && b.y_max <= 160.0);
                assert!(canvas.boxes[i + 1..].iter().all(|o| o.iou(b) == 0.0));
                // The box's border rows and columns hold ink.
                let (x0, y0) = (b.x_min as u32, b.y_min as u32);
                let (x1, y1) = (b.x_max as u32 - 1, b.y_max as u32 - 1);
                let inked = |x: u32, y: u32| canvas.image.get_pixel(x, y)[0] > INK;
                assert!((x0..=x1).any(|x| inked(x, y0)) && (x0..=x1).any(|x| inked(x, y1)));
                assert!((y0..=y1).any(|y| inked(x0, y)) && (y0..=y1).any(|y| inked(x1, y)));
            }
        }
        assert_eq!(classes.into_iter().collect::<Vec<_>>(), [3, 7]);
    }
}
