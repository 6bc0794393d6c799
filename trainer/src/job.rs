//! The training job a user submits: a TOML file for `coreg-trainer run` (and, later,
//! the body of a gRPC `CreateTrainingJob`). Unknown keys are refused so a typo never
//! silently trains with a default; every value is range-checked before any model is
//! loaded, and errors name the key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A job file as written by the user.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub concept: ConceptSpec,
    pub images: ImagesSpec,
    pub model: ModelSpec,
    pub store: StoreSpec,
    #[serde(default)]
    pub training: TrainingSpec,
    #[serde(default)]
    pub stage1: Stage1Spec,
    #[serde(default)]
    pub stage2: Stage2Spec,
    #[serde(default)]
    pub checkpoints: CheckpointSpec,
    #[serde(default)]
    pub previews: PreviewSpec,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConceptSpec {
    /// The concept's name in the store (`concepts/<name>/<version>/`).
    pub name: String,
    /// The super-category word S* starts from, e.g. "dog"; one CLIP token.
    pub category: String,
    /// The placeholder written in prompts; `<name>` when absent.
    pub token: Option<String>,
    /// The version to write; a UTC timestamp when absent.
    pub version: Option<String>,
}

/// Where the 3–10 training photos come from: a local folder, or object-store keys
/// relative to the job's store.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesSpec {
    pub folder: Option<PathBuf>,
    #[serde(default)]
    pub keys: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A diffusers-layout Stable Diffusion 2.1 folder.
    pub path: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`; `auto` takes CUDA when present.
    #[serde(default = "auto")]
    pub device: String,
    /// A weights variant such as `fp16`.
    pub variant: Option<String>,
}

fn auto() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSpec {
    /// `file:///abs/dir`, `s3://bucket/prefix`, `gs://…`, `az://…`, `memory:///`.
    pub url: String,
    /// Backend options (credentials, endpoint, region), by object_store's key names.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    #[serde(default)]
    pub seed: u64,
    /// Training image size in pixels (docs/method.md, "Stage 1": 512).
    #[serde(default = "resolution")]
    pub resolution: u32,
    /// `animate`, `inanimate`, `universal`, `single` (the "without the prompt set"
    /// ablation) or `custom` (then `custom_prompts`).
    #[serde(default = "animate")]
    pub prompt_set: String,
    #[serde(default)]
    pub custom_prompts: Vec<String>,
    /// `reference` (the released code's reductions; default) or `paper` (Eqs. 3, 4).
    #[serde(default = "reference")]
    pub loss_variant: String,
}

fn resolution() -> u32 {
    512
}
fn animate() -> String {
    "animate".into()
}
fn reference() -> String {
    "reference".into()
}

impl Default for TrainingSpec {
    fn default() -> Self {
        TrainingSpec {
            seed: 0,
            resolution: resolution(),
            prompt_set: animate(),
            custom_prompts: Vec::new(),
            loss_variant: reference(),
        }
    }
}

/// Stage 1 hyper-parameters; absent values take the paper's defaults.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Stage1Spec {
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub learning_rate: Option<f64>,
    pub weight_decay: Option<f64>,
    pub lambda_embedding: Option<f64>,
    pub lambda_attention: Option<f64>,
    /// Ablations: each switch removes exactly its term.
    #[serde(default = "yes")]
    pub embedding_loss: bool,
    #[serde(default = "yes")]
    pub attention_loss: bool,
    #[serde(default = "yes")]
    pub rescaling: bool,
    pub rescale_record_at: Option<usize>,
    pub rescale_until: Option<usize>,
}

/// Stage 2 hyper-parameters; absent values take the paper's defaults.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Stage2Spec {
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub learning_rate: Option<f64>,
    pub weight_decay: Option<f64>,
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// `fp32`, `bf16` or `fp16` (the last two on CUDA only).
    pub precision: Option<String>,
    /// Store the U-Net delta compressed to this rank per layer (exact when absent).
    pub delta_rank: Option<usize>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Save the stage state every this many steps (0: only on request and at stage
    /// ends), as long as checkpointing stays within `max_cost_fraction`.
    #[serde(default = "fifty")]
    pub every: usize,
    /// Also save it once this many seconds passed since the last save, whatever the
    /// cost: a bound on the work a crash can lose.
    #[serde(default)]
    pub every_seconds: Option<u64>,
    /// The most of a stage's time that step-driven checkpoints may take (a full-size
    /// stage-2 checkpoint is 10.4 GB); see `coreg::cadence`.
    #[serde(default = "five_percent")]
    pub max_cost_fraction: f64,
}

fn fifty() -> usize {
    50
}

fn five_percent() -> f64 {
    coreg::cadence::DEFAULT_MAX_COST_FRACTION
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            every: fifty(),
            every_seconds: None,
            max_cost_fraction: five_percent(),
        }
    }
}

