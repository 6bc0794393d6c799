//! Seeded random draws, reproducible across runs, resumes and devices.
//!
//! Every random draw of a training step is a pure function of (run seed, step): each
//! kind of draw (which photos, each photo's augmentation, the template, the timesteps,
//! the posterior noise, the diffusion noise) has its own ChaCha20 stream keyed by
//! `(seed, step, stream, index)`. So a run resumed at step k draws exactly what the
//! uninterrupted run drew, whatever happened before k, and no draw shifts when another
//! changes (a different batch size leaves the template choice alone). Gaussian noise is
//! drawn on the CPU from the same streams and only then moved to the device, so CPU and
//! GPU runs consume identical noise. A generated image's initial noise is keyed by its
//! seed alone.

use std::f64::consts::TAU;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tch::Tensor;

/// Which draw a ChaCha stream serves. The values are part of the reproducibility
/// contract: changing one changes every run's batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Stream {
    Stage1Shuffle = 1,
    Stage1Augment = 2,
    Stage1Template = 3,
    Stage1Timesteps = 4,
    Stage1PosteriorNoise = 5,
    Stage1Noise = 6,
    Stage2Shuffle = 11,
    Stage2Augment = 12,
    Stage2Timesteps = 14,
    Stage2PosteriorNoise = 15,
    Stage2Noise = 16,
    TtoLatents = 21,
    TtoTimesteps = 24,
    TtoNoise = 26,
    /// Initial latents of a generation, keyed by the image's seed alone.
    GenerationNoise = 31,
}

/// The generator for one draw: ChaCha20 keyed by all four numbers, so distinct keys
/// give independent streams with no hashing in between.
pub fn stream_rng(seed: u64, step: u64, stream: Stream, index: u64) -> ChaCha20Rng {
    let mut key = [0u8; 32];
    for (chunk, word) in key
        .chunks_exact_mut(8)
        .zip([seed, step, stream as u64, index])
    {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    ChaCha20Rng::from_seed(key)
}

/// Standard normal f32 draws of `shape` on the CPU, by the Box–Muller transform in
/// f64 (each pair of uniforms gives two values, consumed in order).
pub fn standard_normal(rng: &mut impl Rng, shape: &[i64]) -> Tensor {
    let count: i64 = shape.iter().product();
    let count = usize::try_from(count).unwrap_or(0);
    let mut values = Vec::with_capacity(count + 1);
    while values.len() < count {
        // 1 − u lies in (0, 1], so the logarithm is finite.
        let radius = (-2.0 * (1.0 - rng.random::<f64>()).ln()).sqrt();
        let angle = TAU * rng.random::<f64>();
        values.push((radius * angle.cos()) as f32);
        values.push((radius * angle.sin()) as f32);
    }
    values.truncate(count);
    Tensor::from_slice(&values).view(shape)
}

/// The initial latent noise of one generated image [C, h, w], as a function of its
/// seed alone: the same seed gives the same image on any device and in any batch.
pub fn generation_noise(seed: u64, latent_shape: [i64; 3]) -> Tensor {
    standard_normal(
        &mut stream_rng(seed, 0, Stream::GenerationNoise, 0),
        &latent_shape,
    )
}

/// `count` training timesteps, uniform in [0, num_train_timesteps).
pub(crate) fn uniform_timesteps(
    rng: &mut impl Rng,
    count: usize,
    num_train_timesteps: usize,
) -> Tensor {
    let values: Vec<i64> = (0..count)
        .map(|_| rng.random_range(0..num_train_timesteps) as i64)
        .collect();
    Tensor::from_slice(&values)
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;

    #[test]
    fn box_muller_draws_are_standard_normal() {
        let mut rng = stream_rng(0, 0, Stream::Stage1Noise, 0);
        let x = standard_normal(&mut rng, &[3, 10001]);
        assert_eq!(x.size(), [3, 10001]);
        let mean = x.mean(Kind::Double).double_value(&[]);
        let var = x.var(true).double_value(&[]);
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((var - 1.0).abs() < 0.03, "{var}");
        let tail = x.abs().gt(2.0).to_kind(Kind::Double).mean(Kind::Double);
        assert!((tail.double_value(&[]) - 0.0455).abs() < 0.006);
        let again = standard_normal(&mut stream_rng(0, 0, Stream::Stage1Noise, 0), &[3, 10001]);
        assert!(x.equal(&again));
    }

    #[test]
    fn generation_noise_depends_on_the_seed_only() {
        let a = generation_noise(2147483647, [4, 8, 8]);
        assert_eq!(a.size(), [4, 8, 8]);
        assert!(a.equal(&generation_noise(2147483647, [4, 8, 8])));
        assert!(!a.equal(&generation_noise(2147483646, [4, 8, 8])));
    }
}
