//! The reference implementation's training augmentation, seeded.
//!
//! The released CoRe code transforms every training photo, every time it is drawn, with
//! torchvision on a PIL image:
//!
//! ```text
//! RandomApply([RandomRotation(45, expand=True)], p=0.75)
//! Resize(512)                      shorter side to 512, bilinear
//! RandomHorizontalFlip(p=0.25)
//! RandomCrop(512)
//! ToTensor(); Normalize([0.5], [0.5])
//! ```
//!
//! The draws are made in torchvision's order (apply-rotation, angle, flip, crop row,
//! crop column) from the caller's generator, first as an [`AugmentPlan`] that depends
//! only on the photo's dimensions, then applied to the pixels. The geometry is PIL's:
//! the rotation uses `Image.rotate`'s affine matrix (coefficients rounded to 15
//! decimals, expanded canvas of `ceil(max) − floor(min)` of the turned corners, pixel
//! centres sampled with nearest neighbour by PIL's fixed-point row walk, black
//! outside), so rotated pixels equal PIL's; the resize keeps torchvision's long side
//! `int(S · long / short)`.
//!
//! Deviations from torchvision/PIL, none of which changes what the model learns from:
//! - Random numbers come from the caller's ChaCha stream, not torch's generator, so a
//!   seed here gives different crops than the same seed in Python.
//! - The resize is the `image` crate's triangle filter: like PIL's antialiased bilinear
//!   resampling it widens the filter by the downscaling factor, but it filters the
//!   vertical pass first and keeps the intermediate in floating point, where PIL goes
//!   horizontal first through an 8-bit intermediate; pixels may differ by a level or two.

use image::imageops::{self, FilterType};
use image::RgbImage;
use rand::Rng;
use tch::Tensor;

use crate::{Error, Result};

/// The reference implementation's augmentation parameters; the defaults are its values.
#[derive(Debug, Clone, PartialEq)]
pub struct Augmentation {
    /// Output side length S; the reference trains at 512.
    pub resolution: u32,
    /// Probability of rotating at all (`RandomApply` p = 0.75).
    pub rotation_probability: f64,
    /// The rotation angle is uniform in [−max, max] degrees (45).
    pub max_rotation_degrees: f64,
    /// Probability of a horizontal flip (0.25).
    pub flip_probability: f64,
}

impl Default for Augmentation {
    fn default() -> Self {
        Augmentation {
            resolution: 512,
            rotation_probability: 0.75,
            max_rotation_degrees: 45.0,
            flip_probability: 0.25,
        }
    }
}

/// The random choices for one photo, in the order torchvision draws them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentPlan {
    /// Counter-clockwise rotation in degrees, if the rotation was applied.
    pub rotation_degrees: Option<f64>,
    /// Size (width, height) after the rotation's expansion.
    pub rotated_size: (u32, u32),
    /// Size after resizing the shorter side to the resolution.
    pub resized_size: (u32, u32),
    pub flip: bool,
    /// Top-left corner (left, top) of the square crop in the resized image.
    pub crop_origin: (u32, u32),
}

