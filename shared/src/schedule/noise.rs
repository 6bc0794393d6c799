//! The training noise schedule (DDPM): betas, ᾱ (`alphas_cumprod`), the forward
//! process `x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε` and the loss targets.
//!
//! ᾱ is computed the way diffusers computes it, in float32 by libtorch on the CPU, so
//! that every sampler built on it starts from bit-identical values: libtorch's CPU
//! cumulative product accumulates in double precision, which a plain f32 loop would not
//! reproduce.

use tch::{Device, Kind, Tensor};

use super::config::{BetaSchedule, PredictionType, SchedulerConfig};
use crate::Result;

/// Betas and ᾱ over the training timesteps.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        let cpu = (Kind::Float, Device::Cpu);
        let betas = match (&config.trained_betas, config.beta_schedule) {
            (Some(betas), _) => {
                Tensor::from_slice(&betas.iter().map(|&b| b as f32).collect::<Vec<_>>())
            }
            (None, BetaSchedule::Linear) => {
                Tensor::linspace(config.beta_start, config.beta_end, n as i64, cpu)
            }
            (None, BetaSchedule::ScaledLinear) => Tensor::linspace(
                config.beta_start.sqrt(),
                config.beta_end.sqrt(),
                n as i64,
                cpu,
            )
            .pow_tensor_scalar(2),
            (None, BetaSchedule::SquaredCosCapV2) => {
                Tensor::from_slice(&squaredcos_cap_v2_betas(n))
            }
        };
        let alphas_cumprod = (1.0f64 - &betas).cumprod(0, Kind::Float);
        let betas = Vec::<f32>::try_from(&betas)?;
        let alphas_cumprod = Vec::<f32>::try_from(&alphas_cumprod)?;
        let key = if config.trained_betas.is_some() {
            "trained_betas"
        } else {
            "beta_end"
        };
        if betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(config.error(key, "every beta must lie in [0, 1)"));
        }
        if alphas_cumprod.last().is_some_and(|&a| a <= 0.0) {
            return Err(config.error(key, "the schedule reaches ᾱ = 0 (infinite noise)"));
        }
        Ok(NoiseSchedule {
            betas,
            alphas_cumprod,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// ᾱ_t for t in `0..num_train_timesteps`, float32 as diffusers holds them.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// σ_t = √((1−ᾱ_t)/ᾱ_t), the variance-exploding noise level of each training
    /// timestep, computed in float32 as diffusers' Euler and DPM-Solver do.
    pub fn sigmas(&self) -> Vec<f32> {
        let ac = Tensor::from_slice(&self.alphas_cumprod);
        let sigmas = ((1.0f64 - &ac) / &ac).pow_tensor_scalar(0.5);
        Vec::<f32>::try_from(&sigmas).expect("a float32 CPU tensor converts to Vec<f32>")
    }

    /// `x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε` with one timestep per sample.
    ///
    /// `timesteps` is an integer tensor `[B]` with values in `0..num_train_timesteps`;
    /// the coefficients take `x0`'s kind and device (as diffusers' `add_noise` does), so
    /// gradients flow to `x0` and `noise`.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (signal, noise_scale) = self.coefficients(x0, timesteps);
        x0 * signal + noise * noise_scale
    }

    /// The v-prediction target `v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀` (Imagen Video, section 2.4).
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (signal, noise_scale) = self.coefficients(x0, timesteps);
        noise * signal - x0 * noise_scale
    }

    /// What the U-Net's prediction is compared with in the diffusion loss.
    pub fn target(
        &self,
        prediction_type: PredictionType,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Tensor {
        match prediction_type {
            PredictionType::Epsilon => noise.shallow_clone(),
            PredictionType::VPrediction => self.velocity(x0, noise, timesteps),
            PredictionType::Sample => x0.shallow_clone(),
        }
    }

    /// √ᾱ_t and √(1−ᾱ_t) per sample, shaped `[B, 1, …]` to broadcast over `like`.
    fn coefficients(&self, like: &Tensor, timesteps: &Tensor) -> (Tensor, Tensor) {
        let alphas_cumprod = Tensor::from_slice(&self.alphas_cumprod)
            .to_device(like.device())
            .to_kind(like.kind());
        let alpha = alphas_cumprod.index_select(0, &timesteps.to_device(like.device()).reshape(-1));
        let mut shape = vec![-1i64];
        shape.resize(like.dim().max(1), 1);
        let signal = alpha.sqrt().view(shape.as_slice());
        let noise_scale = (1.0f64 - &alpha).sqrt().view(shape.as_slice());
        (signal, noise_scale)
    }
}

