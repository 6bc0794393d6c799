//! The concept's photos and the live batches drawn from them, one per optimization step.
//!
//! Each stage consumes its randomness as plain tensors ([`Stage1Batch`], [`Stage2Batch`],
//! [`TtoBatch`]) rather than drawing it inside the step. That keeps a step a pure
//! function of (state, batch): a resumed run that redraws the same batch for the same
//! step continues exactly, and a replay test can feed the Python reference and this
//! implementation the very same draws. Every draw comes from its own seeded stream
//! ([`crate::draws`]), so a batch is a pure function of (run seed, step).
//!
//! Photo choice follows a shuffling data loader: the photos are visited in epochs, each
//! a fresh random permutation (keyed by the epoch), so after every full epoch each photo
//! has been seen equally often. The reference implementation shuffles a dataset of 100
//! repeats of the photos, which balances only over 100 epochs; this is the same
//! sampling without replacement at the granularity of one epoch.

use image::imageops::{self, FilterType};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::Rng;
use tch::{Device, Kind, Tensor};

use crate::draws::{standard_normal, stream_rng, uniform_timesteps, Stream};
use crate::images::augment::{shorter_side_to, Augmentation};
use crate::images::decode::{decode_training_image, ImageLimits};
use crate::model::vae::{AutoencoderKl, VAE_SCALE_FACTOR};
use crate::model::Component;
use crate::{Error, Result};

/// The inputs of one stage-1 step (batch 6 by default).
#[derive(Debug)]
pub struct Stage1Batch {
    /// Augmented training images, [B, 3, H, W] in [−1, 1].
    pub pixels: Tensor,
    /// Standard normal draws for sampling the VAE posterior, [B, 4, H/8, W/8]
    /// (the reference encodes with `latent_dist.sample()` every step).
    pub posterior_noise: Tensor,
    /// The diffusion noise ε, [B, 4, H/8, W/8].
    pub noise: Tensor,
    /// Training timesteps in [0, num_train_timesteps), i64 `[B]`.
    pub timesteps: Tensor,
    /// Which regularization template this step draws from the prompt set.
    pub template_index: usize,
}

/// The inputs of one stage-2 step (batch 4 by default).
#[derive(Debug)]
pub struct Stage2Batch {
    pub pixels: Tensor,
    pub posterior_noise: Tensor,
    pub noise: Tensor,
    pub timesteps: Tensor,
}

/// The inputs of one test-time optimization step: the concept's stored training
/// latents (already scaled by the VAE's scaling factor) are noised afresh each step.
#[derive(Debug)]
pub struct TtoBatch {
    /// Indices into the concept's training latents, `[B]`.
    pub latent_indices: Vec<usize>,
    pub noise: Tensor,
    pub timesteps: Tensor,
}

/// What a step's batch looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    /// Samples per step (6 in stage 1, 4 in stage 2 by default).
    pub batch_size: usize,
    /// Side of the square training images in pixels; a multiple of 8.
    pub resolution: u32,
    /// The VAE's latent channels (4 for SD).
    pub latent_channels: i64,
    /// Timesteps are uniform in [0, num_train_timesteps).
    pub num_train_timesteps: usize,
}

impl BatchShape {
    fn validate(&self) -> Result<()> {
        if self.batch_size == 0
            || self.resolution == 0
            || self.resolution % VAE_SCALE_FACTOR != 0
            || self.latent_channels <= 0
            || self.num_train_timesteps == 0
        {
            return Err(Error::InvalidInput(format!(
                "a batch needs at least one sample, a positive resolution that is a multiple \
                 of {VAE_SCALE_FACTOR}, latent channels and training timesteps; got {self:?}"
            )));
        }
        Ok(())
    }

    fn latent_shape(&self) -> [i64; 4] {
        let side = i64::from(self.resolution / VAE_SCALE_FACTOR);
        [self.batch_size as i64, self.latent_channels, side, side]
    }
}

/// The concept's training photos, decoded and upright.
#[derive(Debug, Clone)]
pub struct TrainingImages {
    photos: Vec<RgbImage>,
}

/// The streams one stage draws from.
struct StageStreams {
    shuffle: Stream,
    augment: Stream,
    timesteps: Stream,
    posterior_noise: Stream,
    noise: Stream,
}

const STAGE1: StageStreams = StageStreams {
    shuffle: Stream::Stage1Shuffle,
    augment: Stream::Stage1Augment,
    timesteps: Stream::Stage1Timesteps,
    posterior_noise: Stream::Stage1PosteriorNoise,
    noise: Stream::Stage1Noise,
};

