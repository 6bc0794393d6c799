//! Generated images as PNG bytes, quantized as diffusers quantizes them.

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, ImageFormat};
use tch::{Device, Kind, Tensor};

use crate::images::augment::to_normalized_tensor;
use crate::{Error, Result};

/// Encodes one image [3, H, W] with values in [−1, 1] (any kind, any device) as an
/// 8-bit RGB PNG.
///
/// The quantization is diffusers': `postprocess` maps to `(x/2 + 0.5).clamp(0, 1)` and
/// `numpy_to_pil` takes `(v · 255).round()` in float32, rounding halves to even, so a
/// PNG written here has the bytes the same latents give in a diffusers pipeline.
pub fn tensor_to_png(image: &Tensor) -> Result<Vec<u8>> {
    let size = image.size();
    let [3, height, width] = size[..] else {
        return Err(Error::InvalidInput(format!(
            "an RGB image is [3, height, width], got {size:?}"
        )));
    };
    if height == 0 || width == 0 {
        return Err(Error::InvalidInput(format!(
            "cannot encode an empty {width}×{height} image"
        )));
    }
    let levels = (image.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)? / 2.0 + 0.5)
        .clamp(0.0, 1.0)
        * 255.0;
    let bytes = levels
        .round()
        .to_kind(Kind::Uint8)
        .permute([1, 2, 0])
        .contiguous();
    let bytes = Vec::<u8>::try_from(bytes.flatten(0, -1))?;
    let mut png = Vec::new();
    PngEncoder::new(&mut png)
        .write_image(&bytes, width as u32, height as u32, ExtendedColorType::Rgb8)
        .map_err(|e| Error::InvalidInput(format!("encoding a {width}×{height} PNG: {e}")))?;
    Ok(png)
}

/// Decodes PNG bytes to [3, H, W] f32 in [−1, 1] (`v/255·2 − 1`, as training images
/// are normalized); alpha is dropped.
pub fn decode_png(bytes: &[u8]) -> Result<Tensor> {
    let image = image::load_from_memory_with_format(bytes, ImageFormat::Png)
        .map_err(|e| Error::InvalidInput(format!("not a readable PNG: {e}")))?;
    Ok(to_normalized_tensor(&image.into_rgb8()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantizes_like_diffusers_and_round_trips() {
        // −1 → 0, 1 → 255, 0 → 127.5 → 128, −0.5 → 63.75 → 64, out of range clamps.
        let values = [-1.0f32, 1.0, 0.0, -0.5, -2.0, 3.0];
        let image = Tensor::from_slice(&values).view([3, 1, 2]);
        let png = tensor_to_png(&image).unwrap();
        let decoded = image::load_from_memory(&png).unwrap().into_rgb8();
        assert_eq!(decoded.dimensions(), (2, 1));
        assert_eq!(decoded.get_pixel(0, 0).0, [0, 128, 0]);
        assert_eq!(decoded.get_pixel(1, 0).0, [255, 64, 255]);

        let back = decode_png(&png).unwrap();
        assert_eq!(back.size(), [3, 1, 2]);
        let expected = Tensor::from_slice(&[
            -1.0f32,
            1.0,
            128.0 / 127.5 - 1.0,
            64.0 / 127.5 - 1.0,
            -1.0,
            1.0,
        ]);
        let diff = (back.flatten(0, -1) - expected)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn refuses_wrong_shapes_and_non_png_bytes() {
        assert!(tensor_to_png(&Tensor::zeros([4, 2, 2], (Kind::Float, Device::Cpu))).is_err());
        assert!(tensor_to_png(&Tensor::zeros([3, 0, 2], (Kind::Float, Device::Cpu))).is_err());
        assert!(decode_png(b"GIF89a....").is_err());
    }
}
