//! Boxes: what a detection label is made of.
//!
//! A box is a class (an index into the project's class list) and its
//! corners in pixels of the original image, `x_min < x_max` and
//! `y_min < y_max`, inside the image. A label is a list of boxes, possibly
//! empty (an image a person saw with nothing to box). The list is stored as
//! it serializes here, in `labels.boxes`; every writer goes through
//! [`check`], so a stored list is always one this module accepts.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One box of a label, as stored.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LabeledBox {
    /// Index into the project's class list.
    pub class: u32,
    pub x_min: f32,
    pub y_min: f32,
    pub x_max: f32,
    pub y_max: f32,
}

impl LabeledBox {
    pub fn width(&self) -> f32 {
        self.x_max - self.x_min
    }

    pub fn height(&self) -> f32 {
        self.y_max - self.y_min
    }

    /// Intersection over union with `other` (0 when they do not overlap).
    pub fn iou(&self, other: &LabeledBox) -> f32 {
        let w = (self.x_max.min(other.x_max) - self.x_min.max(other.x_min)).max(0.0);
        let h = (self.y_max.min(other.y_max) - self.y_min.max(other.y_min)).max(0.0);
        let inter = w * h;
        let union = self.width() * self.height() + other.width() * other.height() - inter;
        if union > 0.0 { inter / union } else { 0.0 }
    }
}

impl fmt::Display for LabeledBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{},{},{},{}",
            self.x_min, self.y_min, self.x_max, self.y_max
        )
    }
}

/// Why a box cannot be stored, in words for the person who sent it.
pub fn problem(b: &LabeledBox, classes: usize, width: u32, height: u32) -> Option<String> {
    let corners = [b.x_min, b.y_min, b.x_max, b.y_max];
    if corners.iter().any(|v| !v.is_finite()) {
        return Some(format!("box {b} has a coordinate that is not a number"));
    }
    if b.class as usize >= classes {
        return Some(format!(
            "box {b} has class {}, but the project has {classes} classes",
            b.class
        ));
    }
    if b.x_max <= b.x_min {
        return Some(format!(
            "box {b} has zero or negative width (x_max {} <= x_min {})",
            b.x_max, b.x_min
        ));
    }
    if b.y_max <= b.y_min {
        return Some(format!(
            "box {b} has zero or negative height (y_max {} <= y_min {})",
            b.y_max, b.y_min
        ));
    }
    if b.x_min < 0.0 || b.y_min < 0.0 || b.x_max > width as f32 || b.y_max > height as f32 {
        return Some(format!("box {b} lies outside the {width}×{height} image"));
    }
    None
}

/// Every box of a label checked against the image it is drawn on: the
/// first problem, numbered from 1 in the list, or the boxes as they will
/// be stored.
pub fn check(boxes: &[LabeledBox], classes: usize, width: u32, height: u32) -> Result<(), String> {
    for (n, b) in boxes.iter().enumerate() {
        if let Some(problem) = problem(b, classes, width, height) {
            return Err(format!("box {} of {}: {problem}", n + 1, boxes.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn b(class: u32, x_min: f32, y_min: f32, x_max: f32, y_max: f32) -> LabeledBox {
        LabeledBox {
            class,
            x_min,
            y_min,
            x_max,
            y_max,
        }
    }

    #[test]
    fn a_box_inside_the_image_passes_and_each_fault_is_named() {
        assert_eq!(check(&[b(0, 0.0, 0.0, 100.0, 50.0)], 1, 100, 50), Ok(()));
        let outside = check(
            &[b(0, 1.0, 1.0, 2.0, 2.0), b(0, 90.0, 0.0, 101.0, 10.0)],
            1,
            100,
            50,
        )
        .unwrap_err();
        assert!(
            outside.starts_with("box 2 of 2") && outside.contains("outside the 100×50"),
            "{outside}"
        );
        let flat = check(&[b(0, 10.0, 5.0, 10.0, 9.0)], 1, 100, 50).unwrap_err();
        assert!(flat.contains("zero or negative width"), "{flat}");
        let upside = check(&[b(0, 1.0, 9.0, 10.0, 5.0)], 1, 100, 50).unwrap_err();
        assert!(upside.contains("zero or negative height"), "{upside}");
        let class = check(&[b(3, 1.0, 1.0, 10.0, 5.0)], 2, 100, 50).unwrap_err();
        assert!(
            class.contains("class 3") && class.contains("2 classes"),
            "{class}"
        );
        let nan = check(&[b(0, f32::NAN, 1.0, 10.0, 5.0)], 1, 100, 50).unwrap_err();
        assert!(nan.contains("not a number"), "{nan}");
        let negative = check(&[b(0, -1.0, 1.0, 10.0, 5.0)], 1, 100, 50).unwrap_err();
        assert!(negative.contains("outside"), "{negative}");
    }

    #[test]
    fn iou_of_identical_disjoint_and_half_overlapping_boxes() {
        let a = b(0, 0.0, 0.0, 10.0, 10.0);
        assert_eq!(a.iou(&a), 1.0);
        assert_eq!(a.iou(&b(0, 20.0, 20.0, 30.0, 30.0)), 0.0);
        let half = a.iou(&b(0, 5.0, 0.0, 15.0, 10.0));
        assert!((half - 1.0 / 3.0).abs() < 1e-6, "{half}");
    }

    #[test]
    fn boxes_store_as_plain_json_objects() {
        let stored = serde_json::to_value([b(1, 1.5, 2.0, 3.0, 4.0)]).unwrap();
        assert_eq!(
            stored,
            serde_json::json!([{"class": 1, "x_min": 1.5, "y_min": 2.0, "x_max": 3.0, "y_max": 4.0}])
        );
    }
}
