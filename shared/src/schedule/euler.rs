//! Euler's method on the probability-flow ODE in σ (Karras et al. 2022), as diffusers'
//! `EulerDiscreteScheduler` computes it with its defaults: σ linearly interpolated
//! between training timesteps, a final σ of 0, no stochastic churn.

use tch::Tensor;

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::noise::NoiseSchedule;
use super::sampler::{assert_step, check_distinct, check_num_steps, solver_kind, Sampler};
use super::spacing::{arange, interp_on_integer_grid, linspace, round};
use crate::Result;

pub struct EulerDiscrete {
    timesteps: Vec<f64>,
    /// One σ per step and a final 0, float32 as diffusers holds them.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction_type: PredictionType,
}

impl EulerDiscrete {
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        config.require(
            "interpolation_type",
            &config.interpolation_type,
            "linear".into(),
        )?;
        config.require("timestep_type", &config.timestep_type, "discrete".into())?;
        config.require(
            "final_sigmas_type",
            &config.final_sigmas_type,
            "zero".into(),
        )?;
        config.require("use_karras_sigmas", &config.use_karras_sigmas, false)?;
        config.require(
            "use_exponential_sigmas",
            &config.use_exponential_sigmas,
            false,
        )?;
        config.require("use_beta_sigmas", &config.use_beta_sigmas, false)?;
        let schedule = NoiseSchedule::new(config)?;
        let train = config.num_train_timesteps;
        check_num_steps(num_steps, train)?;
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let timesteps = timesteps(spacing, train, num_steps, config.steps_offset);
        check_distinct(&timesteps, num_steps, spacing)?;
        let training_sigmas = schedule.sigmas();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| interp_on_integer_grid(t, &training_sigmas) as f32)
            .collect();
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(0.0f32, f32::max);
        // diffusers: a "leading" schedule starts below the top noise level, so its
        // initial noise is scaled by √(σ²+1) rather than σ (float32 arithmetic).
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        } as f64;
        Ok(EulerDiscrete {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction_type: config.prediction_type,
        })
    }

    /// σ at each step and the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

/// diffusers' `EulerDiscreteScheduler.set_timesteps`: float32 timesteps, fractional
/// for "linspace"; `steps_offset` applies to "leading" only.
fn timesteps(spacing: TimestepSpacing, train: usize, n: usize, offset: usize) -> Vec<f64> {
    let as_f32 = |t: f64| t as f32 as f64;
    match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(as_f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| as_f32((i * ratio) as f64) + offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => arange(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|t| as_f32(round(t)) - 1.0)
            .collect(),
    }
}

impl Sampler for EulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Tensor {
        assert_step(step_index, self.timesteps.len());
        let sigma = self.sigmas[step_index];
        // Same float32 arithmetic as diffusers' `(sigma**2 + 1) ** 0.5`.
        sample / (sigma * sigma + 1.0).sqrt() as f64
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Tensor {
        assert_step(step_index, self.timesteps.len());
        let sigma = self.sigmas[step_index] as f64;
        let sigma_next = self.sigmas[step_index + 1] as f64;
        let kind = solver_kind(model_output.kind());
        let output = model_output.to_kind(kind);
        let sample = sample.to_kind(kind);
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => &sample - &output * sigma,
            PredictionType::VPrediction => {
                let norm = sigma * sigma + 1.0;
                &output * (-sigma / norm.sqrt()) + &sample / norm
            }
            PredictionType::Sample => output,
        };
        let derivative = (&sample - x0) / sigma;
        let prev = sample + derivative * (sigma_next - sigma);
        prev.to_kind(model_output.kind())
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tch::{Device, Kind};

    use super::*;

    fn config(extra: &str) -> SchedulerConfig {
        let text = format!(
            r#"{{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "steps_offset": 1 {extra}}}"#
        );
        SchedulerConfig::from_json_str(&text, Path::new("test.json")).unwrap()
    }

