//! The noise schedule: how training adds noise, and how the samplers remove it.
//!
//! Everything here reproduces diffusers 0.42's schedulers from the model folder's
//! `scheduler/scheduler_config.json`, down to their float32 schedules and numpy
//! timestep arithmetic, so a concept trained and sampled here behaves as it would in
//! diffusers:
//!
//! - [`config`]: the configuration file, with diffusers' defaults and the prediction
//!   type (ε or v) the model was trained with.
//! - [`noise`]: the training forward process (`add_noise`, velocity, loss target).
//! - [`Sampler`] and [`SamplerKind`]: DPM-Solver++ (2M) (the paper's sampler), DDIM and
//!   Euler, each honouring `timestep_spacing`, `steps_offset` and `prediction_type`.

pub mod config;
pub mod ddim;
pub mod dpm_solver;
pub mod euler;
pub mod kind;
pub mod noise;
pub mod sampler;
mod spacing;

pub use config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
pub use ddim::Ddim;
pub use dpm_solver::DpmSolverMultistep;
pub use euler::EulerDiscrete;
pub use kind::SamplerKind;
pub use noise::NoiseSchedule;
pub use sampler::Sampler;
