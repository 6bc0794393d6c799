//! Decoding a user's training photo without trusting it.
//!
//! The bytes arrive from a gRPC request or an object store, so every check that can be
//! made before pixels are allocated is made first: the byte count, the format guessed
//! from the content (a file name says nothing), and the dimensions read from the
//! header. A PNG whose header claims 100000×100000 pixels is refused after reading a
//! few dozen bytes, never after allocating 40 GB. The `image` crate's own decoder
//! limits are set as well, as a second line of defence for allocations this module
//! cannot see (ancillary chunks, intermediate buffers).

use std::fmt;
use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::{Error, Result};

/// A format a training photo may come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrainingImageFormat {
    Png,
    Jpeg,
    WebP,
}

impl TrainingImageFormat {
    pub const ALL: [TrainingImageFormat; 3] = [
        TrainingImageFormat::Png,
        TrainingImageFormat::Jpeg,
        TrainingImageFormat::WebP,
    ];

    fn image_format(self) -> ImageFormat {
        match self {
            TrainingImageFormat::Png => ImageFormat::Png,
            TrainingImageFormat::Jpeg => ImageFormat::Jpeg,
            TrainingImageFormat::WebP => ImageFormat::WebP,
        }
    }

    fn from_image_format(format: ImageFormat) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.image_format() == format)
    }
}

impl fmt::Display for TrainingImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrainingImageFormat::Png => "PNG",
            TrainingImageFormat::Jpeg => "JPEG",
            TrainingImageFormat::WebP => "WebP",
        })
    }
}

/// What a training photo may be. The defaults admit any phone or camera photo (a
/// 50-megapixel sensor gives about 8160×6120 = 50 M pixels, so 40 M admits all but the
/// largest) while bounding the decoded RGB buffer to 120 MB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest encoded size accepted. Default 20 MiB.
    pub max_bytes: usize,
    /// Largest width in pixels, after EXIF orientation. Default 8192.
    pub max_width: u32,
    /// Largest height in pixels, after EXIF orientation. Default 8192.
    pub max_height: u32,
    /// Largest width × height. Default 40 000 000.
    pub max_pixels: u64,
    /// Accepted formats, recognized by their content. Default PNG, JPEG and WebP.
    pub formats: Vec<TrainingImageFormat>,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_bytes: 20 * 1024 * 1024,
            max_width: 8192,
            max_height: 8192,
            max_pixels: 40_000_000,
            formats: TrainingImageFormat::ALL.to_vec(),
        }
    }
}

