//! DDIM with η = 0 (deterministic), as diffusers' `DDIMScheduler` computes it.

use tch::Tensor;

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::noise::NoiseSchedule;
use super::sampler::{assert_step, check_distinct, check_num_steps, solver_kind, Sampler};
use super::spacing::{arange, linspace, round};
use crate::{Error, Result};

pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    /// ᾱ used past t = 0: 1, or ᾱ₀ when `set_alpha_to_one` is false (SD's files).
    final_alpha_cumprod: f32,
    /// diffusers steps from t to t − ⌊T/n⌋ whatever the spacing, so "linspace" and
    /// "trailing" schedules do not land exactly on the next listed timestep.
    step_ratio: i64,
    prediction_type: PredictionType,
    clip_range: Option<f64>,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::new(config)?;
        let train = config.num_train_timesteps;
        check_num_steps(num_steps, train)?;
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let timesteps = timesteps(spacing, train, num_steps, config.steps_offset);
        check_distinct(&timesteps, num_steps, spacing)?;
        if let Some(&t) = timesteps.iter().find(|&&t| t < 0.0 || t >= train as f64) {
            return Err(Error::InvalidInput(format!(
                "DDIM with {num_steps} steps and steps_offset {} reaches timestep {t}, \
                 outside 0..{train}",
                config.steps_offset
            )));
        }
        let alphas_cumprod = schedule.alphas_cumprod().to_vec();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Ddim {
            timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (train / num_steps) as i64,
            prediction_type: config.prediction_type,
            clip_range: config.clip_sample.then_some(config.clip_sample_range),
        })
    }
}

/// diffusers' `DDIMScheduler.set_timesteps`; `steps_offset` applies to "leading" only.
fn timesteps(spacing: TimestepSpacing, train: usize, n: usize, offset: usize) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(round)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n).rev().map(|i| (i * ratio + offset) as f64).collect()
        }
        TimestepSpacing::Trailing => arange(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|t| round(t) - 1.0)
            .collect(),
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Tensor {
        assert_step(step_index, self.timesteps.len());
        sample.shallow_clone()
    }

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Tensor {
        assert_step(step_index, self.timesteps.len());
        let t = self.timesteps[step_index] as i64;
        let prev_t = t - self.step_ratio;
        let alpha = self.alphas_cumprod[t as usize] as f64;
        let alpha_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        } as f64;
        let (sqrt_alpha, sqrt_beta) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let kind = solver_kind(model_output.kind());
        let output = model_output.to_kind(kind);
        let sample = sample.to_kind(kind);
        let (x0, epsilon) = match self.prediction_type {
            PredictionType::Epsilon => ((&sample - &output * sqrt_beta) / sqrt_alpha, output),
            PredictionType::Sample => {
                let epsilon = (&sample - &output * sqrt_alpha) / sqrt_beta;
                (output, epsilon)
            }
            PredictionType::VPrediction => (
                &sample * sqrt_alpha - &output * sqrt_beta,
                &output * sqrt_alpha + &sample * sqrt_beta,
            ),
        };
        // Clipping touches x₀ only: diffusers derives ε before it.
        let x0 = match self.clip_range {
            Some(range) => x0.clamp(-range, range),
            None => x0,
        };
        let prev = x0 * alpha_prev.sqrt() + epsilon * (1.0 - alpha_prev).sqrt();
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
                "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1 {extra}}}"#
        );
        SchedulerConfig::from_json_str(&text, Path::new("test.json")).unwrap()
    }

    #[test]
    fn leading_is_the_default_and_honours_the_offset() {
        let ddim = Ddim::new(&config(""), 50).unwrap();
        // ⌊1000/50⌋ = 20: 49·20+1 = 981, 961, …, 1.
        let want: Vec<f64> = (0..50).rev().map(|i| (20 * i + 1) as f64).collect();
        assert_eq!(ddim.timesteps(), want.as_slice());
    }

    #[test]
    fn trailing_ends_at_the_last_training_timestep() {
        let ddim = Ddim::new(&config(r#", "timestep_spacing": "trailing""#), 50).unwrap();
        // arange(1000, 0, −20) − 1 = 999, 979, …, 19; no offset.
        let want: Vec<f64> = (1..=50).rev().map(|i| (20 * i - 1) as f64).collect();
        assert_eq!(ddim.timesteps(), want.as_slice());
    }

    #[test]
    fn linspace_rounds_an_even_grid() {
        let ddim = Ddim::new(&config(r#", "timestep_spacing": "linspace""#), 50).unwrap();
        let t = ddim.timesteps();
        // round(999·k/49): 999, 978.61→979, 958.22→958, …, 20.39→20, 0.
        assert_eq!(t.len(), 50);
        assert_eq!(&t[..3], &[999.0, 979.0, 958.0]);
        assert_eq!(&t[47..], &[41.0, 20.0, 0.0]);
    }

    #[test]
    fn step_matches_the_formula() {
        let mut ddim = Ddim::new(&config(""), 50).unwrap();
        let sample = Tensor::from_slice(&[1.0f32, -2.0]);
        let eps = Tensor::from_slice(&[0.5f32, 0.25]);
        let ac = NoiseSchedule::new(&config(""))
            .unwrap()
            .alphas_cumprod()
            .to_vec();
        let got = Vec::<f32>::try_from(&ddim.step(&eps, 0, &sample)).unwrap();
        let (a, a_prev) = (ac[981] as f64, ac[961] as f64);
        for (i, (x, e)) in [(1.0, 0.5), (-2.0, 0.25)].into_iter().enumerate() {
            let x0 = (x - (1.0 - a).sqrt() * e) / a.sqrt();
            let want = a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * e;
            assert!((got[i] as f64 - want).abs() < 1e-5 * want.abs(), "{i}");
        }
        // The last step (t = 1) lands past t = 0 on ᾱ₀ (set_alpha_to_one = false):
        // with ε = 0 it rescales x by √(ᾱ₀/ᾱ₁).
        let zero = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let last = Vec::<f32>::try_from(&ddim.step(&zero, 49, &sample)).unwrap();
        let scale = (ac[0] as f64 / ac[1] as f64).sqrt();
        assert!((last[0] as f64 - scale).abs() < 1e-6);
    }

    #[test]
    fn default_clipping_bounds_the_clean_estimate() {
        let text = r#"{"prediction_type": "sample"}"#;
        let config = SchedulerConfig::from_json_str(text, Path::new("t.json")).unwrap();
        let mut ddim = Ddim::new(&config, 10).unwrap();
        let sample = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        // set_alpha_to_one (the default) makes the final step return x₀ itself.
        let out = ddim.step(&Tensor::from_slice(&[5.0f32]), 9, &sample);
        assert_eq!(out.double_value(&[0]), 1.0);
    }

    #[test]
    fn half_precision_in_half_out() {
        let mut ddim = Ddim::new(&config(""), 10).unwrap();
        let sample = Tensor::ones([2], (Kind::Half, Device::Cpu));
        assert_eq!(ddim.step(&sample, 0, &sample).kind(), Kind::Half);
    }

    #[test]
    fn an_offset_past_the_schedule_is_rejected() {
        assert!(Ddim::new(&config(""), 1000).is_err());
        assert!(Ddim::new(&config(""), 0).is_err());
    }
}