impl Augmentation {
    /// The reference's augmentation at another output resolution (tests use 64).
    pub fn with_resolution(resolution: u32) -> Self {
        Augmentation {
            resolution,
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<()> {
        let probability = |p: f64| (0.0..=1.0).contains(&p);
        if self.resolution == 0
            || !probability(self.rotation_probability)
            || !probability(self.flip_probability)
            || !self.max_rotation_degrees.is_finite()
            || self.max_rotation_degrees < 0.0
        {
            return Err(Error::InvalidInput(format!(
                "augmentation needs a positive resolution, probabilities in [0, 1] and a \
                 finite non-negative angle, got {self:?}"
            )));
        }
        Ok(())
    }

    /// Draws the random choices for a photo of `size` (width, height).
    pub fn plan(&self, rng: &mut impl Rng, size: (u32, u32)) -> Result<AugmentPlan> {
        self.validate()?;
        if size.0 == 0 || size.1 == 0 {
            return Err(Error::InvalidInput(format!(
                "cannot augment an empty {}×{} image",
                size.0, size.1
            )));
        }
        // torchvision's RandomApply skips when p < rand(), i.e. applies when rand ≤ p.
        let rotation_degrees = (rng.random::<f64>() <= self.rotation_probability).then(|| {
            let max = self.max_rotation_degrees;
            -max + 2.0 * max * rng.random::<f64>()
        });
        let rotated_size = match rotation_degrees {
            Some(degrees) => RotationMatrix::new(size, degrees).output_size,
            None => size,
        };
        let resized_size = shorter_side_to(rotated_size, self.resolution);
        let flip = rng.random::<f64>() < self.flip_probability;
        let s = self.resolution;
        // RandomCrop draws the row first, then the column, and nothing when it fits.
        let crop_origin = if resized_size == (s, s) {
            (0, 0)
        } else {
            let top = rng.random_range(0..=resized_size.1 - s);
            let left = rng.random_range(0..=resized_size.0 - s);
            (left, top)
        };
        Ok(AugmentPlan {
            rotation_degrees,
            rotated_size,
            resized_size,
            flip,
            crop_origin,
        })
    }

    /// Applies `plan` (drawn for this image's size) and returns [3, S, S] f32 in [−1, 1].
    pub fn apply(&self, plan: &AugmentPlan, image: &RgbImage) -> Result<Tensor> {
        let square = self.apply_pixels(plan, image)?;
        Ok(to_normalized_tensor(&square))
    }

    /// [`Self::apply`] before `ToTensor`: the augmented S×S photo.
    pub fn apply_pixels(&self, plan: &AugmentPlan, image: &RgbImage) -> Result<RgbImage> {
        let s = self.resolution;
        let rotated = match plan.rotation_degrees {
            Some(degrees) => rotate_expanded(image, degrees),
            None => image.clone(),
        };
        if rotated.dimensions() != plan.rotated_size {
            return Err(Error::InvalidInput(format!(
                "augmentation plan drawn for a {:?} image, applied to a {:?} one",
                plan.rotated_size,
                rotated.dimensions()
            )));
        }
        let (w, h) = plan.resized_size;
        let mut resized = if (w, h) == rotated.dimensions() {
            rotated
        } else {
            imageops::resize(&rotated, w, h, FilterType::Triangle)
        };
        if plan.flip {
            imageops::flip_horizontal_in_place(&mut resized);
        }
        let (left, top) = plan.crop_origin;
        Ok(imageops::crop_imm(&resized, left, top, s, s).to_image())
    }

    /// Draws a plan for `image` and applies it.
    pub fn augment(&self, rng: &mut impl Rng, image: &RgbImage) -> Result<Tensor> {
        let plan = self.plan(rng, image.dimensions())?;
        self.apply(&plan, image)
    }
}

/// torchvision's `Resize(size)` for an int size: the shorter side becomes `size`, the
/// longer `int(size · long / short)` (truncated).
pub fn shorter_side_to((w, h): (u32, u32), size: u32) -> (u32, u32) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (u64::from(size) * u64::from(long)) as f64 / f64::from(short);
    let new_long = new_long as u32;
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// `ToTensor` then `Normalize(0.5, 0.5)`: [3, H, W] f32, `(v/255 − 0.5)/0.5`, computed
/// in f32 in torchvision's order.
pub fn to_normalized_tensor(image: &RgbImage) -> Tensor {
    let (w, h) = image.dimensions();
    let plane = (w * h) as usize;
    let mut values = vec![0f32; 3 * plane];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            values[c * plane + i] = (f32::from(pixel.0[c]) / 255.0 - 0.5) / 0.5;
        }
    }
    Tensor::from_slice(&values).view([3, i64::from(h), i64::from(w)])
}

/// PIL's `Image.rotate(degrees, NEAREST, expand=True, fillcolor=black)`: turned
/// counter-clockwise about the centre on a canvas that holds the whole turned image.
/// Exact multiples of 90° are transpositions, as PIL takes that shortcut.
pub fn rotate_expanded(image: &RgbImage, degrees: f64) -> RgbImage {
    let turn = degrees.rem_euclid(360.0);
    if turn == 0.0 {
        return image.clone();
    }
    if turn == 90.0 {
        return imageops::rotate270(image);
    }
    if turn == 180.0 {
        return imageops::rotate180(image);
    }
    if turn == 270.0 {
        return imageops::rotate90(image);
    }
    RotationMatrix::new(image.dimensions(), degrees).resample(image)
}

