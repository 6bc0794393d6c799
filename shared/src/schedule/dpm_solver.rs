//! DPM-Solver++ (2M), the multistep second-order solver of Lu et al. (arXiv 2211.01095)
//! on the data prediction x₀, as diffusers' `DPMSolverMultistepScheduler` computes it
//! with its defaults: `algorithm_type` "dpmsolver++", `solver_order` 2, `solver_type`
//! "midpoint", first order at the first step (no history yet) and at the last one
//! (the final σ is 0, which makes that step return the denoised estimate).

use tch::Tensor;

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::noise::NoiseSchedule;
use super::sampler::{assert_step, check_distinct, check_num_steps, solver_kind, Sampler};
use super::spacing::{arange, linspace, round};
use crate::Result;

pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    /// One σ per step and a final 0, float32 as diffusers holds them.
    sigmas: Vec<f32>,
    prediction_type: PredictionType,
    /// The x₀ estimate of the previous step: the "M" (multistep) history.
    previous_x0: Option<Tensor>,
    next_step: usize,
}

/// The variance-preserving pair (α_t, σ_t) and log-SNR λ_t = ln α_t − ln σ_t for a
/// variance-exploding σ, as diffusers' `_sigma_to_alpha_sigma_t` derives them.
struct NoiseLevel {
    alpha: f64,
    sigma: f64,
    lambda: f64,
}

impl NoiseLevel {
    fn new(ve_sigma: f32) -> Self {
        let ve_sigma = ve_sigma as f64;
        let alpha = 1.0 / (ve_sigma * ve_sigma + 1.0).sqrt();
        let sigma = ve_sigma * alpha;
        // σ = 0 gives λ = +∞, which the update formulas turn into "return x₀".
        NoiseLevel {
            alpha,
            sigma,
            lambda: alpha.ln() - sigma.ln(),
        }
    }
}

impl DpmSolverMultistep {
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self> {
        // diffusers silently maps these legacy names onto the implemented variant.
        let algorithm = config.algorithm_type.as_deref().map(|a| match a {
            "deis" => "dpmsolver++",
            other => other,
        });
        config.require("algorithm_type", &algorithm, "dpmsolver++")?;
        let solver = config.solver_type.as_deref().map(|s| match s {
            "logrho" | "bh1" | "bh2" => "midpoint",
            other => other,
        });
        config.require("solver_type", &solver, "midpoint")?;
        config.require("solver_order", &config.solver_order, 2)?;
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
        config.require("use_lu_lambdas", &config.use_lu_lambdas, false)?;
        config.require("use_flow_sigmas", &config.use_flow_sigmas, false)?;
        if config.variance_type.is_some() {
            return Err(config.error("variance_type", "learned variance is not supported"));
        }
        if config.lambda_min_clipped.is_some_and(f64::is_finite) {
            return Err(config.error("lambda_min_clipped", "only -inf (no clipping) is supported"));
        }
        let schedule = NoiseSchedule::new(config)?;
        let train = config.num_train_timesteps;
        check_num_steps(num_steps, train)?;
        let spacing = config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let timesteps = timesteps(spacing, train, num_steps, config.steps_offset);
        check_distinct(&timesteps, num_steps, spacing)?;
        let training_sigmas = schedule.sigmas();
        // Whole-number timesteps: numpy's interpolation returns the training σ itself.
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| training_sigmas[(t as usize).min(train - 1)])
            .collect();
        sigmas.push(0.0);
        Ok(DpmSolverMultistep {
            timesteps,
            sigmas,
            prediction_type: config.prediction_type,
            previous_x0: None,
            next_step: 0,
        })
    }

    /// σ at each step and the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// diffusers' `convert_model_output` for DPM-Solver++: the model's x₀ estimate.
    fn denoised(&self, output: Tensor, sample: &Tensor, level: &NoiseLevel) -> Tensor {
        match self.prediction_type {
            PredictionType::Epsilon => (sample - output * level.sigma) / level.alpha,
            PredictionType::VPrediction => sample * level.alpha - output * level.sigma,
            PredictionType::Sample => output,
        }
    }
}

