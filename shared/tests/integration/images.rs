//! Training images: decoding against hostile and awkward input, and the augmentation's
//! geometry against PIL, which the reference implementation's torchvision transforms
//! run on.
//!
//! A global allocator records the largest single allocation each thread requests, so
//! the tests can show that a header claiming a gigantic image is refused before any
//! buffer proportional to its claim is allocated.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::process::Command;

use coreg::images::augment::rotate_expanded;
use coreg::images::{decode_training_image, Augmentation, ImageLimits};
use coreg_test_support::photos::{png as png_bytes, png_claiming};
use coreg_test_support::reference::python;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde_json::json;

struct LargestAllocation;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// Test-only: a counting allocator proves the header check refuses a decompression
// bomb before allocating its pixels. It forwards every call to `System` unchanged.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// Runs `f` and returns its result with the largest allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|largest| largest.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

fn error(bytes: &[u8], limits: &ImageLimits) -> String {
    match decode_training_image(bytes, limits) {
        Ok(image) => panic!(
            "decoded a {:?} image from hostile input",
            image.dimensions()
        ),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "{message:?} does not mention {part:?}"
        );
    }
}

/// Two flat halves (left red, right blue), so orientation survives JPEG compression.
fn halves(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, _| {
        if x < width / 2 {
            Rgb([230, 20, 20])
        } else {
            Rgb([20, 20, 230])
        }
    })
}

fn jpeg_bytes(image: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, 95)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            ExtendedColorType::Rgb8,
        )
        .unwrap();
    bytes
}

/// An APP1 segment holding a big-endian EXIF block with one entry: Orientation.
fn exif_orientation_segment(orientation: u16) -> Vec<u8> {
    let mut tiff = b"MM\0\x2A".to_vec();
    tiff.extend_from_slice(&8u32.to_be_bytes());
    tiff.extend_from_slice(&1u16.to_be_bytes());
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes());
    let mut payload = b"Exif\0\0".to_vec();
    payload.extend_from_slice(&tiff);
    let mut segment = vec![0xFF, 0xE1];
    segment.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    segment.extend_from_slice(&payload);
    segment
}

#[test]
fn bytes_that_are_no_image_are_refused() {
    let message = error(b"%PDF-1.7 definitely not a photo", &ImageLimits::default());
    assert_mentions(
        &message,
        &["not a recognized image format", "PNG, JPEG, WebP"],
    );
    let message = error(b"", &ImageLimits::default());
    assert_mentions(&message, &["not a recognized image format"]);
}

#[test]
fn a_truncated_png_is_refused() {
    let noise = RgbImage::from_fn(64, 64, |x, y| {
        let v = (x * 7919 + y * 104_729) % 251;
        Rgb([v as u8, (v * 3) as u8, (v * 5) as u8])
    });
    let bytes = png_bytes(&noise);
    assert!(decode_training_image(&bytes, &ImageLimits::default()).is_ok());
    let message = error(&bytes[..bytes.len() / 2], &ImageLimits::default());
    assert_mentions(&message, &["PNG"]);
    // Cut inside the header: the signature alone.
    let message = error(&bytes[..12], &ImageLimits::default());
    assert_mentions(&message, &["PNG"]);
}

#[test]
fn a_gigantic_header_is_refused_before_allocating() {
    let bytes = png_claiming(100_000, 100_000);
    let (result, largest) =
        largest_allocation(|| decode_training_image(&bytes, &ImageLimits::default()));
    let message = result.unwrap_err().to_string();
    assert_mentions(
        &message,
        &["100000×100000", "exceeds the limit of 8192×8192"],
    );
    // Decoding would need 30 GB; refusing needs a few row buffers at most.
    assert!(largest < 4 << 20, "largest allocation {largest} bytes");

    // Within the side limits but over the pixel budget.
    let bytes = png_claiming(7000, 7000);
    let (result, largest) =
        largest_allocation(|| decode_training_image(&bytes, &ImageLimits::default()));
    let message = result.unwrap_err().to_string();
    assert_mentions(&message, &["49000000 pixels", "40000000"]);
    assert!(largest < 4 << 20, "largest allocation {largest} bytes");

    // Control: a claim within the limits is believed, its buffer allocated (which the
    // allocator sees), and the missing data then reported.
    let bytes = png_claiming(3000, 3000);
    let (result, largest) =
        largest_allocation(|| decode_training_image(&bytes, &ImageLimits::default()));
    let message = result.unwrap_err().to_string();
    assert_mentions(&message, &["corrupt or truncated PNG"]);
    assert!(
        largest >= 3000 * 3000 * 3,
        "largest allocation {largest} bytes"
    );
}

#[test]
fn too_many_bytes_are_refused_unread() {
    let limits = ImageLimits::default();
    let mut bytes = png_bytes(&halves(8, 8));
    bytes.resize(limits.max_bytes + 1, 0);
    let message = error(&bytes, &limits);
    assert_mentions(&message, &["20971521 bytes", "limit of 20971520 bytes"]);
}

#[test]
fn unsupported_formats_are_named() {
    // A complete 1×1 GIF and the start of a BMP: recognized, and refused by name.
    let gif: &[u8] = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";
    let message = error(gif, &ImageLimits::default());
    assert_mentions(
        &message,
        &["GIF images are not accepted", "PNG, JPEG, WebP"],
    );
    let bmp: &[u8] = b"BM\x3a\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00\x00\x00";
    let message = error(bmp, &ImageLimits::default());
    assert_mentions(&message, &["BMP images are not accepted"]);
}