impl ImageLimits {
    /// The `image` crate's limits matching these: its decoders then refuse, on their
    /// own, anything larger than this module already refused, and cap their buffers at
    /// the largest decoded image allowed (8 bytes a pixel: 16-bit RGBA).
    fn decoder_limits(&self) -> image::Limits {
        let side = self.max_width.max(self.max_height);
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(side);
        limits.max_image_height = Some(side);
        limits.max_alloc = Some(self.max_pixels.saturating_mul(8));
        limits
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidInput(format!("training image: {}", message.into()))
}

/// Decodes a training photo to 8-bit RGB, upright.
///
/// Refuses, with a message naming the limit and the actual value: more than
/// `max_bytes`; content that is not one of `formats` (whatever the file was called);
/// dimensions beyond the limits (read from the header, before any pixel is decoded);
/// and data the decoder cannot read (truncated or corrupt). EXIF orientation is
/// applied, as the reference implementation's `PIL.ImageOps.exif_transpose` does, and
/// alpha is dropped (PIL's `convert("RGB")` discards it the same way).
pub fn decode_training_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage> {
    if bytes.len() > limits.max_bytes {
        return Err(invalid(format!(
            "{} bytes exceeds the limit of {} bytes",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let format = match image::guess_format(bytes) {
        Ok(format) => format,
        Err(_) => {
            return Err(invalid(format!(
                "not a recognized image format (accepted: {})",
                format_list(&limits.formats)
            )))
        }
    };
    let accepted = TrainingImageFormat::from_image_format(format)
        .filter(|f| limits.formats.contains(f))
        .ok_or_else(|| {
            invalid(format!(
                "{} images are not accepted (accepted: {})",
                format_name(format),
                format_list(&limits.formats)
            ))
        })?;

    // Building the decoder reads only the header (PNG: up to the first IDAT chunk;
    // JPEG: up to the first scan; WebP: the chunk headers), so the dimensions are known
    // before anything proportional to them is allocated.
    let mut header_limits = image::Limits::default();
    header_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8));
    let mut reader = ImageReader::with_format(Cursor::new(bytes), accepted.image_format());
    reader.limits(header_limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| invalid(format!("unreadable {accepted} header: {e}")))?;
    let orientation = decoder
        .orientation()
        .map_err(|e| invalid(format!("unreadable {accepted} metadata: {e}")))?;
    let (stored_width, stored_height) = decoder.dimensions();
    let (width, height) = if swaps_axes(orientation) {
        (stored_height, stored_width)
    } else {
        (stored_width, stored_height)
    };
    check_dimensions(width, height, limits)?;

    let mut decoder_limits = limits.decoder_limits();
    decoder_limits
        .reserve(decoder.total_bytes())
        .map_err(|e| invalid(format!("{width}×{height} {accepted} image: {e}")))?;
    decoder
        .set_limits(decoder_limits)
        .map_err(|e| invalid(format!("{width}×{height} {accepted} image: {e}")))?;
    let mut image = DynamicImage::from_decoder(decoder)
        .map_err(|e| invalid(format!("corrupt or truncated {accepted} data: {e}")))?;
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

fn check_dimensions(width: u32, height: u32, limits: &ImageLimits) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(invalid(format!(
            "{width}×{height} pixels: the image is empty"
        )));
    }
    if width > limits.max_width || height > limits.max_height {
        return Err(invalid(format!(
            "{width}×{height} pixels exceeds the limit of {}×{}",
            limits.max_width, limits.max_height
        )));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(invalid(format!(
            "{width}×{height} = {pixels} pixels exceeds the limit of {} pixels",
            limits.max_pixels
        )));
    }
    Ok(())
}

/// Whether an EXIF orientation turns the stored image by a quarter turn.
fn swaps_axes(orientation: image::metadata::Orientation) -> bool {
    use image::metadata::Orientation::*;
    matches!(
        orientation,
        Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH
    )
}

fn format_name(format: ImageFormat) -> String {
    match TrainingImageFormat::from_image_format(format) {
        Some(accepted) => accepted.to_string(),
        None => format!("{format:?}").to_uppercase(),
    }
}

fn format_list(formats: &[TrainingImageFormat]) -> String {
    if formats.is_empty() {
        return "none".into();
    }
    formats
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::png::PngEncoder;
    use image::ImageEncoder;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut bytes = Vec::new();
        PngEncoder::new(&mut bytes)
            .write_image(
                image.as_raw(),
                width,
                height,
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        bytes
    }

    #[test]
    fn decodes_a_png_within_the_limits() {
        let image = decode_training_image(&png(5, 3), &ImageLimits::default()).unwrap();
        assert_eq!(image.dimensions(), (5, 3));
        assert_eq!(image.get_pixel(4, 2).0, [4, 2, 7]);
    }

    #[test]
    fn every_limit_names_itself_and_the_value() {
        let bytes = png(20, 10);
        let cases = [
            (
                ImageLimits {
                    max_bytes: bytes.len() - 1,
                    ..Default::default()
                },
                format!("{} bytes", bytes.len()),
            ),
            (
                ImageLimits {
                    max_width: 19,
                    ..Default::default()
                },
                "20×10 pixels exceeds the limit of 19×8192".to_string(),
            ),
            (
                ImageLimits {
                    max_height: 9,
                    ..Default::default()
                },
                "20×10 pixels exceeds the limit of 8192×9".to_string(),
            ),
            (
                ImageLimits {
                    max_pixels: 199,
                    ..Default::default()
                },
                "20×10 = 200 pixels exceeds the limit of 199 pixels".to_string(),
            ),
            (
                ImageLimits {
                    formats: vec![TrainingImageFormat::Jpeg],
                    ..Default::default()
                },
                "PNG images are not accepted (accepted: JPEG)".to_string(),
            ),
        ];
        for (limits, expected) in cases {
            let message = decode_training_image(&bytes, &limits)
                .unwrap_err()
                .to_string();
            assert!(
                message.contains(&expected),
                "{message:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn decoder_limits_cover_the_largest_allowed_image() {
        let limits = ImageLimits::default().decoder_limits();
        assert_eq!(limits.max_image_width, Some(8192));
        assert_eq!(limits.max_alloc, Some(320_000_000));
    }
}