/// diffusers' `DPMSolverMultistepScheduler.set_timesteps` with `lambda_min_clipped`
/// −∞ (so the last usable timestep is `train`); n + 1 points with the last dropped.
fn timesteps(spacing: TimestepSpacing, train: usize, n: usize, offset: usize) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut points = linspace(0.0, (train - 1) as f64, n + 1);
            points.remove(0);
            points.into_iter().rev().map(round).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = train / (n + 1);
            (1..=n).rev().map(|i| (i * ratio + offset) as f64).collect()
        }
        TimestepSpacing::Trailing => arange(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|t| round(t) - 1.0)
            .collect(),
    }
}

impl Sampler for DpmSolverMultistep {
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
        assert_eq!(
            step_index, self.next_step,
            "DPM-Solver++ steps must run in order from 0 (reset the sampler between generations)"
        );
        let kind = solver_kind(model_output.kind());
        let sample = sample.to_kind(kind);
        let current = NoiseLevel::new(self.sigmas[step_index]);
        let target = NoiseLevel::new(self.sigmas[step_index + 1]);
        let x0 = self.denoised(model_output.to_kind(kind), &sample, &current);
        let h = target.lambda - current.lambda;
        // α_t(e^{−h} − 1): −α_t at the final step, where h = +∞.
        let x0_coefficient = target.alpha * (-h).exp_m1();
        let last = step_index + 1 == self.timesteps.len();
        let prev = match (&self.previous_x0, last) {
            (Some(previous_x0), false) => {
                let earlier = NoiseLevel::new(self.sigmas[step_index - 1]);
                let r0 = (current.lambda - earlier.lambda) / h;
                // Midpoint: D₀ = x₀, D₁ = (x₀ − x₀_prev)/r₀, weighted −c and −c/2.
                &sample * (target.sigma / current.sigma)
                    - &x0 * x0_coefficient
                    - (&x0 - previous_x0) * (0.5 * x0_coefficient / r0)
            }
            _ => &sample * (target.sigma / current.sigma) - &x0 * x0_coefficient,
        };
        self.previous_x0 = Some(x0);
        self.next_step += 1;
        prev.to_kind(model_output.kind())
    }

    fn reset(&mut self) {
        self.previous_x0 = None;
        self.next_step = 0;
    }
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
    fn linspace_is_the_default() {
        let dpm = DpmSolverMultistep::new(&config(""), 50).unwrap();
        // round(999·k/50) for k = 50…1: 999, 979.02→979, 959.04→959, …, 19.98→20.
        let t = dpm.timesteps();
        assert_eq!(t.len(), 50);
        assert_eq!(&t[..3], &[999.0, 979.0, 959.0]);
        assert_eq!(&t[48..], &[40.0, 20.0]);
    }

    #[test]
    fn leading_and_trailing() {
        let dpm =
            DpmSolverMultistep::new(&config(r#", "timestep_spacing": "leading""#), 50).unwrap();
        // ⌊1000/51⌋ = 19: 50·19+1 = 951, 932, …, 20.
        let want: Vec<f64> = (1..=50).rev().map(|i| (19 * i + 1) as f64).collect();
        assert_eq!(dpm.timesteps(), want.as_slice());
        let dpm =
            DpmSolverMultistep::new(&config(r#", "timestep_spacing": "trailing""#), 50).unwrap();
        let want: Vec<f64> = (1..=50).rev().map(|i| (20 * i - 1) as f64).collect();
        assert_eq!(dpm.timesteps(), want.as_slice());
    }

    #[test]
    fn the_final_step_returns_the_denoised_estimate() {
        for prediction in ["epsilon", "v_prediction"] {
            let extra = format!(r#", "prediction_type": "{prediction}""#);
            let mut dpm = DpmSolverMultistep::new(&config(&extra), 5).unwrap();
            let sample = Tensor::from_slice(&[2.0f32, -1.0]);
            let output = Tensor::from_slice(&[0.3f32, 0.7]);
            for i in 0..4 {
                let _ = dpm.step(&output, i, &sample);
            }
            let sigma = dpm.sigmas()[4] as f64;
            let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
            let got = Vec::<f32>::try_from(&dpm.step(&output, 4, &sample)).unwrap();
            for (i, (x, m)) in [(2.0, 0.3), (-1.0, 0.7)].into_iter().enumerate() {
                let x0 = match prediction {
                    "epsilon" => (x - sigma * alpha * m) / alpha,
                    _ => alpha * x - sigma * alpha * m,
                };
                assert!((got[i] as f64 - x0).abs() < 1e-5, "{prediction} {i}");
            }
        }
    }

    #[test]
    fn the_first_step_is_first_order_and_the_second_uses_history() {
        let mut dpm = DpmSolverMultistep::new(&config(""), 10).unwrap();
        let sample = Tensor::from_slice(&[1.5f32]);
        let eps = Tensor::from_slice(&[0.4f32]);
        let s: Vec<f64> = dpm.sigmas().iter().map(|&s| s as f64).collect();
        let level = |s: f64| {
            let a = 1.0 / (s * s + 1.0).sqrt();
            (a, s * a, -s.ln())
        };
        let (a0, v0, l0) = level(s[0]);
        let (a1, v1, l1) = level(s[1]);
        let (a2, v2, l2) = level(s[2]);
        let x0_first = (1.5 - v0 * 0.4) / a0;
        let h = l1 - l0;
        let want = (v1 / v0) * 1.5 - a1 * ((-h).exp() - 1.0) * x0_first;
        let first = dpm.step(&eps, 0, &sample);
        assert!((first.double_value(&[0]) - want).abs() < 1e-5);
        // Second step from the same sample: D₁ = (x₀ − x₀_prev)/r₀.
        let x0 = (1.5 - v1 * 0.4) / a1;
        let (h, h0) = (l2 - l1, l1 - l0);
        let c = a2 * ((-h).exp() - 1.0);
        let want = (v2 / v1) * 1.5 - c * x0 - 0.5 * c * (x0 - x0_first) * h / h0;
        let second = dpm.step(&eps, 1, &sample);
        assert!((second.double_value(&[0]) - want).abs() < 1e-5);
        // After a reset the sampler starts over, first order again.
        dpm.reset();
        assert!(dpm.step(&eps, 0, &sample).allclose(&first, 0.0, 0.0, false));
        let half = Tensor::ones([1], (Kind::Half, Device::Cpu));
        assert_eq!(dpm.step(&half, 1, &half).kind(), Kind::Half);
    }

    #[test]
    #[should_panic(expected = "in order")]
    fn out_of_order_steps_panic() {
        let mut dpm = DpmSolverMultistep::new(&config(""), 10).unwrap();
        let x = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let _ = dpm.step(&x, 1, &x);
    }

    #[test]
    fn unimplemented_options_are_rejected() {
        for extra in [
            r#", "algorithm_type": "sde-dpmsolver++""#,
            r#", "solver_order": 3"#,
            r#", "use_karras_sigmas": true"#,
            r#", "final_sigmas_type": "sigma_min""#,
            r#", "variance_type": "learned_range""#,
        ] {
            assert!(
                DpmSolverMultistep::new(&config(extra), 10).is_err(),
                "{extra}"
            );
        }
        let defaults = r#", "algorithm_type": "dpmsolver++", "solver_order": 2,
            "solver_type": "midpoint", "lower_order_final": true, "euler_at_final": false"#;
        assert!(DpmSolverMultistep::new(&config(defaults), 10).is_ok());
        assert!(DpmSolverMultistep::new(&config(""), 1000).is_err());
    }
}
