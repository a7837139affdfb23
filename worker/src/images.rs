//! Image bytes to model input: decode, convert to the model's channels,
//! resize to its input size, normalize.
//!
//! The pixel limit is checked from the header before decoding, so a
//! decompression bomb costs nothing. Training and inference both come through
//! [`preprocess`], so they can never disagree on normalization.

use std::io::Cursor;

use image::imageops::FilterType;

use crate::model::{ArchitectureConfig, mobilenet};

/// Why an image cannot be used; always permanent for these bytes.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImageError {
    #[error("not a decodable image: {0}")]
    Decode(String),
    #[error("{width}x{height} is over the pixel limit of {limit}")]
    TooLarge { width: u32, height: u32, limit: u64 },
}

/// Decode `bytes` whole, as they are (a detector tiles them), after
/// checking the size in the header against `max_pixels`.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<image::DynamicImage, ImageError> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageError::TooLarge {
            width,
            height,
            limit: max_pixels,
        });
    }
    image::load_from_memory(bytes).map_err(|e| ImageError::Decode(e.to_string()))
}

/// Decode `bytes` into `config.input_len()` normalized values, layout
/// `[channels, size, size]`.
pub fn preprocess(
    bytes: &[u8],
    config: &ArchitectureConfig,
    max_pixels: u64,
) -> Result<Vec<f32>, ImageError> {
    let decoded = decode(bytes, max_pixels)?;
    let side = config.input_size as u32;
    let resized = if decoded.width() == side && decoded.height() == side {
        decoded
    } else {
        decoded.resize_exact(side, side, FilterType::Triangle)
    };
    if config.imagenet_normalized() {
        return Ok(mobilenet::imagenet_normalize(&resized.to_rgb8()));
    }
    Ok(match config.channels {
        1 => resized
            .to_luma8()
            .into_raw()
            .into_iter()
            .map(normalize_pixel)
            .collect(),
        _ => {
            // Channel-major [3, h, w] from interleaved RGB.
            let rgb = resized.to_rgb8();
            let plane = (side * side) as usize;
            let mut out = vec![0.0; 3 * plane];
            for (i, px) in rgb.pixels().enumerate() {
                for c in 0..3 {
                    out[c * plane + i] = normalize_pixel(px[c]);
                }
            }
            out
        }
    })
}

/// One 8-bit pixel value as the models without a pretrained backbone see it: scaled to
/// `[-1, 1]`.
pub fn normalize_pixel(value: u8) -> f32 {
    (f32::from(value) / 255.0 - 0.5) / 0.5
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_rgb(width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(width, height, image::Rgb([255, 0, 0]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode");
        out.into_inner()
    }

    #[test]
    fn any_image_becomes_the_model_input() {
        let config = ArchitectureConfig::small_cnn(10, 2);
        let input = preprocess(&png_rgb(50, 30), &config, 1_000_000).expect("preprocess");
        assert_eq!(input.len(), config.input_len());
        assert!(input.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn webp_bmp_and_tiff_decode_like_png() {
        let config = ArchitectureConfig::small_cnn(10, 2);
        let img =
            image::RgbImage::from_fn(20, 12, |x, y| image::Rgb([x as u8 * 9, y as u8 * 9, 60]));
        let from_png = {
            let mut out = Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png)
                .expect("png");
            preprocess(&out.into_inner(), &config, 1_000_000).expect("png input")
        };
        // All three are lossless here, so the input is the PNG's exactly.
        for format in [
            image::ImageFormat::WebP,
            image::ImageFormat::Bmp,
            image::ImageFormat::Tiff,
        ] {
            let mut out = Cursor::new(Vec::new());
            img.write_to(&mut out, format).expect("encode");
            let input = preprocess(&out.into_inner(), &config, 1_000_000).expect("decode");
            assert_eq!(input, from_png, "{format:?}");
        }
    }

    #[test]
    fn bad_bytes_and_bombs_are_refused() {
        let config = ArchitectureConfig::small_cnn(10, 2);
        assert!(matches!(
            preprocess(b"garbage", &config, 100),
            Err(ImageError::Decode(_))
        ));
        let png = png_rgb(50, 30);
        assert!(matches!(
            preprocess(&png[..png.len() / 2], &config, 1_000_000),
            Err(ImageError::Decode(_))
        ));
        assert!(matches!(
            preprocess(&png, &config, 100),
            Err(ImageError::TooLarge { .. })
        ));
    }
}