const STAGE2: StageStreams = StageStreams {
    shuffle: Stream::Stage2Shuffle,
    augment: Stream::Stage2Augment,
    timesteps: Stream::Stage2Timesteps,
    posterior_noise: Stream::Stage2PosteriorNoise,
    noise: Stream::Stage2Noise,
};

/// A stage's draws that do not depend on the stage.
struct DiffusionDraws {
    pixels: Tensor,
    posterior_noise: Tensor,
    noise: Tensor,
    timesteps: Tensor,
}

impl TrainingImages {
    /// At least one photo, none empty.
    pub fn new(photos: Vec<RgbImage>) -> Result<Self> {
        if photos.is_empty() {
            return Err(Error::InvalidInput(
                "training needs at least one image of the concept".into(),
            ));
        }
        if let Some(i) = photos
            .iter()
            .position(|p| p.width() == 0 || p.height() == 0)
        {
            return Err(Error::InvalidInput(format!(
                "training image {} of {} is empty",
                i + 1,
                photos.len()
            )));
        }
        Ok(TrainingImages { photos })
    }

    /// Decodes every photo within `limits`; an error names the photo (1-based).
    pub fn decode<B: AsRef<[u8]>>(encoded: &[B], limits: &ImageLimits) -> Result<Self> {
        let total = encoded.len();
        let photos = encoded
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                decode_training_image(bytes.as_ref(), limits)
                    .map_err(|e| Error::InvalidInput(format!("image {} of {total}: {e}", i + 1)))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(photos)
    }

    pub fn len(&self) -> usize {
        self.photos.len()
    }

    /// Always false: there is at least one photo.
    pub fn is_empty(&self) -> bool {
        self.photos.is_empty()
    }

    pub fn photos(&self) -> &[RgbImage] {
        &self.photos
    }

    /// Shrinks every photo whose shorter side exceeds `max_shorter_side` to that size
    /// (antialiased, aspect kept).
    ///
    /// The reference rotates the full-resolution photo before resizing it to the
    /// training resolution, which for a 12-megapixel photo costs more than a GPU step;
    /// shrinking once to twice the training resolution first bounds that cost. The
    /// result differs from the reference's only by the nearest-neighbour rotation's
    /// aliasing at the working size, which the following ≥2× antialiased downscale
    /// averages away. Photos already small enough are kept as they are.
    pub fn downscaled(self, max_shorter_side: u32) -> Self {
        let max = max_shorter_side.max(1);
        let photos = self
            .photos
            .into_iter()
            .map(|photo| {
                if photo.width().min(photo.height()) <= max {
                    photo
                } else {
                    let (w, h) = shorter_side_to(photo.dimensions(), max);
                    imageops::resize(&photo, w, h, FilterType::Triangle)
                }
            })
            .collect();
        TrainingImages { photos }
    }

    /// Every photo with its shorter side resized to `size` (bilinear) and centre-cropped
    /// to a square: [N, 3, size, size] in [−1, 1] on the CPU.
    pub fn centre_crops(&self, size: u32) -> Tensor {
        let crops: Vec<Tensor> = self
            .photos
            .iter()
            .map(|photo| {
                let (w, h) = shorter_side_to(photo.dimensions(), size);
                let resized = imageops::resize(photo, w, h, FilterType::Triangle);
                let (x, y) = ((w - size) / 2, (h - size) / 2);
                let crop = imageops::crop_imm(&resized, x, y, size, size).to_image();
                Tensor::from_slice(crop.as_raw())
                    .view([i64::from(size), i64::from(size), 3])
                    .permute([2, 0, 1])
                    .to_kind(Kind::Float)
                    / 127.5
                    - 1.0
            })
            .collect();
        Tensor::stack(&crops, 0)
    }

    /// The photos' VAE posterior means × scaling factor at `resolution` (centre crops,
    /// no augmentation), f32 on the CPU: the latents a concept stores for test-time
    /// optimization to noise afresh for each prompt (docs/method.md, "Test-time
    /// optimization").
    pub fn centre_crop_latents(&self, vae: &Component<AutoencoderKl>, resolution: u32) -> Tensor {
        let _guard = tch::no_grad_guard();
        let pixels = self
            .centre_crops(resolution)
            .to_device(vae.vars.device())
            .to_kind(vae.vars.kind());
        let latents = vae.model.encode(&pixels).mean() * vae.model.scaling_factor();
        latents.to_device(Device::Cpu).to_kind(Kind::Float)
    }

