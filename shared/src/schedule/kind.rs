//! The choice of sampler by name, as requests and job files spell it.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use super::config::SchedulerConfig;
use super::ddim::Ddim;
use super::dpm_solver::DpmSolverMultistep;
use super::euler::EulerDiscrete;
use super::sampler::Sampler;
use crate::{Error, Result};

/// Which sampler to run. DPM-Solver++ (2M) is what the paper's figures used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum SamplerKind {
    /// diffusers' `DPMSolverMultistepScheduler` defaults: DPM-Solver++, second order,
    /// midpoint, lower order at the final step, final σ = 0.
    #[default]
    DpmSolverPlusPlus,
    /// diffusers' `DDIMScheduler` with η = 0.
    Ddim,
    /// diffusers' `EulerDiscreteScheduler` defaults (no Karras sigmas, no churn).
    EulerDiscrete,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 3] = [
        SamplerKind::DpmSolverPlusPlus,
        SamplerKind::Ddim,
        SamplerKind::EulerDiscrete,
    ];

    /// The canonical name, accepted back by `parse`.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::DpmSolverPlusPlus => "dpm++2m",
            SamplerKind::Ddim => "ddim",
            SamplerKind::EulerDiscrete => "euler",
        }
    }

    /// A sampler for `num_steps` steps on the schedule `config` describes.
    pub fn build(self, config: &SchedulerConfig, num_steps: usize) -> Result<Box<dyn Sampler>> {
        Ok(match self {
            SamplerKind::DpmSolverPlusPlus => Box::new(DpmSolverMultistep::new(config, num_steps)?),
            SamplerKind::Ddim => Box::new(Ddim::new(config, num_steps)?),
            SamplerKind::EulerDiscrete => Box::new(EulerDiscrete::new(config, num_steps)?),
        })
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        let key: String = name
            .chars()
            .filter(|c| !matches!(c, '-' | '_' | ' '))
            .flat_map(char::to_lowercase)
            .collect();
        match key.as_str() {
            "dpm++2m"
            | "dpm++"
            | "dpmsolver++"
            | "dpmsolvermultistep"
            | "dpmsolvermultistepscheduler" => Ok(SamplerKind::DpmSolverPlusPlus),
            "ddim" | "ddimscheduler" => Ok(SamplerKind::Ddim),
            "euler" | "eulerdiscrete" | "eulerdiscretescheduler" => Ok(SamplerKind::EulerDiscrete),
            _ => Err(Error::InvalidInput(format!(
                "unknown sampler {name:?}; expected one of \"dpm++2m\", \"ddim\", \"euler\""
            ))),
        }
    }
}

impl TryFrom<String> for SamplerKind {
    type Error = Error;

    fn try_from(name: String) -> Result<Self> {
        name.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        for (name, kind) in [
            ("dpm++2m", SamplerKind::DpmSolverPlusPlus),
            ("DPM++ 2M", SamplerKind::DpmSolverPlusPlus),
            ("dpm-solver++", SamplerKind::DpmSolverPlusPlus),
            (
                "DPMSolverMultistepScheduler",
                SamplerKind::DpmSolverPlusPlus,
            ),
            ("ddim", SamplerKind::Ddim),
            ("DDIM", SamplerKind::Ddim),
            ("euler", SamplerKind::EulerDiscrete),
            ("euler_discrete", SamplerKind::EulerDiscrete),
        ] {
            assert_eq!(name.parse::<SamplerKind>().unwrap(), kind, "{name}");
        }
        for kind in SamplerKind::ALL {
            assert_eq!(kind.to_string().parse::<SamplerKind>().unwrap(), kind);
        }
        assert_eq!(SamplerKind::default(), SamplerKind::DpmSolverPlusPlus);
        let err = "pndm".parse::<SamplerKind>().unwrap_err().to_string();
        assert!(err.contains("pndm") && err.contains("dpm++2m"), "{err}");
    }

    #[test]
    fn deserializes_from_a_name() {
        let kind: SamplerKind = serde_json::from_str("\"euler\"").unwrap();
        assert_eq!(kind, SamplerKind::EulerDiscrete);
        assert!(serde_json::from_str::<SamplerKind>("\"lms\"").is_err());
    }
}