    #[test]
    fn linspace_is_the_default_and_fractional() {
        let euler = EulerDiscrete::new(&config(""), 50).unwrap();
        let t = euler.timesteps();
        assert_eq!(t[0], 999.0);
        // 999·48/49 = 978.612244…, held as float32.
        assert_eq!(t[1], (999.0f64 * 48.0 / 49.0) as f32 as f64);
        assert_eq!(t[49], 0.0);
        // Starting at t = 999: σ and the initial noise are SD's largest, ≈ 14.6146.
        assert!((euler.init_noise_sigma() - 14.6146).abs() < 1e-3);
        assert_eq!(euler.sigmas().len(), 51);
        assert_eq!(euler.sigmas()[50], 0.0);
    }

    #[test]
    fn leading_offsets_and_scales_the_initial_noise() {
        let euler = EulerDiscrete::new(&config(r#", "timestep_spacing": "leading""#), 50).unwrap();
        let want: Vec<f64> = (0..50).rev().map(|i| (20 * i + 1) as f64).collect();
        assert_eq!(euler.timesteps(), want.as_slice());
        let sigma = euler.sigmas()[0] as f64;
        assert!((euler.init_noise_sigma() - (sigma * sigma + 1.0).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn trailing_timesteps() {
        let euler = EulerDiscrete::new(&config(r#", "timestep_spacing": "trailing""#), 50).unwrap();
        let want: Vec<f64> = (1..=50).rev().map(|i| (20 * i - 1) as f64).collect();
        assert_eq!(euler.timesteps(), want.as_slice());
    }

    #[test]
    fn interpolated_sigma_lies_between_its_neighbours() {
        let euler = EulerDiscrete::new(&config(""), 50).unwrap();
        let training = NoiseSchedule::new(&config("")).unwrap().sigmas();
        let (t, s) = (euler.timesteps()[1], euler.sigmas()[1] as f64);
        let (lo, hi) = (
            training[t.floor() as usize] as f64,
            training[t.ceil() as usize] as f64,
        );
        let w = t - t.floor();
        assert!((s - (lo + w * (hi - lo))).abs() < 1e-5);
    }

    #[test]
    fn epsilon_step_moves_along_the_noise() {
        let mut euler = EulerDiscrete::new(&config(""), 10).unwrap();
        let sample = Tensor::from_slice(&[3.0f32]);
        let eps = Tensor::from_slice(&[0.5f32]);
        let (s0, s1) = (euler.sigmas()[0] as f64, euler.sigmas()[1] as f64);
        let got = euler.step(&eps, 0, &sample).double_value(&[0]);
        assert!((got - (3.0 + 0.5 * (s1 - s0))).abs() < 1e-5);
        // The model input is divided by √(σ²+1).
        let scaled = euler.scale_model_input(&sample, 0).double_value(&[0]);
        assert!((scaled - 3.0 / (s0 * s0 + 1.0).sqrt()).abs() < 1e-5);
        // The final step (σ → 0) with v-prediction lands on the clean estimate.
        let v = SchedulerConfig::from_json_str(
            r#"{"prediction_type": "v_prediction"}"#,
            Path::new("v.json"),
        )
        .unwrap();
        let mut euler = EulerDiscrete::new(&v, 10).unwrap();
        let sigma = euler.sigmas()[9] as f64;
        let out = Tensor::from_slice(&[0.2f32]);
        let got = euler.step(&out, 9, &sample).double_value(&[0]);
        let norm = sigma * sigma + 1.0;
        let x0 = 0.2 * (-sigma / norm.sqrt()) + 3.0 / norm;
        assert!((got - x0).abs() < 1e-5);
        let half = Tensor::ones([1], (Kind::Half, Device::Cpu));
        assert_eq!(euler.step(&half, 0, &sample).kind(), Kind::Half);
    }

    #[test]
    fn unimplemented_options_are_rejected() {
        let err = EulerDiscrete::new(&config(r#", "use_karras_sigmas": true"#), 10)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("use_karras_sigmas"), "{err}");
        assert!(EulerDiscrete::new(&config(r#", "use_karras_sigmas": false"#), 10).is_ok());
    }
}
