//! The timestep embedding: diffusers' `Timesteps` sinusoid followed by
//! `TimestepEmbedding` (`linear_1` → SiLU → `linear_2`).

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// diffusers' `get_timestep_embedding` with `max_period` 10000 and scale 1: `[N]` → [N, dim].
///
/// Computed in fp32 whatever the timesteps' kind (int64 from training, fractional
/// floats from Euler samplers), as diffusers does: the caller casts the result to the
/// weights' kind. With `flip_sin_to_cos` the cosines come first (SD's layout).
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor {
    let half = dim / 2;
    let exponent = Tensor::arange(half, (Kind::Float, timesteps.device())) * -(10000f64.ln())
        / (half as f64 - freq_shift);
    let angles = timesteps.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
    let (sin, cos) = (angles.sin(), angles.cos());
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], -1)
    } else {
        Tensor::cat(&[sin, cos], -1)
    };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// `time_embedding`: the MLP that turns the sinusoid into the vector every resnet adds.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: nn::Linear,
    linear_2: nn::Linear,
}

impl TimestepEmbedding {
    pub fn new(p: nn::Path, in_channels: i64, time_embed_dim: i64) -> Self {
        Self {
            linear_1: nn::linear(
                &p / "linear_1",
                in_channels,
                time_embed_dim,
                Default::default(),
            ),
            linear_2: nn::linear(
                &p / "linear_2",
                time_embed_dim,
                time_embed_dim,
                Default::default(),
            ),
        }
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(xs).silu())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn sinusoid_matches_values_computed_by_hand() {
        // dim 6, shift 0: frequencies 10000^(-i/3) for i = 0, 1, 2 = 1, 0.0464159, 0.00215443.
        let t = Tensor::from_slice(&[0i64, 10]);
        let emb = timestep_embedding(&t, 6, true, 0.0);
        assert_eq!(emb.size(), vec![2, 6]);
        let freqs = [1.0f64, 0.046_415_888_336_127_79, 0.002_154_434_690_031_884];
        let mut want = vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0];
        want.extend(freqs.iter().map(|f| (10.0 * f).cos()));
        want.extend(freqs.iter().map(|f| (10.0 * f).sin()));
        for (got, want) in values(&emb).iter().zip(&want) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
        // Without the flip the sines come first.
        let unflipped = values(&timestep_embedding(&t, 6, false, 0.0));
        let flipped = values(&emb);
        assert_eq!(unflipped[6..9], flipped[9..12]);
        assert_eq!(unflipped[9..12], flipped[6..9]);
    }

    #[test]
    fn frequency_shift_and_odd_width() {
        // dim 5 → half 2; shift 1: frequencies 10000^(-i/1) = 1, 1e-4; one zero column padded.
        let t = Tensor::from_slice(&[2.5f64]);
        let emb = values(&timestep_embedding(&t, 5, true, 1.0));
        let want = [
            2.5f64.cos(),
            (2.5e-4f64).cos(),
            2.5f64.sin(),
            (2.5e-4f64).sin(),
            0.0,
        ];
        for (got, want) in emb.iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn fractional_and_integer_timesteps_agree_at_integers() {
        let ints = timestep_embedding(&Tensor::from_slice(&[999i64, 1]), 32, true, 0.0);
        let floats = timestep_embedding(&Tensor::from_slice(&[999.0f32, 1.0]), 32, true, 0.0);
        assert_eq!(ints.kind(), Kind::Float);
        assert_eq!(ints.device(), Device::Cpu);
        assert!((ints - floats).abs().max().double_value(&[]) == 0.0);
    }
}
