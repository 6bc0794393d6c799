//! `scheduler/scheduler_config.json`, read as diffusers' `from_config` reads it.
//!
//! One file serves every sampler: diffusers builds whichever scheduler class the user
//! picks from the keys it recognises, and a key the file lacks takes that class's own
//! default. SD 2.1 base ships a `PNDMScheduler` config and the 768 model a
//! `DDIMScheduler` one with `v_prediction`; both load here. Keys that would change the
//! numerics in a way this implementation does not reproduce are rejected with the
//! key named; keys no implemented sampler reads (`skip_prk_steps`, …) are ignored.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config_json::read_json;
use crate::{Error, Result};

/// What the U-Net predicts, and hence what the training loss compares it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise that was added (SD 2.1 base, 512 px).
    #[default]
    Epsilon,
    /// `v = √ᾱ·ε − √(1−ᾱ)·x₀` (SD 2.1, 768 px).
    VPrediction,
    /// The clean sample itself; diffusers' Euler also calls it `original_sample`.
    #[serde(alias = "original_sample")]
    Sample,
}

/// How the training betas are laid out over `num_train_timesteps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    #[default]
    Linear,
    /// Linear in √β: the latent diffusion schedule SD uses.
    ScaledLinear,
    /// The GLIDE cosine schedule.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredCosCapV2,
}

/// How inference timesteps are spread over the training timesteps (Table 2 of "Common
/// Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

impl TimestepSpacing {
    /// The name diffusers' configuration files use.
    pub fn name(self) -> &'static str {
        match self {
            TimestepSpacing::Linspace => "linspace",
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
        }
    }
}

fn thousand() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}

/// The scheduler configuration with diffusers' defaults for absent keys.
///
/// Sampler-specific options (`algorithm_type`, `use_karras_sigmas`, …) are kept only so
/// that a sampler can refuse a value it does not implement; `None` means absent.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default)]
    pub beta_schedule: BetaSchedule,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default)]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub steps_offset: usize,
    /// Absent means each sampler's own diffusers default: DDIM "leading", Euler and
    /// DPM-Solver++ "linspace".
    #[serde(default)]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// DDIM only; diffusers' DDIM default clips, SD's files turn it off.
    #[serde(default = "yes")]
    pub clip_sample: bool,
    #[serde(default = "one")]
    pub clip_sample_range: f64,
    /// DDIM only: whether the step past t = 0 uses ᾱ = 1 or ᾱ₀.
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
    #[serde(default)]
    pub use_beta_sigmas: Option<bool>,
    #[serde(default)]
    pub use_lu_lambdas: Option<bool>,
    #[serde(default)]
    pub use_flow_sigmas: Option<bool>,
    #[serde(default)]
    pub interpolation_type: Option<String>,
    #[serde(default)]
    pub timestep_type: Option<String>,
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    #[serde(default)]
    pub algorithm_type: Option<String>,
    #[serde(default)]
    pub solver_order: Option<usize>,
    #[serde(default)]
    pub solver_type: Option<String>,
    #[serde(default)]
    pub lower_order_final: Option<bool>,
    #[serde(default)]
    pub euler_at_final: Option<bool>,
    #[serde(default)]
    pub variance_type: Option<String>,
    #[serde(default)]
    pub lambda_min_clipped: Option<f64>,
    /// The file this was read from, for error messages.
    #[serde(skip)]
    source: PathBuf,
}