#[test]
fn jpeg_exif_orientation_is_applied() {
    // Stored 32 wide × 16 high, red left; orientation 6 means "turn 90° clockwise to
    // view", so the upright image is 16 × 32 with red on top.
    let stored = halves(32, 16);
    let plain = jpeg_bytes(&stored);
    let mut oriented = plain[..2].to_vec();
    oriented.extend_from_slice(&exif_orientation_segment(6));
    oriented.extend_from_slice(&plain[2..]);

    let upright = decode_training_image(&plain, &ImageLimits::default()).unwrap();
    assert_eq!(upright.dimensions(), (32, 16));

    let image = decode_training_image(&oriented, &ImageLimits::default()).unwrap();
    assert_eq!(image.dimensions(), (16, 32));
    let red = |p: &Rgb<u8>| p.0[0] > 180 && p.0[2] < 80;
    let blue = |p: &Rgb<u8>| p.0[2] > 180 && p.0[0] < 80;
    assert!(red(image.get_pixel(8, 4)), "{:?}", image.get_pixel(8, 4));
    assert!(blue(image.get_pixel(8, 27)), "{:?}", image.get_pixel(8, 27));

    // The limits apply to the upright size.
    let narrow = ImageLimits {
        max_width: 20,
        ..Default::default()
    };
    assert!(decode_training_image(&oriented, &narrow).is_ok());
    let message = error(&plain, &narrow);
    assert_mentions(&message, &["32×16"]);
}

#[test]
fn webp_and_alpha_pngs_decode_to_rgb() {
    let source = halves(10, 6);
    let mut webp = Vec::new();
    WebPEncoder::new_lossless(&mut webp)
        .write_image(source.as_raw(), 10, 6, ExtendedColorType::Rgb8)
        .unwrap();
    let decoded = decode_training_image(&webp, &ImageLimits::default()).unwrap();
    assert_eq!(decoded, source);

    let rgba: Vec<u8> = (0..4 * 3).flat_map(|i| [i as u8, 2, 3, 0]).collect();
    let mut png = Vec::new();
    PngEncoder::new(&mut png)
        .write_image(&rgba, 4, 3, ExtendedColorType::Rgba8)
        .unwrap();
    let decoded = decode_training_image(&png, &ImageLimits::default()).unwrap();
    assert_eq!(decoded.dimensions(), (4, 3));
    assert_eq!(decoded.get_pixel(1, 0).0, [1, 2, 3]);
}

/// Compares this crate's rotation and full augmentation with PIL's on the same photo
/// and the same random choices. Rotations must be pixel-identical; after the resize
/// (the `image` crate's triangle filter against PIL's bilinear) levels may differ by a
/// rounding step or two.
#[test]
fn geometry_matches_pil() {
    let dir = tempfile::tempdir().unwrap();
    let photo = RgbImage::from_fn(301, 187, |x, y| {
        Rgb([
            (x * 3 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x * y + 7 * x) % 256) as u8,
        ])
    });
    let source = dir.path().join("photo.png");
    photo.save(&source).unwrap();

    let mut cases = Vec::new();
    for (i, degrees) in [-44.7, -12.345, 0.5, 22.5, 33.3, 45.0]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("rotated{i}.png"));
        rotate_expanded(&photo, degrees).save(&path).unwrap();
        cases.push(json!({"kind": "rotate", "degrees": degrees, "path": path}));
    }
    let augmentation = Augmentation::with_resolution(64);
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    for i in 0..12 {
        let plan = augmentation.plan(&mut rng, photo.dimensions()).unwrap();
        let path = dir.path().join(format!("augmented{i}.png"));
        augmentation
            .apply_pixels(&plan, &photo)
            .unwrap()
            .save(&path)
            .unwrap();
        cases.push(json!({
            "kind": "augment",
            "degrees": plan.rotation_degrees,
            "resized": [plan.resized_size.0, plan.resized_size.1],
            "flip": plan.flip,
            "crop": [plan.crop_origin.0, plan.crop_origin.1],
            "size": 64,
            "path": path,
        }));
    }
    let cases_path = dir.path().join("cases.json");
    std::fs::write(&cases_path, serde_json::to_string(&cases).unwrap()).unwrap();

    const PIL_CHECK: &str = r#"
import json, sys
import numpy as np
from PIL import Image
source, cases = sys.argv[1], json.load(open(sys.argv[2]))
photo = Image.open(source).convert("RGB")
failures = []
for case in cases:
    mine = np.asarray(Image.open(case["path"]).convert("RGB")).astype(int)
    image = photo
    if case["degrees"] is not None:
        image = image.rotate(case["degrees"], resample=Image.NEAREST, expand=True, fillcolor=(0, 0, 0))
    if case["kind"] == "augment":
        image = image.resize(tuple(case["resized"]), Image.BILINEAR)
        if case["flip"]:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        left, top = case["crop"]
        image = image.crop((left, top, left + case["size"], top + case["size"]))
    ref = np.asarray(image).astype(int)
    if mine.shape != ref.shape:
        failures.append(f"{case}: shape {mine.shape} vs PIL {ref.shape}")
        continue
    diff = np.abs(mine - ref)
    limit = 0 if case["kind"] == "rotate" else 2
    if diff.max() > limit or diff.mean() > 0.25:
        failures.append(f"{case}: max diff {diff.max()}, mean {diff.mean():.3f}")
print("\n".join(failures))
sys.exit(1 if failures else 0)
"#;
    let out = Command::new(python())
        .arg("-c")
        .arg(PIL_CHECK)
        .arg(&source)
        .arg(&cases_path)
        .output()
        .expect("running PIL");
    assert!(
        out.status.success(),
        "differs from PIL:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