/// The inverse map PIL builds for an expanded rotation: output pixel (x, y) reads the
/// input at `(a·x + b·y + c, d·x + e·y + f)`.
#[derive(Debug, Clone, Copy)]
struct RotationMatrix {
    coefficients: [f64; 6],
    output_size: (u32, u32),
}

impl RotationMatrix {
    fn new((w, h): (u32, u32), degrees: f64) -> Self {
        let (w, h) = (f64::from(w), f64::from(h));
        // PIL rounds to 15 decimals so that right angles give exact zeros and ones.
        let round15 = |v: f64| (v * 1e15).round() / 1e15;
        let angle = -(degrees.rem_euclid(360.0)).to_radians();
        let (a, b) = (round15(angle.cos()), round15(angle.sin()));
        let (d, e) = (round15(-angle.sin()), round15(angle.cos()));
        let map = |x: f64, y: f64, c: f64, f: f64| (a * x + b * y + c, d * x + e * y + f);
        let (cx, cy) = (w / 2.0, h / 2.0);
        let (c, f) = map(-cx, -cy, 0.0, 0.0);
        let (c, f) = (c + cx, f + cy);
        let corners = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)].map(|(x, y)| map(x, y, c, f));
        let span = |values: [f64; 4]| {
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            max.ceil() - min.floor()
        };
        let nw = span(corners.map(|p| p.0));
        let nh = span(corners.map(|p| p.1));
        let (c, f) = map(-(nw - w) / 2.0, -(nh - h) / 2.0, c, f);
        RotationMatrix {
            coefficients: [a, b, c, d, e, f],
            output_size: (nw as u32, nh as u32),
        }
    }

    /// Nearest-neighbour sampling at output pixel centres, walking each row by
    /// increments as PIL does: in 16.16 fixed point whenever every mapped corner lies
    /// within ±32768 (any photo these limits admit), else in f64. Rounding the
    /// increments once, rather than each coordinate, is what decides which neighbour
    /// a centre near a pixel boundary takes, so the walk is reproduced exactly.
    fn resample(&self, image: &RgbImage) -> RgbImage {
        let [a, b, c, d, e, f] = self.coefficients;
        let (out_w, out_h) = self.output_size;
        let fits_fixed = [(0, 0), (out_w, out_h), (0, out_h), (out_w, 0)]
            .into_iter()
            .all(|(x, y)| {
                let (x, y) = (f64::from(x), f64::from(y));
                (x * a + y * b + c).abs() < 32768.0 && (x * d + y * e + f).abs() < 32768.0
            });
        let mut out = RgbImage::new(out_w, out_h);
        let mut put = |x: u32, y: u32, sx: i64, sy: i64| {
            if (0..i64::from(image.width())).contains(&sx)
                && (0..i64::from(image.height())).contains(&sy)
            {
                out.put_pixel(x, y, *image.get_pixel(sx as u32, sy as u32));
            }
        };
        if fits_fixed {
            let fixed = |v: f64| (v * 65536.0 + 0.5).floor() as i64;
            let (step_x, step_y) = (fixed(a), fixed(d));
            let (row_x, row_y) = (fixed(b), fixed(e));
            let mut start_x = fixed(c + a * 0.5 + b * 0.5);
            let mut start_y = fixed(f + d * 0.5 + e * 0.5);
            for y in 0..out_h {
                let (mut sx, mut sy) = (start_x, start_y);
                for x in 0..out_w {
                    put(x, y, sx >> 16, sy >> 16);
                    sx += step_x;
                    sy += step_y;
                }
                start_x += row_x;
                start_y += row_y;
            }
        } else {
            // PIL maps anything negative to −1 (outside), then truncates.
            let index = |v: f64| if v < 0.0 { -1 } else { v as i64 };
            let mut start_x = c + b * 0.5 + a * 0.5;
            let mut start_y = f + e * 0.5 + d * 0.5;
            for y in 0..out_h {
                let (mut sx, mut sy) = (start_x, start_y);
                for x in 0..out_w {
                    put(x, y, index(sx), index(sy));
                    sx += a;
                    sy += d;
                }
                start_x += b;
                start_y += e;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// Every pixel distinct, so geometry errors show.
    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([x as u8, y as u8, (x * 7 + y * 13) as u8]))
    }

    fn forced(resolution: u32, rotate: bool, flip: bool) -> Augmentation {
        Augmentation {
            resolution,
            rotation_probability: if rotate { 1.0 } else { 0.0 },
            flip_probability: if flip { 1.0 } else { 0.0 },
            ..Default::default()
        }
    }

    #[test]
    fn resize_keeps_torchvisions_long_side() {
        assert_eq!(shorter_side_to((640, 480), 512), (682, 512));
        assert_eq!(shorter_side_to((480, 640), 512), (512, 682));
        assert_eq!(shorter_side_to((100, 100), 64), (64, 64));
        // 64·1001/1000 = 64.064 truncates to 64.
        assert_eq!(shorter_side_to((1001, 1000), 64), (64, 64));
        assert_eq!(shorter_side_to((3, 1000), 64), (64, 21333));
    }

    #[test]
    fn quarter_turns_are_counter_clockwise() {
        let image = gradient(4, 2);
        let turned = rotate_expanded(&image, 90.0);
        assert_eq!(turned.dimensions(), (2, 4));
        // The input's top-right corner becomes the output's top-left.
        assert_eq!(turned.get_pixel(0, 0), image.get_pixel(3, 0));
        assert_eq!(turned.get_pixel(1, 3), image.get_pixel(0, 1));
        assert_eq!(rotate_expanded(&image, -270.0), turned);
        assert_eq!(rotate_expanded(&image, 360.0), image);
    }

    #[test]
    fn the_affine_path_agrees_with_the_transposition_at_a_right_angle() {
        // PIL's matrix for 90° is exactly [0, −1, c, 1, 0, f]; with w + h even its
        // expansion is exactly h × w and every sample lands on a pixel centre.
        let image = gradient(6, 4);
        let matrix = RotationMatrix::new(image.dimensions(), 90.0);
        assert_eq!(matrix.output_size, (4, 6));
        assert_eq!(matrix.resample(&image), imageops::rotate270(&image));
        let matrix = RotationMatrix::new(image.dimensions(), -90.0);
        assert_eq!(matrix.resample(&image), imageops::rotate90(&image));
    }

    #[test]
    fn a_45_degree_turn_expands_and_fills_black() {
        let image = RgbImage::from_pixel(100, 100, Rgb([200, 100, 50]));
        let turned = rotate_expanded(&image, 45.0);
        // 100·√2 = 141.42 → ceil(70.71 + 50) − floor(50 − 70.71) = 121 − (−21) = 142.
        assert_eq!(turned.dimensions(), (142, 142));
        assert_eq!(turned.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(turned.get_pixel(141, 141).0, [0, 0, 0]);
        assert_eq!(turned.get_pixel(71, 71).0, [200, 100, 50]);
        // The diamond's tips touch the canvas edges' midpoints.
        assert_eq!(turned.get_pixel(71, 1).0, [200, 100, 50]);
        assert_eq!(turned.get_pixel(1, 71).0, [200, 100, 50]);
        let filled = turned.pixels().filter(|p| p.0 != [0, 0, 0]).count() as f64;
        assert!((filled / 10_000.0 - 1.0).abs() < 0.02, "{filled}");
    }

    #[test]
    fn small_turns_move_the_content_counter_clockwise() {
        // A bright blob right of the centre moves up (smaller y) when turned ccw.
        let mut image = RgbImage::new(41, 41);
        for x in 33..36 {
            for y in 19..22 {
                image.put_pixel(x, y, Rgb([255, 255, 255]));
            }
        }
        let turned = rotate_expanded(&image, 30.0);
        let (w, h) = turned.dimensions();
        let bright: Vec<(f64, f64)> = turned
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0 == [255, 255, 255])
            .map(|(x, y, _)| (x as f64 + 0.5, y as f64 + 0.5))
            .collect();
        assert!(bright.len() >= 6, "{}", bright.len());
        let n = bright.len() as f64;
        let dx = bright.iter().map(|p| p.0).sum::<f64>() / n - w as f64 / 2.0;
        let dy = bright.iter().map(|p| p.1).sum::<f64>() / n - h as f64 / 2.0;
        let angle = (-dy).atan2(dx).to_degrees();
        assert!((angle - 30.0).abs() < 3.0, "{angle}°");
        assert!(((dx * dx + dy * dy).sqrt() - 14.0).abs() < 1.0);
    }

    #[test]
    fn plan_geometry_and_ranges() {
        let augmentation = forced(64, true, false);
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        for _ in 0..200 {
            let plan = augmentation.plan(&mut rng, (90, 70)).unwrap();
            let degrees = plan.rotation_degrees.unwrap();
            assert!((-45.0..=45.0).contains(&degrees));
            let (w, h) = plan.resized_size;
            assert_eq!(w.min(h), 64);
            let (left, top) = plan.crop_origin;
            assert!(left + 64 <= w && top + 64 <= h, "{plan:?}");
            assert!(!plan.flip);
        }
        let plan = forced(64, false, false).plan(&mut rng, (90, 70)).unwrap();
        assert_eq!(plan.rotation_degrees, None);
        assert_eq!(plan.rotated_size, (90, 70));
        assert_eq!(plan.resized_size, (82, 64));
        assert_eq!(plan.crop_origin.1, 0);
    }

    #[test]
    fn the_default_probabilities_show_in_the_draws() {
        let augmentation = Augmentation::with_resolution(64);
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let plans: Vec<_> = (0..4000)
            .map(|_| augmentation.plan(&mut rng, (80, 64)).unwrap())
            .collect();
        let rotated = plans
            .iter()
            .filter(|p| p.rotation_degrees.is_some())
            .count();
        let flipped = plans.iter().filter(|p| p.flip).count();
        assert!((rotated as f64 / 4000.0 - 0.75).abs() < 0.03, "{rotated}");
        assert!((flipped as f64 / 4000.0 - 0.25).abs() < 0.03, "{flipped}");
    }

    #[test]
    fn flip_mirrors_the_crop() {
        // A square photo at the output size: no rotation, no resize, no crop freedom.
        let image = gradient(16, 16);
        let mut rng = ChaCha20Rng::seed_from_u64(0);
        let plain = forced(16, false, false).plan(&mut rng, (16, 16)).unwrap();
        let flipped = forced(16, false, true).plan(&mut rng, (16, 16)).unwrap();
        assert!(flipped.flip && !plain.flip);
        let a = forced(16, false, false)
            .apply_pixels(&plain, &image)
            .unwrap();
        let b = forced(16, false, true)
            .apply_pixels(&flipped, &image)
            .unwrap();
        assert_eq!(a, image);
        for (x, y, p) in b.enumerate_pixels() {
            assert_eq!(p, image.get_pixel(15 - x, y));
        }
    }

    #[test]
    fn crop_takes_the_planned_window() {
        let image = gradient(40, 16);
        let augmentation = forced(16, false, false);
        let mut plan = augmentation
            .plan(&mut ChaCha20Rng::seed_from_u64(5), (40, 16))
            .unwrap();
        plan.crop_origin = (9, 0);
        let out = augmentation.apply_pixels(&plan, &image).unwrap();
        assert_eq!(out.dimensions(), (16, 16));
        assert_eq!(out.get_pixel(0, 0), image.get_pixel(9, 0));
        assert_eq!(out.get_pixel(15, 15), image.get_pixel(24, 15));
    }

    #[test]
    fn output_is_normalized_and_seeded() {
        let image = gradient(120, 90);
        let augmentation = Augmentation::with_resolution(64);
        let draw = |seed| {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            augmentation.augment(&mut rng, &image).unwrap()
        };
        let a = draw(1);
        assert_eq!(a.size(), [3, 64, 64]);
        assert_eq!(a.kind(), tch::Kind::Float);
        assert!(a.min().double_value(&[]) >= -1.0 && a.max().double_value(&[]) <= 1.0);
        assert!(a.equal(&draw(1)));
        let differs = (2..6).any(|seed| !a.equal(&draw(seed)));
        assert!(differs);
    }

    #[test]
    fn normalization_matches_torchvision_values() {
        let image = RgbImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                Rgb([0, 255, 128])
            } else {
                Rgb([1, 2, 3])
            }
        });
        let t = to_normalized_tensor(&image);
        assert_eq!(t.size(), [3, 1, 2]);
        let values = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        let v = |b: f32| (b / 255.0 - 0.5) / 0.5;
        assert_eq!(values, vec![-1.0, v(1.0), 1.0, v(2.0), v(128.0), v(3.0)]);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(0);
        let bad = Augmentation {
            flip_probability: 1.5,
            ..Default::default()
        };
        assert!(bad.plan(&mut rng, (10, 10)).is_err());
        assert!(Augmentation::default().plan(&mut rng, (0, 10)).is_err());
    }
}