/// GLIDE's cosine schedule: βₜ = min(1 − ᾱ(t+1)/ᾱ(t), 0.999) with
/// ᾱ(t) = cos²((t/T + 0.008)/1.008 · π/2), in double precision like diffusers'
/// `betas_for_alpha_bar`, then rounded to float32.
fn squaredcos_cap_v2_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn schedule(text: &str) -> NoiseSchedule {
        let config = SchedulerConfig::from_json_str(text, Path::new("test.json")).unwrap();
        NoiseSchedule::new(&config).unwrap()
    }

    fn sd21() -> NoiseSchedule {
        schedule(r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}"#)
    }

    #[test]
    fn scaled_linear_endpoints() {
        let s = sd21();
        assert_eq!(s.num_train_timesteps(), 1000);
        // β₀ = (√0.00085)², β₉₉₉ = (√0.012)²: the endpoints survive the square root.
        assert!((s.betas()[0] - 0.00085).abs() < 1e-9);
        assert!((s.betas()[999] - 0.012).abs() < 1e-9);
        let ac = s.alphas_cumprod();
        assert!((ac[0] - 0.99915).abs() < 1e-7);
        // ᾱ₉₉₉ of SD's schedule, as diffusers prints it: 0.0046600.
        assert!((ac[999] - 0.004_660_0).abs() < 1e-6, "{}", ac[999]);
        assert!(ac.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn linear_and_cosine_endpoints() {
        let s = schedule("{}");
        assert!((s.betas()[0] - 1e-4).abs() < 1e-10 && (s.betas()[999] - 0.02).abs() < 1e-9);
        // ᾱ₉₉₉ of the DDPM linear schedule is about 4.04e-5.
        assert!((s.alphas_cumprod()[999] - 4.036e-5).abs() < 1e-7);
        let s = schedule(r#"{"beta_schedule": "squaredcos_cap_v2"}"#);
        // The last beta hits the 0.999 cap; the first is tiny.
        assert_eq!(s.betas()[999], 0.999);
        assert!(s.betas()[0] < 1e-4);
    }

    #[test]
    fn sigmas_follow_alphas() {
        let s = sd21();
        let sigmas = s.sigmas();
        let ac = s.alphas_cumprod()[500] as f64;
        assert!((sigmas[500] as f64 - ((1.0 - ac) / ac).sqrt()).abs() < 1e-6);
        // SD's largest noise level, the Euler sampler's init_noise_sigma: ≈ 14.6146.
        assert!((sigmas[999] - 14.6146).abs() < 1e-3, "{}", sigmas[999]);
    }

    #[test]
    fn add_noise_velocity_and_targets() {
        let s = sd21();
        let x0 = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 1, 2]);
        let noise = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.0]).view([2, 1, 2]);
        let t = Tensor::from_slice(&[0i64, 999]);
        let a = [s.alphas_cumprod()[0] as f64, s.alphas_cumprod()[999] as f64];
        let noisy = Vec::<f32>::try_from(&s.add_noise(&x0, &noise, &t).view(-1)).unwrap();
        let v = Vec::<f32>::try_from(&s.velocity(&x0, &noise, &t).view(-1)).unwrap();
        let x0v = [1.0, 2.0, 3.0, 4.0];
        let nv = [0.5, -1.0, 2.0, 0.0];
        for i in 0..4 {
            let a = a[i / 2];
            let want = a.sqrt() * x0v[i] + (1.0 - a).sqrt() * nv[i];
            assert!((noisy[i] as f64 - want).abs() < 1e-6, "noisy[{i}]");
            let want = a.sqrt() * nv[i] - (1.0 - a).sqrt() * x0v[i];
            assert!((v[i] as f64 - want).abs() < 1e-6, "velocity[{i}]");
        }
        let eps = s.target(PredictionType::Epsilon, &x0, &noise, &t);
        assert!(eps.equal(&noise));
        let v_target = s.target(PredictionType::VPrediction, &x0, &noise, &t);
        assert!(v_target.equal(&s.velocity(&x0, &noise, &t)));
        assert!(s.target(PredictionType::Sample, &x0, &noise, &t).equal(&x0));
    }

    #[test]
    fn add_noise_follows_kind_and_carries_gradients() {
        let s = sd21();
        let x0 = Tensor::ones([3, 4], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let noise = Tensor::zeros([3, 4], (Kind::Double, Device::Cpu));
        let t = Tensor::from_slice(&[10i64, 20, 30]);
        let noisy = s.add_noise(&x0, &noise, &t);
        assert_eq!(noisy.kind(), Kind::Double);
        noisy.sum(Kind::Double).backward();
        let grad = Vec::<f64>::try_from(&x0.grad().select(1, 0)).unwrap();
        for (g, t) in grad.iter().zip([10, 20, 30]) {
            assert!((g - (s.alphas_cumprod()[t] as f64).sqrt()).abs() < 1e-7);
        }
        let half = s.add_noise(&x0.to_kind(Kind::Half), &noise.to_kind(Kind::Half), &t);
        assert_eq!(half.kind(), Kind::Half);
    }

    #[test]
    fn trained_betas_are_used_verbatim() {
        let s = schedule(r#"{"num_train_timesteps": 3, "trained_betas": [0.1, 0.2, 0.5]}"#);
        assert_eq!(s.betas(), &[0.1f32, 0.2, 0.5]);
        let ac = s.alphas_cumprod();
        assert!((ac[2] - 0.9 * 0.8 * 0.5).abs() < 1e-7);
    }

    #[test]
    fn a_schedule_that_reaches_zero_is_rejected() {
        let config = SchedulerConfig::from_json_str(
            r#"{"num_train_timesteps": 2, "trained_betas": [0.5, 1.0]}"#,
            Path::new("s.json"),
        )
        .unwrap();
        let err = NoiseSchedule::new(&config).unwrap_err().to_string();
        assert!(err.contains("trained_betas"), "{err}");
    }
}
