//! Tiles: how a detector sees an image larger than its input.
//!
//! Aerial and document images are often thousands of pixels a side, and
//! objects in them a few dozen; shrinking the image to the detector's input
//! would shrink the objects below what it can find. So the image is cut
//! into square tiles of the input's side that overlap (an object cut by one
//! tile's edge lies whole in its neighbour), the detector runs on each,
//! and the boxes come back to image pixels ([`Tile::to_image`]) to be
//! merged by non-maximum suppression. Training cuts the same tiles and
//! keeps, per tile, the boxes mostly inside it ([`Tile::boxes_within`]).

use crate::boxes::LabeledBox;

/// A square window of an image, in its pixels (smaller than `side` only
/// where the image is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// Tiles of `side` covering a `width`×`height` image, neighbours
/// overlapping by at least `overlap` pixels, row by row; the last tile of a
/// row or column is moved back to end at the image's edge rather than
/// hang over it. An image no larger than `side` is one tile.
pub fn grid(width: u32, height: u32, side: u32, overlap: u32) -> Vec<Tile> {
    let side = side.max(1);
    let step = side.saturating_sub(overlap).max(1);
    let starts = |length: u32| -> Vec<u32> {
        if length <= side {
            return vec![0];
        }
        let mut at: Vec<u32> = (0..)
            .map(|n| n * step)
            .take_while(|start| start + side < length)
            .collect();
        at.push(length - side);
        at
    };
    let (xs, ys) = (starts(width), starts(height));
    ys.iter()
        .flat_map(|&y| {
            xs.iter().map(move |&x| Tile {
                x,
                y,
                width: side.min(width),
                height: side.min(height),
            })
        })
        .collect()
}

impl Tile {
    /// The boxes that lie at least `min_visible` (a share of their area)
    /// inside this tile, clipped to it, in the tile's pixels: a tile's
    /// training targets. A box mostly outside is left to the tile that
    /// holds it.
    pub fn boxes_within(&self, boxes: &[LabeledBox], min_visible: f32) -> Vec<LabeledBox> {
        let (x0, y0) = (self.x as f32, self.y as f32);
        let (x1, y1) = (x0 + self.width as f32, y0 + self.height as f32);
        boxes
            .iter()
            .filter_map(|b| {
                let clipped = LabeledBox {
                    class: b.class,
                    x_min: b.x_min.max(x0),
                    y_min: b.y_min.max(y0),
                    x_max: b.x_max.min(x1),
                    y_max: b.y_max.min(y1),
                };
                let area = b.width() * b.height();
                let visible = clipped.width().max(0.0) * clipped.height().max(0.0);
                (area > 0.0 && visible / area >= min_visible).then_some(LabeledBox {
                    x_min: clipped.x_min - x0,
                    y_min: clipped.y_min - y0,
                    x_max: clipped.x_max - x0,
                    y_max: clipped.y_max - y0,
                    ..clipped
                })
            })
            .collect()
    }

    /// A box found in this tile, in the image's pixels.
    pub fn to_image(&self, b: LabeledBox) -> LabeledBox {
        let (dx, dy) = (self.x as f32, self.y as f32);
        LabeledBox {
            x_min: b.x_min + dx,
            y_min: b.y_min + dy,
            x_max: b.x_max + dx,
            y_max: b.y_max + dy,
            ..b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_image_overlap_and_end_at_its_edges() {
        let tiles = grid(1000, 500, 384, 64);
        let xs: Vec<u32> = tiles.iter().filter(|t| t.y == 0).map(|t| t.x).collect();
        assert_eq!(xs, [0, 320, 616]);
        let ys: Vec<u32> = tiles.iter().filter(|t| t.x == 0).map(|t| t.y).collect();
        assert_eq!(ys, [0, 116]);
        assert!(tiles.iter().all(|t| t.width == 384 && t.height == 384));
        // Every pixel is in some tile.
        for (px, py) in [(0, 0), (999, 499), (383, 200), (700, 250)] {
            assert!(
                tiles
                    .iter()
                    .any(|t| px >= t.x && px < t.x + t.width && py >= t.y && py < t.y + t.height),
                "{px},{py}"
            );
        }
        assert_eq!(
            grid(300, 200, 384, 64),
            [Tile {
                x: 0,
                y: 0,
                width: 300,
                height: 200
            }]
        );
        assert_eq!(grid(384, 384, 384, 64).len(), 1);
    }

    #[test]
    fn a_tile_keeps_the_boxes_mostly_inside_it_and_maps_them_back() {
        let tile = Tile {
            x: 100,
            y: 100,
            width: 100,
            height: 100,
        };
        let b = |x_min, y_min, x_max, y_max| LabeledBox {
            class: 0,
            x_min,
            y_min,
            x_max,
            y_max,
        };
        let inside = b(110.0, 120.0, 130.0, 150.0);
        let mostly = b(190.0, 110.0, 210.0, 130.0); // half in
        let barely = b(195.0, 110.0, 215.0, 130.0); // a quarter in
        let kept = tile.boxes_within(&[inside, mostly, barely], 0.5);
        assert_eq!(
            kept,
            [b(10.0, 20.0, 30.0, 50.0), b(90.0, 10.0, 100.0, 30.0)]
        );
        assert_eq!(tile.to_image(kept[0]), inside);
    }
}