    /// The photos sample j of step `step` uses: the (step·B + j)-th draw of a
    /// sequence of epochs, each a permutation of all photos.
    fn choose(&self, seed: u64, step: usize, batch_size: usize, shuffle: Stream) -> Vec<usize> {
        let n = self.photos.len() as u64;
        let first = step as u64 * batch_size as u64;
        let mut cached: Option<(u64, Vec<usize>)> = None;
        (first..first + batch_size as u64)
            .map(|draw| {
                let epoch = draw / n;
                if cached.as_ref().map(|(e, _)| *e) != Some(epoch) {
                    let mut order: Vec<usize> = (0..self.photos.len()).collect();
                    order.shuffle(&mut stream_rng(seed, epoch, shuffle, 0));
                    cached = Some((epoch, order));
                }
                let (_, order) = cached.as_ref().expect("permutation computed above");
                order[(draw % n) as usize]
            })
            .collect()
    }

    /// The inputs of stage-1 step `step`: augmented photos, posterior and diffusion
    /// noise, timesteps and the regularization template's index in [0, n_templates).
    pub fn stage1_batch(
        &self,
        seed: u64,
        step: usize,
        shape: &BatchShape,
        n_templates: usize,
        device: Device,
    ) -> Result<Stage1Batch> {
        if n_templates == 0 {
            return Err(Error::InvalidInput(
                "the regularization prompt set is empty".into(),
            ));
        }
        let draws = self.diffusion_draws(seed, step, shape, &STAGE1, device)?;
        let template_index =
            stream_rng(seed, step as u64, Stream::Stage1Template, 0).random_range(0..n_templates);
        Ok(Stage1Batch {
            pixels: draws.pixels,
            posterior_noise: draws.posterior_noise,
            noise: draws.noise,
            timesteps: draws.timesteps,
            template_index,
        })
    }

    /// The inputs of stage-2 step `step`, from streams of their own: a stage-2 step
    /// shares no draw with the stage-1 step of the same number.
    pub fn stage2_batch(
        &self,
        seed: u64,
        step: usize,
        shape: &BatchShape,
        device: Device,
    ) -> Result<Stage2Batch> {
        let draws = self.diffusion_draws(seed, step, shape, &STAGE2, device)?;
        Ok(Stage2Batch {
            pixels: draws.pixels,
            posterior_noise: draws.posterior_noise,
            noise: draws.noise,
            timesteps: draws.timesteps,
        })
    }

