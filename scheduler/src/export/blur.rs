//! De-identification on the way out: every box of an image made unrecognisable before the image
//! leaves sieve (`sieve export --format blurred`).
//!
//! Each box is grown by [`Blur::padding`] (a fraction of its width and height on every side, so
//! hair, ears and a loosely drawn box are covered too), cut to the image, and then either
//! Gaussian-blurred (σ a fraction of the region's longer side) or pixelated (the region cut into
//! cells along its longer side, each painted its mean colour). The strength is relative to the
//! box, so a distant face is as unreadable as a close one. Every box is blurred, however many
//! there are. The image is encoded again (JPEG at quality 90), in the format its source file's
//! extension names where sieve can write that format, else PNG ([`delivered_format`]), so the
//! delivered file's name is known from the row alone: the original's bytes never go out.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::{DynamicImage, ImageFormat, Rgba, RgbaImage, imageops};
use sieve_shared::boxes::LabeledBox;

use crate::error::{AppError, AppResult};

/// How a region is made unrecognisable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlurStyle {
    /// Gaussian blur; strength is σ as a fraction of the region's longer side.
    Gaussian,
    /// Mosaic; strength is the number of cells along the region's longer side.
    Pixelate,
}

impl BlurStyle {
    pub const NAMES: [&str; 2] = ["gaussian", "pixelate"];

    pub fn parse(text: &str) -> AppResult<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "gaussian" => Ok(Self::Gaussian),
            "pixelate" | "pixelated" | "mosaic" => Ok(Self::Pixelate),
            other => Err(AppError::Invalid(format!(
                "unknown blur {other:?}: use {}",
                Self::NAMES.join(" or ")
            ))),
        }
    }

    /// The strength used when none is given: σ = 0.15 of a face's longer side, or 6 cells
    /// across it; at either, MTCNN no longer finds the astronaut's face
    /// (`worker/tests/it/faces.rs`).
    pub fn default_strength(self) -> f32 {
        match self {
            Self::Gaussian => 0.15,
            Self::Pixelate => 6.0,
        }
    }
}

/// How boxes are blurred (see the module's comment).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Blur {
    pub style: BlurStyle,
    pub strength: f32,
    /// Added on each side, as a fraction of the box's width (left, right) and height (top,
    /// bottom).
    pub padding: f32,
}

impl Default for Blur {
    fn default() -> Self {
        Self {
            style: BlurStyle::Gaussian,
            strength: BlurStyle::Gaussian.default_strength(),
            padding: Self::DEFAULT_PADDING,
        }
    }
}

impl Blur {
    pub const DEFAULT_PADDING: f32 = 0.1;

    /// A blur from the user's words, each checked: the style's default strength and
    /// [`DEFAULT_PADDING`](Self::DEFAULT_PADDING) where none is given.
    pub fn new(style: BlurStyle, strength: Option<f32>, padding: Option<f32>) -> AppResult<Self> {
        let strength = strength.unwrap_or(style.default_strength());
        let padding = padding.unwrap_or(Self::DEFAULT_PADDING);
        match style {
            BlurStyle::Gaussian if !(f32::MIN_POSITIVE..=1.0).contains(&strength) => {
                return Err(AppError::Invalid(format!(
                    "gaussian blur strength {strength}: σ as a fraction of the box's longer side, \
                     in (0, 1]"
                )));
            }
            BlurStyle::Pixelate if !(1.0..=64.0).contains(&strength) => {
                return Err(AppError::Invalid(format!(
                    "pixelate strength {strength}: cells along the box's longer side, 1 to 64"
                )));
            }
            _ => {}
        }
        if !(0.0..=1.0).contains(&padding) {
            return Err(AppError::Invalid(format!(
                "blur padding {padding}: a fraction of the box's size on each side, 0 to 1"
            )));
        }
        Ok(Self {
            style,
            strength,
            padding,
        })
    }

    /// The pixels `[x0, x1) × [y0, y1)` blurring `b` covers in a `width` × `height` image, or
    /// `None` when none (a box wholly outside).
    pub fn region(&self, b: &LabeledBox, width: u32, height: u32) -> Option<[u32; 4]> {
        let (pw, ph) = (b.width() * self.padding, b.height() * self.padding);
        let clamp = |v: f32, max: u32| v.clamp(0.0, max as f32);
        let x0 = clamp((b.x_min - pw).floor(), width) as u32;
        let y0 = clamp((b.y_min - ph).floor(), height) as u32;
        let x1 = clamp((b.x_max + pw).ceil(), width) as u32;
        let y1 = clamp((b.y_max + ph).ceil(), height) as u32;
        (x1 > x0 && y1 > y0).then_some([x0, y0, x1, y1])
    }