impl CheckpointSpec {
    /// The policy each stage's cadence follows.
    pub fn policy(&self) -> coreg::cadence::CadencePolicy {
        coreg::cadence::CadencePolicy {
            every_steps: self.every,
            every_seconds: self.every_seconds.map(std::time::Duration::from_secs),
            max_cost_fraction: self.max_cost_fraction,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewSpec {
    /// Generate preview images every this many steps of either stage (off when absent).
    pub every: Option<usize>,
    /// Prompts with `{}` for the concept; default "a photo of a {}" and one
    /// regularization template.
    #[serde(default)]
    pub prompts: Vec<String>,
    pub steps: Option<usize>,
}

/// A problem with the job itself: the batch system must not retry it.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidJob {
    pub key: String,
    pub message: String,
}

fn invalid(key: &str, message: impl Into<String>) -> InvalidJob {
    InvalidJob {
        key: key.into(),
        message: message.into(),
    }
}

impl JobSpec {
    pub fn from_toml(text: &str) -> Result<Self, InvalidJob> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| {
            let key = e.span().map(|s| format!("bytes {}..{}", s.start, s.end));
            invalid(
                &key.unwrap_or_else(|| "job".into()),
                e.message().to_string(),
            )
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Range checks that need no model: the model-dependent ones (a single-token
    /// category, prompt lengths) happen when the tokenizer is loaded.
    pub fn validate(&self) -> Result<(), InvalidJob> {
        let fraction = self.checkpoints.max_cost_fraction;
        if !(fraction > 0.0 && fraction <= 1.0) {
            return Err(invalid(
                "checkpoints.max_cost_fraction",
                format!("{fraction} is outside (0, 1]"),
            ));
        }
        if self.checkpoints.every_seconds == Some(0) {
            return Err(invalid(
                "checkpoints.every_seconds",
                "must be at least 1 (leave it out for none)".to_owned(),
            ));
        }
        coreg::artifact::validate_concept_name(&self.concept.name)
            .map_err(|e| invalid("concept.name", e.to_string()))?;
        if let Some(version) = &self.concept.version {
            coreg::artifact::validate_concept_version(version)
                .map_err(|e| invalid("concept.version", e.to_string()))?;
        }
        if self.concept.category.trim().is_empty() {
            return Err(invalid(
                "concept.category",
                "must name the super-category, e.g. \"dog\"",
            ));
        }
        match (&self.images.folder, self.images.keys.is_empty()) {
            (None, true) => return Err(invalid("images", "give `folder` or `keys`")),
            (Some(_), false) => return Err(invalid("images", "give `folder` or `keys`, not both")),
            _ => {}
        }
        let t = &self.training;
        if t.resolution < 64 || t.resolution > 1024 || t.resolution % 8 != 0 {
            return Err(invalid(
                "training.resolution",
                format!("{} is not a multiple of 8 in [64, 1024]", t.resolution),
            ));
        }
        check_count("stage1.steps", self.stage1.steps, 100_000)?;
        check_count("stage1.batch_size", self.stage1.batch_size, 64)?;
        check_rate("stage1.learning_rate", self.stage1.learning_rate)?;
        check_weight("stage1.weight_decay", self.stage1.weight_decay)?;
        check_weight("stage1.lambda_embedding", self.stage1.lambda_embedding)?;
        check_weight("stage1.lambda_attention", self.stage1.lambda_attention)?;
        check_count(
            "stage2.steps",
            self.stage2.steps.filter(|&s| s > 0),
            100_000,
        )?;
        check_count("stage2.batch_size", self.stage2.batch_size, 64)?;
        check_rate("stage2.learning_rate", self.stage2.learning_rate)?;
        check_weight("stage2.weight_decay", self.stage2.weight_decay)?;
        check_count("stage2.delta_rank", self.stage2.delta_rank, 4096)?;
        check_count("previews.every", self.previews.every, 100_000)?;
        check_count("previews.steps", self.previews.steps, 200)?;
        if self.previews.prompts.len() > crate::previews::MAX_PROMPTS {
            return Err(invalid(
                "previews.prompts",
                format!(
                    "{} prompts; a preview renders at most {}",
                    self.previews.prompts.len(),
                    crate::previews::MAX_PROMPTS
                ),
            ));
        }
        for template in &self.previews.prompts {
            coreg::method::prompts::check_template(template)
                .map_err(|e| invalid("previews.prompts", e.to_string()))?;
        }
        Ok(())
    }
}

fn check_count(key: &str, value: Option<usize>, max: usize) -> Result<(), InvalidJob> {
    match value {
        Some(v) if v == 0 || v > max => Err(invalid(key, format!("{v} is outside [1, {max}]"))),
        _ => Ok(()),
    }
}

fn check_rate(key: &str, value: Option<f64>) -> Result<(), InvalidJob> {
    match value {
        Some(v) if !(v.is_finite() && v > 0.0 && v <= 1.0) => {
            Err(invalid(key, format!("{v} is outside (0, 1]")))
        }
        _ => Ok(()),
    }
}

fn check_weight(key: &str, value: Option<f64>) -> Result<(), InvalidJob> {
    match value {
        Some(v) if !(v.is_finite() && (0.0..=1e3).contains(&v)) => {
            Err(invalid(key, format!("{v} is outside [0, 1000]")))
        }
        _ => Ok(()),
    }
}