    fn diffusion_draws(
        &self,
        seed: u64,
        step: usize,
        shape: &BatchShape,
        streams: &StageStreams,
        device: Device,
    ) -> Result<DiffusionDraws> {
        shape.validate()?;
        let step_key = step as u64;
        let chosen = self.choose(seed, step, shape.batch_size, streams.shuffle);
        let augmentation = Augmentation::with_resolution(shape.resolution);
        // Each sample's augmentation has its own stream, so the photos are augmented in
        // parallel with the same result as one after another.
        let augmented: Vec<Result<Tensor>> = std::thread::scope(|scope| {
            let workers: Vec<_> = chosen
                .iter()
                .enumerate()
                .map(|(j, &photo)| {
                    let augmentation = &augmentation;
                    let photo = &self.photos[photo];
                    scope.spawn(move || {
                        let mut rng = stream_rng(seed, step_key, streams.augment, j as u64);
                        augmentation.augment(&mut rng, photo)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| {
                    worker.join().unwrap_or_else(|_| {
                        Err(Error::InvalidInput(
                            "augmenting a training image failed".into(),
                        ))
                    })
                })
                .collect()
        });
        let augmented = augmented.into_iter().collect::<Result<Vec<_>>>()?;
        let latent_shape = shape.latent_shape();
        let normal = |stream| {
            standard_normal(&mut stream_rng(seed, step_key, stream, 0), &latent_shape)
                .to_device(device)
        };
        Ok(DiffusionDraws {
            pixels: Tensor::stack(&augmented, 0).to_device(device),
            posterior_noise: normal(streams.posterior_noise),
            noise: normal(streams.noise),
            timesteps: uniform_timesteps(
                &mut stream_rng(seed, step_key, streams.timesteps, 0),
                shape.batch_size,
                shape.num_train_timesteps,
            )
            .to_device(device),
        })
    }
}

/// The inputs of test-time optimization step `step`: which of the concept's
/// `num_latents` stored latents to noise (uniformly, with replacement), the noise
/// [B, C, h, w] for `latent_shape` [C, h, w], and timesteps in [0, num_train_timesteps).
pub fn tto_batch(
    seed: u64,
    step: usize,
    batch_size: usize,
    num_latents: usize,
    latent_shape: [i64; 3],
    num_train_timesteps: usize,
    device: Device,
) -> Result<TtoBatch> {
    if batch_size == 0
        || num_latents == 0
        || num_train_timesteps == 0
        || latent_shape.iter().any(|&d| d <= 0)
    {
        return Err(Error::InvalidInput(format!(
            "test-time optimization needs a batch, stored latents, training timesteps and a \
             latent shape; got batch {batch_size}, {num_latents} latents, \
             {num_train_timesteps} timesteps, shape {latent_shape:?}"
        )));
    }
    let step = step as u64;
    let mut pick = stream_rng(seed, step, Stream::TtoLatents, 0);
    let latent_indices = (0..batch_size)
        .map(|_| pick.random_range(0..num_latents))
        .collect();
    let [c, h, w] = latent_shape;
    let noise = standard_normal(
        &mut stream_rng(seed, step, Stream::TtoNoise, 0),
        &[batch_size as i64, c, h, w],
    );
    Ok(TtoBatch {
        latent_indices,
        noise: noise.to_device(device),
        timesteps: uniform_timesteps(
            &mut stream_rng(seed, step, Stream::TtoTimesteps, 0),
            batch_size,
            num_train_timesteps,
        )
        .to_device(device),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;
    use tch::Kind;

    fn photos(n: usize) -> TrainingImages {
        TrainingImages::new(
            (0..n)
                .map(|i| {
                    RgbImage::from_fn(48 + 8 * i as u32, 40, |x, y| {
                        Rgb([(x * 5) as u8, (y * 3) as u8, (i * 60) as u8])
                    })
                })
                .collect(),
        )
        .unwrap()
    }

    fn shape(batch_size: usize) -> BatchShape {
        BatchShape {
            batch_size,
            resolution: 32,
            latent_channels: 4,
            num_train_timesteps: 1000,
        }
    }

    fn same(a: &Stage1Batch, b: &Stage1Batch) -> bool {
        a.pixels.equal(&b.pixels)
            && a.posterior_noise.equal(&b.posterior_noise)
            && a.noise.equal(&b.noise)
            && a.timesteps.equal(&b.timesteps)
            && a.template_index == b.template_index
    }

    #[test]
    fn a_step_is_a_pure_function_of_seed_and_step() {
        let images = photos(3);
        let draw = |seed, step| {
            images
                .stage1_batch(seed, step, &shape(6), 40, Device::Cpu)
                .unwrap()
        };
        let a = draw(7, 12);
        assert!(same(&a, &draw(7, 12)));
        // A run "resumed" at step 12 after drawing other steps gets the same batch.
        let _ = draw(7, 11);
        assert!(same(&a, &draw(7, 12)));
        let b = draw(7, 13);
        assert!(!a.pixels.equal(&b.pixels));
        assert!(!a.noise.equal(&b.noise));
        assert!(!a.posterior_noise.equal(&b.posterior_noise));
        assert!(!a.timesteps.equal(&b.timesteps));
        assert!(!same(&a, &draw(8, 12)));
        // Posterior and diffusion noise are different streams.
        assert!(!a.noise.equal(&a.posterior_noise));
    }

    #[test]
    fn shapes_kinds_and_ranges() {
        let images = photos(2);
        let batch = images
            .stage1_batch(1, 0, &shape(6), 5, Device::Cpu)
            .unwrap();
        assert_eq!(batch.pixels.size(), [6, 3, 32, 32]);
        assert_eq!(batch.pixels.kind(), Kind::Float);
        assert!(batch.pixels.min().double_value(&[]) >= -1.0);
        assert!(batch.pixels.max().double_value(&[]) <= 1.0);
        assert_eq!(batch.noise.size(), [6, 4, 4, 4]);
        assert_eq!(batch.posterior_noise.size(), [6, 4, 4, 4]);
        assert_eq!(batch.noise.kind(), Kind::Float);
        assert_eq!(batch.timesteps.size(), [6]);
        assert_eq!(batch.timesteps.kind(), Kind::Int64);
        assert!(batch.template_index < 5);

        let stage2 = images.stage2_batch(1, 0, &shape(4), Device::Cpu).unwrap();
        assert_eq!(stage2.pixels.size(), [4, 3, 32, 32]);
        assert_eq!(stage2.noise.size(), [4, 4, 4, 4]);
        assert!(!stage2.noise.equal(&batch.noise.narrow(0, 0, 4)));

        let mut seen = std::collections::HashSet::new();
        let mut sum = 0i64;
        for step in 0..200 {
            let t = images
                .stage2_batch(3, step, &shape(4), Device::Cpu)
                .unwrap()
                .timesteps;
            for v in Vec::<i64>::try_from(&t).unwrap() {
                assert!((0..1000).contains(&v), "{v}");
                seen.insert(v);
                sum += v;
            }
        }
        // 800 uniform draws over [0, 1000): mean ≈ 499.5 (sd ≈ 10), many distinct values.
        let mean = sum as f64 / 800.0;
        assert!((mean - 499.5).abs() < 40.0, "{mean}");
        assert!(seen.len() > 400, "{}", seen.len());
    }

    #[test]
    fn photos_are_visited_in_shuffled_epochs() {
        let images = photos(5);
        let draws: Vec<usize> = (0..10)
            .flat_map(|step| images.choose(9, step, 3, Stream::Stage1Shuffle))
            .collect();
        assert_eq!(draws.len(), 30);
        for epoch in draws.chunks(5) {
            let mut sorted = epoch.to_vec();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        }
        let orders: std::collections::HashSet<&[usize]> = draws.chunks(5).collect();
        assert!(orders.len() > 1, "every epoch in the same order");
        // The same sequence whatever the batch size.
        let by_six: Vec<usize> = (0..5)
            .flat_map(|step| images.choose(9, step, 6, Stream::Stage1Shuffle))
            .collect();
        assert_eq!(by_six, draws);
    }

    #[test]
    fn templates_are_uniform() {
        let images = photos(1);
        let mut counts = [0usize; 4];
        for step in 0..400 {
            let shape = BatchShape {
                batch_size: 1,
                resolution: 8,
                ..shape(1)
            };
            let batch = images
                .stage1_batch(2, step, &shape, 4, Device::Cpu)
                .unwrap();
            counts[batch.template_index] += 1;
        }
        assert!(counts.iter().all(|&c| (60..140).contains(&c)), "{counts:?}");
    }

    #[test]
    fn tto_batches_are_seeded_and_in_range() {
        let a = tto_batch(4, 2, 6, 3, [4, 8, 8], 1000, Device::Cpu).unwrap();
        let b = tto_batch(4, 2, 6, 3, [4, 8, 8], 1000, Device::Cpu).unwrap();
        assert_eq!(a.latent_indices, b.latent_indices);
        assert!(a.latent_indices.iter().all(|&i| i < 3));
        assert!(a.noise.equal(&b.noise) && a.timesteps.equal(&b.timesteps));
        assert_eq!(a.noise.size(), [6, 4, 8, 8]);
        let c = tto_batch(4, 3, 6, 3, [4, 8, 8], 1000, Device::Cpu).unwrap();
        assert!(!a.noise.equal(&c.noise));
        assert!(tto_batch(4, 2, 6, 0, [4, 8, 8], 1000, Device::Cpu).is_err());
    }

    #[test]
    fn bad_requests_are_refused() {
        assert!(TrainingImages::new(vec![]).is_err());
        assert!(TrainingImages::new(vec![RgbImage::new(0, 3)]).is_err());
        let images = photos(1);
        assert!(images
            .stage1_batch(0, 0, &shape(2), 0, Device::Cpu)
            .is_err());
        let odd = BatchShape {
            resolution: 30,
            ..shape(2)
        };
        assert!(images.stage2_batch(0, 0, &odd, Device::Cpu).is_err());
        let message =
            TrainingImages::decode(&[b"not an image".as_slice()], &ImageLimits::default())
                .unwrap_err()
                .to_string();
        assert!(message.contains("image 1 of 1"), "{message}");
    }

    #[test]
    fn downscaling_bounds_the_shorter_side() {
        let images = TrainingImages::new(vec![RgbImage::new(300, 200), RgbImage::new(50, 90)])
            .unwrap()
            .downscaled(100);
        assert_eq!(images.photos()[0].dimensions(), (150, 100));
        assert_eq!(images.photos()[1].dimensions(), (50, 90));
    }
}