    /// Blurs every box of `image` in place.
    pub fn apply(&self, image: &mut RgbaImage, boxes: &[LabeledBox]) {
        let (width, height) = image.dimensions();
        for b in boxes {
            let Some([x0, y0, x1, y1]) = self.region(b, width, height) else {
                continue;
            };
            let (w, h) = (x1 - x0, y1 - y0);
            let longer = w.max(h) as f32;
            let region = imageops::crop_imm(image, x0, y0, w, h).to_image();
            let blurred = match self.style {
                BlurStyle::Gaussian => imageops::blur(&region, (self.strength * longer).max(0.5)),
                BlurStyle::Pixelate => pixelate(&region, longer / self.strength),
            };
            imageops::replace(image, &blurred, i64::from(x0), i64::from(y0));
        }
    }

    /// Decodes `bytes`, blurs `boxes` and encodes the image as `format` (see
    /// [`delivered_format`]). Fails, with the decoder's reason, on bytes that are no image:
    /// such an image is not delivered at all.
    pub fn apply_to_bytes(
        &self,
        bytes: &[u8],
        boxes: &[LabeledBox],
        format: ImageFormat,
    ) -> anyhow::Result<Vec<u8>> {
        let mut pixels = image::load_from_memory(bytes)?.into_rgba8();
        self.apply(&mut pixels, boxes);
        let mut out = Cursor::new(Vec::new());
        if format == ImageFormat::Jpeg {
            let rgb = DynamicImage::ImageRgba8(pixels).to_rgb8();
            rgb.write_with_encoder(JpegEncoder::new_with_quality(&mut out, 90))?;
        } else {
            DynamicImage::ImageRgba8(pixels).write_to(&mut out, format)?;
        }
        Ok(out.into_inner())
    }
}

/// The format an image from `source` (its original path or URL) is delivered in: the one its
/// extension names where that is JPEG, PNG, WebP or TIFF; PNG otherwise (no extension, BMP),
/// which keeps every pixel.
pub fn delivered_format(source: &str) -> ImageFormat {
    match ImageFormat::from_path(source) {
        Ok(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP | ImageFormat::Tiff)) => f,
        _ => ImageFormat::Png,
    }
}

/// Where a blurred export puts an item's image: `images/ITEM_ID.EXT`.
pub fn delivered_name(item_id: uuid::Uuid, source: &str) -> String {
    let ext = delivered_format(source)
        .extensions_str()
        .first()
        .copied()
        .unwrap_or("png");
    format!("images/{item_id}.{ext}")
}

