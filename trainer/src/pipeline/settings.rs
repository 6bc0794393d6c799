//! The job file's values as the method's configurations (absent values take the
//! paper's defaults, docs/method.md), and the hyper-parameters a concept's manifest
//! records, serialized from those same configurations so that none can be left out.

use coreg::method::losses::LossVariant;
use coreg::method::prompts::{PromptSet, PromptSetKind};
use coreg::method::regularization::RegularizationTerms;
use coreg::method::rescale::RescaleWindow;
use coreg::method::stage1::Stage1Config;
use coreg::method::stage2::{MixedPrecision, Stage2Config};
use coreg::optim::AdamWConfig;
use serde::Serialize;
use tch::Device;

use super::failure::Phase;
use super::Job;
use crate::exit::JobFailure;

/// What a concept's manifest records about how it was trained.
#[derive(Serialize)]
struct HyperParameters<'a> {
    /// The job as submitted, store credentials left out.
    job: serde_json::Value,
    stage1: &'a Stage1Config,
    stage2: &'a Stage2Config,
}

impl Job<'_> {
    /// The placeholder prompts write for the concept: `concept.token`, else `<name>`.
    pub(super) fn placeholder(&self) -> String {
        let concept = &self.spec.concept;
        concept
            .token
            .clone()
            .unwrap_or_else(|| format!("<{}>", concept.name))
    }

    pub(super) fn stage1_config(&self) -> Result<Stage1Config, JobFailure> {
        let t = &self.spec.training;
        let s = &self.spec.stage1;
        let invalid =
            |key: &str, e: &dyn std::fmt::Display| JobFailure::InvalidJob(format!("{key}: {e}"));
        let kind: PromptSetKind = t
            .prompt_set
            .parse()
            .map_err(|e: coreg::Error| invalid("training.prompt_set", &e))?;
        let prompt_set = match kind {
            PromptSetKind::Custom => PromptSet::custom(t.custom_prompts.clone())
                .map_err(|e| invalid("training.custom_prompts", &e))?,
            _ if !t.custom_prompts.is_empty() => {
                return Err(invalid(
                    "training.custom_prompts",
                    &"only with prompt_set = \"custom\"",
                ))
            }
            builtin => PromptSet::builtin(builtin).map_err(Phase::Inputs.of())?,
        };
        let variant: LossVariant = t
            .loss_variant
            .parse()
            .map_err(|e: coreg::Error| invalid("training.loss_variant", &e))?;
        let mut config = Stage1Config::new(prompt_set);
        config.variant = variant;
        config.resolution = t.resolution as usize;
        config.steps = s.steps.unwrap_or(config.steps);
        config.batch_size = s.batch_size.unwrap_or(config.batch_size);
        config.optimizer = AdamWConfig {
            lr: s.learning_rate.unwrap_or(config.optimizer.lr),
            weight_decay: s.weight_decay.unwrap_or(config.optimizer.weight_decay),
            ..config.optimizer
        };
        config.weights.embedding = s.lambda_embedding.unwrap_or(config.weights.embedding);
        config.weights.attention = s.lambda_attention.unwrap_or(config.weights.attention);
        config.terms = RegularizationTerms {
            embedding: s.embedding_loss,
            attention: s.attention_loss,
        };
        config.rescale = s.rescaling.then(|| {
            let default = RescaleWindow::default();
            RescaleWindow {
                record_at: s.rescale_record_at.unwrap_or(default.record_at),
                until: s.rescale_until.unwrap_or(default.until),
            }
        });
        config.validate().map_err(|e| invalid("stage1", &e))?;
        Ok(config)
    }

    pub(super) fn stage2_config(&self, device: Device) -> Result<Stage2Config, JobFailure> {
        let s = &self.spec.stage2;
        let defaults = Stage2Config::default();
        let mixed_precision = match s.precision.as_deref() {
            None | Some("fp32") => MixedPrecision::Fp32,
            Some("bf16") => MixedPrecision::Bf16,
            Some("fp16") => MixedPrecision::Fp16,
            Some(other) => {
                return Err(JobFailure::InvalidJob(format!(
                    "stage2.precision: {other:?} is not fp32, bf16 or fp16"
                )))
            }
        };
        let config = Stage2Config {
            steps: s.steps.unwrap_or(defaults.steps),
            batch_size: s.batch_size.unwrap_or(defaults.batch_size),
            optimizer: AdamWConfig {
                lr: s.learning_rate.unwrap_or(defaults.optimizer.lr),
                weight_decay: s.weight_decay.unwrap_or(defaults.optimizer.weight_decay),
                ..defaults.optimizer
            },
            gradient_checkpointing: s.gradient_checkpointing,
            mixed_precision,
            resolution: self.spec.training.resolution as usize,
        };
        if config.steps > 0 {
            config
                .validate(device)
                .map_err(|e| JobFailure::InvalidJob(format!("stage2: {e}")))?;
        }
        Ok(config)
    }

    /// The job as the manifest records it; store options may hold credentials, so
    /// only their keys are kept.
    pub(super) fn spec_for_manifest(&self) -> Result<serde_json::Value, JobFailure> {
        let mut value = serde_json::to_value(&self.spec)
            .map_err(|e| JobFailure::Failed(format!("recording the job: {e}")))?;
        if let Some(options) = value.pointer_mut("/store/options") {
            let keys: Vec<&String> = self.spec.store.options.keys().collect();
            *options = serde_json::json!(keys);
        }
        Ok(value)
    }

    /// The manifest's `hyper_parameters`: the job and both stages' configurations.
    pub(super) fn hyper_parameters(
        &self,
        stage1: &Stage1Config,
        stage2: &Stage2Config,
    ) -> Result<serde_json::Value, JobFailure> {
        let record = HyperParameters {
            job: self.spec_for_manifest()?,
            stage1,
            stage2,
        };
        serde_json::to_value(record)
            .map_err(|e| JobFailure::Failed(format!("recording the hyper-parameters: {e}")))
    }
}
