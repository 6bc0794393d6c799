//! The interface every sampler offers the generation loop, and the checks the samplers
//! share. Choosing one by name is [`super::kind`]'s.
//!
//! The loop diffusers' `StableDiffusionPipeline` runs, which these samplers reproduce:
//!
//! ```text
//! latents = noise · init_noise_sigma()
//! for (i, t) in timesteps().enumerate():
//!     output  = unet(scale_model_input(latents, i), t, text)   (+ guidance)
//!     latents = step(output, i, latents)
//! ```

use tch::{Kind, Tensor};

use super::config::TimestepSpacing;
use crate::{Error, Result};

/// One generation's worth of denoising steps.
///
/// Built fresh (or [`reset`](Sampler::reset)) for every generation: multistep samplers
/// remember earlier model outputs. `step_index` counts from 0 to
/// `timesteps().len() − 1`; calling out of order, or past the end, is a bug and panics.
pub trait Sampler: Send {
    /// The timestep to give the U-Net at each step. Whole numbers for DDIM and
    /// DPM-Solver++; Euler's "linspace" timesteps are fractional.
    fn timesteps(&self) -> &[f64];

    /// The standard deviation of the initial latent noise.
    fn init_noise_sigma(&self) -> f64;

    /// The U-Net input for `step_index` (Euler divides by √(σ²+1); the others pass
    /// the sample through).
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Tensor;

    /// Moves `sample` from step `step_index` to the next noise level given the U-Net's
    /// output there. The arithmetic runs in float32 (float64 for float64 inputs),
    /// as diffusers upcasts; the result has the model output's kind.
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Tensor;

    /// Forgets everything earlier steps left behind, ready for a new generation.
    fn reset(&mut self);

    fn num_steps(&self) -> usize {
        self.timesteps().len()
    }
}

/// Rejects a step count no diffusers sampler can run.
pub(crate) fn check_num_steps(num_steps: usize, num_train_timesteps: usize) -> Result<()> {
    if num_steps == 0 || num_steps > num_train_timesteps {
        return Err(Error::InvalidInput(format!(
            "number of inference steps must be between 1 and {num_train_timesteps}, got {num_steps}"
        )));
    }
    Ok(())
}

/// Rejects timesteps that repeat: diffusers would then start one step late
/// (`index_for_timestep` takes the second match) and the U-Net would see a timestep twice.
pub(crate) fn check_distinct(
    timesteps: &[f64],
    num_steps: usize,
    spacing: TimestepSpacing,
) -> Result<()> {
    if timesteps.windows(2).any(|w| w[1] >= w[0]) {
        return Err(Error::InvalidInput(format!(
            "{num_steps} steps with {} spacing give repeated timesteps; use fewer steps",
            spacing.name()
        )));
    }
    Ok(())
}

/// The kind sampler arithmetic runs in: at least float32, as diffusers upcasts
/// half-precision latents before a step.
pub(crate) fn solver_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Panics unless `step_index` names one of `num_steps` steps: the caller's loop is wrong.
pub(crate) fn assert_step(step_index: usize, num_steps: usize) {
    assert!(
        step_index < num_steps,
        "step index {step_index} is past the last of {num_steps} steps"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_counts_are_checked() {
        assert!(check_num_steps(0, 1000).is_err());
        assert!(check_num_steps(1001, 1000).is_err());
        assert!(check_num_steps(1000, 1000).is_ok());
        assert!(check_distinct(&[3.0, 2.0, 2.0], 3, TimestepSpacing::Linspace).is_err());
        assert!(check_distinct(&[3.0, 2.0, 1.0], 3, TimestepSpacing::Linspace).is_ok());
    }
}