/// Each `cell`-sided square of `region` painted its mean colour.
fn pixelate(region: &RgbaImage, cell: f32) -> RgbaImage {
    let cell = cell.max(1.0).round() as u32;
    let (w, h) = region.dimensions();
    let mut out = region.clone();
    for cy in (0..h).step_by(cell as usize) {
        for cx in (0..w).step_by(cell as usize) {
            let (cw, ch) = (cell.min(w - cx), cell.min(h - cy));
            let mut sum = [0u64; 4];
            for y in cy..cy + ch {
                for x in cx..cx + cw {
                    for (s, v) in sum.iter_mut().zip(region.get_pixel(x, y).0) {
                        *s += u64::from(v);
                    }
                }
            }
            let n = u64::from(cw * ch);
            let mean = Rgba(sum.map(|s| ((s + n / 2) / n) as u8));
            for y in cy..cy + ch {
                for x in cx..cx + cw {
                    out.put_pixel(x, y, mean);
                }
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn checkerboard(w: u32, h: u32) -> RgbaImage {
        RgbaImage::from_fn(w, h, |x, y| {
            let v = if (x + y) % 2 == 0 { 255 } else { 0 };
            Rgba([v, v, v, 255])
        })
    }

    fn b(x_min: f32, y_min: f32, x_max: f32, y_max: f32) -> LabeledBox {
        LabeledBox {
            class: 0,
            x_min,
            y_min,
            x_max,
            y_max,
        }
    }

    /// Mean absolute difference between horizontal neighbours: 255 on a checkerboard, near 0
    /// once blurred.
    fn detail(image: &RgbaImage, [x0, y0, x1, y1]: [u32; 4]) -> f32 {
        let mut sum = 0.0;
        let mut n = 0.0;
        for y in y0..y1 {
            for x in x0..x1 - 1 {
                let a = f32::from(image.get_pixel(x, y).0[0]);
                let c = f32::from(image.get_pixel(x + 1, y).0[0]);
                sum += (a - c).abs();
                n += 1.0;
            }
        }
        sum / n
    }

    #[test]
    fn each_style_wipes_the_detail_inside_the_padded_box_and_nothing_outside() {
        for style in [BlurStyle::Gaussian, BlurStyle::Pixelate] {
            let mut image = checkerboard(100, 80);
            let blur = Blur::new(style, None, None).unwrap();
            let face = b(20.0, 20.0, 60.0, 50.0);
            blur.apply(&mut image, &[face]);
            // Padding 0.1: 4 px left and right, 3 above and below.
            assert_eq!(blur.region(&face, 100, 80), Some([16, 17, 64, 53]));
            let inside = detail(&image, [17, 18, 63, 52]);
            assert!(inside < 60.0, "{style:?}: detail {inside} left in the box");
            assert_eq!(detail(&image, [0, 0, 16, 80]), 255.0, "{style:?}");
            assert_eq!(detail(&image, [64, 0, 100, 80]), 255.0, "{style:?}");
            assert_eq!(detail(&image, [0, 53, 100, 80]), 255.0, "{style:?}");
        }
    }

    #[test]
    fn hundreds_of_boxes_are_all_blurred_and_edge_boxes_are_cut_to_the_image() {
        let mut image = checkerboard(400, 400);
        let boxes: Vec<LabeledBox> = (0..20)
            .flat_map(|i| (0..20).map(move |j| (i, j)))
            .map(|(i, j)| {
                b(
                    i as f32 * 20.0 + 2.0,
                    j as f32 * 20.0 + 2.0,
                    i as f32 * 20.0 + 18.0,
                    j as f32 * 20.0 + 18.0,
                )
            })
            .collect();
        Blur::default().apply(&mut image, &boxes);
        for bx in &boxes {
            let [x0, y0, x1, y1] = Blur::default().region(bx, 400, 400).unwrap();
            assert!(
                detail(&image, [x0 + 2, y0 + 2, x1 - 2, y1 - 2]) < 60.0,
                "{bx:?}"
            );
        }
        let blur = Blur::default();
        assert_eq!(
            blur.region(&b(-10.0, -10.0, 5.0, 5.0), 400, 400),
            Some([0, 0, 7, 7])
        );
        assert_eq!(blur.region(&b(500.0, 500.0, 510.0, 510.0), 400, 400), None);
    }

    #[test]
    fn bytes_come_back_in_the_format_the_source_names_and_garbage_is_refused() {
        let image = DynamicImage::ImageRgba8(checkerboard(32, 32)).to_rgb8();
        for (source, format) in [("a/b.png", ImageFormat::Png), ("c.JPEG", ImageFormat::Jpeg)] {
            let mut bytes = Cursor::new(Vec::new());
            image.write_to(&mut bytes, format).unwrap();
            let delivered = delivered_format(source);
            assert_eq!(delivered, format);
            let out = Blur::default()
                .apply_to_bytes(bytes.get_ref(), &[b(4.0, 4.0, 28.0, 28.0)], delivered)
                .unwrap();
            assert_eq!(image::guess_format(&out).unwrap(), format);
            assert_ne!(&out, bytes.get_ref());
        }
        let id = uuid::Uuid::nil();
        assert_eq!(delivered_name(id, "x/y.jpeg"), format!("images/{id}.jpg"));
        assert_eq!(delivered_name(id, "s3://b/k"), format!("images/{id}.png"));
        assert_eq!(delivered_name(id, "scan.bmp"), format!("images/{id}.png"));
        let err = Blur::default()
            .apply_to_bytes(b"not an image", &[], ImageFormat::Png)
            .unwrap_err();
        assert!(!err.to_string().is_empty());
    }

    #[test]
    fn bad_settings_are_refused_with_what_was_wrong() {
        let err = Blur::new(BlurStyle::Gaussian, Some(3.0), None).unwrap_err();
        assert!(
            err.to_string().contains("gaussian blur strength 3"),
            "{err}"
        );
        let err = Blur::new(BlurStyle::Pixelate, Some(0.5), None).unwrap_err();
        assert!(err.to_string().contains("1 to 64"), "{err}");
        let err = Blur::new(BlurStyle::Gaussian, None, Some(-0.1)).unwrap_err();
        assert!(err.to_string().contains("padding -0.1"), "{err}");
        let err = BlurStyle::parse("smudge").unwrap_err();
        assert!(err.to_string().contains("gaussian or pixelate"), "{err}");
    }
}