impl SchedulerConfig {
    /// Reads and validates `scheduler/scheduler_config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let mut config: SchedulerConfig = read_json(path)?;
        config.source = path.to_path_buf();
        config.validate()?;
        Ok(config)
    }

    /// Parses a configuration held in memory; `origin` names it in errors.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let mut config: SchedulerConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            Error::config(origin, key, e.into_inner().to_string())
        })?;
        config.source = origin.to_path_buf();
        config.validate()?;
        Ok(config)
    }

    /// Where this configuration came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// An error about `key` of this configuration.
    pub(crate) fn error(&self, key: &str, message: impl Into<String>) -> Error {
        Error::config(&self.source, key, message)
    }

    /// The options every sampler and the training schedule depend on.
    fn validate(&self) -> Result<()> {
        if self.num_train_timesteps == 0 {
            return Err(self.error("num_train_timesteps", "must be at least 1"));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != self.num_train_timesteps {
                return Err(self.error(
                    "trained_betas",
                    format!(
                        "{} values for num_train_timesteps {}",
                        betas.len(),
                        self.num_train_timesteps
                    ),
                ));
            }
        }
        if self.rescale_betas_zero_snr {
            return Err(self.error(
                "rescale_betas_zero_snr",
                "zero-terminal-SNR rescaling is not supported (SD 2.1 does not use it)",
            ));
        }
        if self.thresholding {
            return Err(self.error(
                "thresholding",
                "dynamic thresholding is not supported (unsuitable for latent diffusion)",
            ));
        }
        if self.clip_sample && self.clip_sample_range <= 0.0 {
            return Err(self.error("clip_sample_range", "must be positive"));
        }
        Ok(())
    }

    /// Rejects a sampler option whose value differs from the one implemented.
    pub(crate) fn require<T: PartialEq + std::fmt::Debug>(
        &self,
        key: &str,
        value: &Option<T>,
        implemented: T,
    ) -> Result<()> {
        match value {
            Some(v) if *v != implemented => Err(self.error(
                key,
                format!("{v:?} is not supported; only {implemented:?} is implemented"),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SchedulerConfig> {
        SchedulerConfig::from_json_str(text, Path::new("scheduler_config.json"))
    }

    #[test]
    fn sd21_base_file_reads_with_diffusers_defaults() {
        let config = parse(
            r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0",
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "clip_sample": false, "num_train_timesteps": 1000,
                "prediction_type": "epsilon", "set_alpha_to_one": false,
                "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null}"#,
        )
        .unwrap();
        assert_eq!(config.class_name.as_deref(), Some("PNDMScheduler"));
        assert_eq!(config.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!(config.prediction_type, PredictionType::Epsilon);
        assert_eq!(config.steps_offset, 1);
        assert_eq!(config.timestep_spacing, None);
        assert!(!config.clip_sample && !config.set_alpha_to_one);
        assert_eq!(config.trained_betas, None);
    }

    #[test]
    fn empty_file_takes_diffusers_defaults() {
        let config = parse("{}").unwrap();
        assert_eq!(config.num_train_timesteps, 1000);
        assert_eq!((config.beta_start, config.beta_end), (0.0001, 0.02));
        assert_eq!(config.beta_schedule, BetaSchedule::Linear);
        assert_eq!(config.prediction_type, PredictionType::Epsilon);
        assert!(config.clip_sample && config.set_alpha_to_one);
        assert_eq!(config.clip_sample_range, 1.0);
        assert_eq!(config.steps_offset, 0);
    }

    #[test]
    fn v_prediction_and_spacings_parse() {
        let config =
            parse(r#"{"prediction_type": "v_prediction", "timestep_spacing": "trailing"}"#)
                .unwrap();
        assert_eq!(config.prediction_type, PredictionType::VPrediction);
        assert_eq!(config.timestep_spacing, Some(TimestepSpacing::Trailing));
        let config = parse(r#"{"prediction_type": "original_sample"}"#).unwrap();
        assert_eq!(config.prediction_type, PredictionType::Sample);
    }

    #[test]
    fn unsupported_values_name_their_key() {
        for (text, key) in [
            (r#"{"beta_schedule": "sigmoid"}"#, "beta_schedule"),
            (
                r#"{"prediction_type": "flow_prediction"}"#,
                "prediction_type",
            ),
            (r#"{"timestep_spacing": "karras"}"#, "timestep_spacing"),
            (
                r#"{"rescale_betas_zero_snr": true}"#,
                "rescale_betas_zero_snr",
            ),
            (r#"{"thresholding": true}"#, "thresholding"),
            (
                r#"{"num_train_timesteps": 2, "trained_betas": [0.1]}"#,
                "trained_betas",
            ),
        ] {
            match parse(text) {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected a config error, got {other:?}"),
            }
        }
    }

    #[test]
    fn read_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler_config.json");
        std::fs::write(&path, r#"{"beta_schedule": "cubic"}"#).unwrap();
        let message = SchedulerConfig::read(&path).unwrap_err().to_string();
        assert!(message.contains("scheduler_config.json"), "{message}");
        assert!(message.contains("beta_schedule"), "{message}");
    }
}
