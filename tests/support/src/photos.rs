//! Training photos and PNG bytes: the three sample photos the trainer's jobs train on,
//! PNG encoding, and hostile PNGs whose header claims more than they hold.
//!
//! Exists so that every test that trains (the trainer's, the clients' end to end)
//! uses the same photos, and the PNG checksum is written once.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

/// How many sample photos there are.
pub const SAMPLES: u32 = 3;

/// Sample photo `i` (of [`SAMPLES`]): a gradient, each of a different size
/// (80 + 8i × 72), so the trainer's resizing and cropping have work to do.
pub fn sample(i: u32) -> RgbImage {
    RgbImage::from_fn(80 + 8 * i, 72, |x, y| {
        Rgb([(x * 3 + i * 40) as u8, (y * 3) as u8, ((x + y) % 256) as u8])
    })
}

/// Writes the sample photos to `dir` (created if missing) as `0.png`, `1.png`, …, and
/// returns their paths in that order.
pub fn write_samples(dir: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..SAMPLES)
        .map(|i| {
            let path = dir.join(format!("{i}.png"));
            sample(i).save(&path).unwrap();
            path
        })
        .collect()
}

/// The bytes of every file in `dir`, in file name order.
pub fn read_all(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// `image` encoded as PNG.
pub fn png(image: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

/// An 8×8 PNG whose header claims 100000×100000 pixels, its checksum fixed up so the
/// header is otherwise valid and only the size limit, not a checksum error, can
/// refuse it.
pub fn gigantic_png() -> Vec<u8> {
    let mut png = png(&RgbImage::new(8, 8));
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// A well-formed PNG whose header claims `width`×`height` 8-bit RGB pixels, followed
/// by a few bytes of (empty) image data: what a decompression bomb looks like before
/// its data is inflated.
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut out = vec![137, 80, 78, 71, 13, 10, 26, 10];
    let mut header = Vec::new();
    header.extend_from_slice(&width.to_be_bytes());
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &header);
    png_chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// Appends a PNG chunk: length, `kind`, `data` and their checksum.
pub fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// PNG's chunk checksum (CRC-32, polynomial 0xEDB88320).
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
