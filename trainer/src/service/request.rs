//! `CreateTrainingJob`'s spec: checked field by field (every message names the field),
//! and kept as [`TrainingRequest`] in `jobs/<id>/spec.json` — the same sections as a
//! job file, minus the model and store, which are the service's.

use coreg::images::{decode_training_image, ImageLimits};
use coreg::method::prompts::{fill_template, PromptSet};
use coreg::model::tokenizer::ClipTokenizer;
use coreg_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::job::{
    CheckpointSpec, ConceptSpec, ImagesSpec, JobSpec, ModelSpec, PreviewSpec, Stage1Spec,
    Stage2Spec, StoreSpec, TrainingSpec,
};
use crate::pipeline::MAX_IMAGES;

/// A training job as the service stores it. Inline images have been written to the
/// store and are referred to by key like uploaded ones.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingRequest {
    pub concept: ConceptSpec,
    pub image_keys: Vec<String>,
    pub training: TrainingSpec,
    pub stage1: Stage1Spec,
    pub stage2: Stage2Spec,
    pub checkpoints: CheckpointSpec,
    pub previews: PreviewSpec,
}

/// One training photo of a request, before it is stored.
pub enum RequestImage {
    /// Encoded bytes, already checked to decode within the limits.
    Inline(Vec<u8>),
    /// A key in the trainer's store.
    Stored(String),
}

fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// A count in the proto (u32) as the job file holds it.
fn count(value: Option<u32>) -> Option<usize> {
    value.map(|v| v as usize)
}

/// The request's photos, each inline one decoded within the limits and each stored one
/// a safe key, with the field of a bad one named.
fn request_images(
    images: Vec<pb::TrainingImage>,
    upload_prefix: &str,
) -> Result<Vec<RequestImage>, Status> {
    if images.is_empty() {
        return Err(invalid("spec.images", "a job needs at least one photo"));
    }
    if images.len() > MAX_IMAGES {
        return Err(invalid(
            "spec.images",
            format!(
                "{} photos; a job trains on at most {MAX_IMAGES}",
                images.len()
            ),
        ));
    }
    let limits = ImageLimits::default();
    images
        .into_iter()
        .enumerate()
        .map(|(i, image)| {
            let field = format!("spec.images[{i}]");
            match image.source {
                Some(pb::training_image::Source::Data(bytes)) => {
                    decode_training_image(&bytes, &limits).map_err(|e| invalid(&field, e))?;
                    Ok(RequestImage::Inline(bytes))
                }
                Some(pb::training_image::Source::ObjectKey(key)) => {
                    check_object_key(&key, upload_prefix).map_err(|e| invalid(&field, e))?;
                    Ok(RequestImage::Stored(key))
                }
                None => Err(invalid(&field, "give `data` or `object_key`")),
            }
        })
        .collect()
}

fn stage1_spec(stage1: pb::Stage1Parameters) -> Stage1Spec {
    Stage1Spec {
        steps: count(stage1.steps),
        batch_size: count(stage1.batch_size),
        learning_rate: stage1.learning_rate,
        weight_decay: stage1.weight_decay,
        lambda_embedding: stage1.lambda_embedding,
        lambda_attention: stage1.lambda_attention,
        embedding_loss: !stage1.disable_embedding_loss,
        attention_loss: !stage1.disable_attention_loss,
        rescaling: !stage1.disable_rescaling,
        rescale_record_at: count(stage1.rescale_record_at),
        rescale_until: count(stage1.rescale_until),
    }
}

fn stage2_spec(stage2: pb::Stage2Parameters) -> Result<Stage2Spec, Status> {
    let precision = match pb::Precision::try_from(stage2.precision) {
        Ok(pb::Precision::Unspecified) => None,
        Ok(pb::Precision::Fp32) => Some("fp32"),
        Ok(pb::Precision::Bf16) => Some("bf16"),
        Ok(pb::Precision::Fp16) => Some("fp16"),
        Err(_) => return Err(invalid("spec.stage2.precision", "unknown value")),
    };
    Ok(Stage2Spec {
        steps: count(stage2.steps),
        batch_size: count(stage2.batch_size),
        learning_rate: stage2.learning_rate,
        weight_decay: stage2.weight_decay,
        gradient_checkpointing: stage2.gradient_checkpointing,
        precision: precision.map(String::from),
        delta_rank: count(stage2.delta_rank),
    })
}

impl TrainingRequest {
    /// Checks `spec` completely — ranges, names, images (decoded within the limits),
    /// the category and every prompt against the tokenizer — before anything is stored.
    /// Returns the request (its `image_keys` still empty) and its images.
    pub fn from_proto(
        spec: pb::TrainingJobSpec,
        tokenizer: &ClipTokenizer,
        upload_prefix: &str,
    ) -> Result<(TrainingRequest, Vec<RequestImage>), Status> {
        let images = request_images(spec.images, upload_prefix)?;
        let prompt_set = match pb::PromptSet::try_from(spec.prompt_set) {
            Ok(pb::PromptSet::Unspecified | pb::PromptSet::Animate) => "animate",
            Ok(pb::PromptSet::Inanimate) => "inanimate",
            Ok(pb::PromptSet::Universal) => "universal",
            Ok(pb::PromptSet::Single) => "single",
            Ok(pb::PromptSet::Custom) => "custom",
            Err(_) => return Err(invalid("spec.prompt_set", "unknown value")),
        };
        let loss_variant = match pb::LossVariant::try_from(spec.loss_variant) {
            Ok(pb::LossVariant::Unspecified | pb::LossVariant::Reference) => "reference",
            Ok(pb::LossVariant::Paper) => "paper",
            Err(_) => return Err(invalid("spec.loss_variant", "unknown value")),
        };
        let previews = spec.previews.unwrap_or_default();
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let request = TrainingRequest {
            concept: ConceptSpec {
                name: spec.concept_name,
                category: spec.category,
                token: non_empty(spec.token),
                version: non_empty(spec.concept_version),
            },
            image_keys: Vec::new(),
            training: TrainingSpec {
                seed: spec.seed,
                resolution: spec
                    .resolution
                    .unwrap_or(TrainingSpec::default().resolution),
                prompt_set: prompt_set.into(),
                custom_prompts: spec.custom_prompts,
                loss_variant: loss_variant.into(),
            },
            stage1: stage1_spec(spec.stage1.unwrap_or_default()),
            stage2: stage2_spec(spec.stage2.unwrap_or_default())?,
            checkpoints: CheckpointSpec {
                every: spec
                    .checkpoint_every
                    .map_or(CheckpointSpec::default().every, |v| v as usize),
                ..CheckpointSpec::default()
            },
            previews: PreviewSpec {
                every: count(previews.every),
                prompts: previews.prompts,
                steps: count(previews.steps),
            },
        };
        request.validate(tokenizer)?;
        Ok((request, images))
    }

    /// Everything a job file's validation checks, plus what needs the tokenizer.
    fn validate(&self, tokenizer: &ClipTokenizer) -> Result<(), Status> {
        let mut probe = self.job_spec(
            ModelSpec {
                path: "model".into(),
                device: "cpu".into(),
                variant: None,
            },
            StoreSpec {
                url: "memory:///".into(),
                options: Default::default(),
            },
        );
        // The keys are filled in once the images are stored; validation only needs
        // to know there are some.
        probe.images.keys = vec!["pending".into()];
        probe
            .validate()
            .map_err(|e| invalid(&format!("spec.{}", proto_field(&e.key)), e.message))?;

        tokenizer
            .single_token_id(self.concept.category.trim())
            .map_err(|e| invalid("spec.category", format!("must be a single CLIP token: {e}")))?;
        let placeholder = self.placeholder();
        let mut with_placeholder = tokenizer.clone();
        with_placeholder
            .add_placeholder(&placeholder)
            .map_err(|e| invalid("spec.token", e))?;

        let custom = self.training.prompt_set == "custom";
        if custom {
            PromptSet::custom(self.training.custom_prompts.clone())
                .map_err(|e| invalid("spec.custom_prompts", e))?;
        } else if !self.training.custom_prompts.is_empty() {
            return Err(invalid(
                "spec.custom_prompts",
                "only with prompt_set = PROMPT_SET_CUSTOM",
            ));
        }
        let prompts = self
            .training
            .custom_prompts
            .iter()
            .map(|t| ("spec.custom_prompts", t))
            .chain(
                self.previews
                    .prompts
                    .iter()
                    .map(|t| ("spec.previews.prompts", t)),
            );
        for (field, template) in prompts {
            let prompt = fill_template(template, &placeholder);
            let tokens = with_placeholder
                .encode(&prompt)
                .map_err(|e| invalid(field, e))?;
            if tokens.truncated {
                return Err(invalid(
                    field,
                    format!(
                        "{prompt:?} is {} CLIP tokens long; the limit is {}",
                        tokens.untruncated_len,
                        tokens.ids.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn placeholder(&self) -> String {
        self.concept
            .token
            .clone()
            .unwrap_or_else(|| format!("<{}>", self.concept.name))
    }

    /// The complete job the pipeline runs, on the service's model and store.
    pub fn job_spec(&self, model: ModelSpec, store: StoreSpec) -> JobSpec {
        JobSpec {
            concept: self.concept.clone(),
            images: ImagesSpec {
                folder: None,
                keys: self.image_keys.clone(),
            },
            model,
            store,
            training: self.training.clone(),
            stage1: self.stage1.clone(),
            stage2: self.stage2.clone(),
            checkpoints: self.checkpoints.clone(),
            previews: self.previews.clone(),
        }
    }

    /// The spec as `TrainingJob.spec` reports it: images by their store keys.
    pub fn to_proto(&self) -> pb::TrainingJobSpec {
        let prompt_set = match self.training.prompt_set.as_str() {
            "inanimate" => pb::PromptSet::Inanimate,
            "universal" => pb::PromptSet::Universal,
            "single" => pb::PromptSet::Single,
            "custom" => pb::PromptSet::Custom,
            _ => pb::PromptSet::Animate,
        };
        let loss_variant = match self.training.loss_variant.as_str() {
            "paper" => pb::LossVariant::Paper,
            _ => pb::LossVariant::Reference,
        };
        let precision = match self.stage2.precision.as_deref() {
            Some("bf16") => pb::Precision::Bf16,
            Some("fp16") => pb::Precision::Fp16,
            Some(_) => pb::Precision::Fp32,
            None => pb::Precision::Unspecified,
        };
        let count = |v: Option<usize>| v.map(|v| v as u32);
        pb::TrainingJobSpec {
            concept_name: self.concept.name.clone(),
            category: self.concept.category.clone(),
            token: self.concept.token.clone().unwrap_or_default(),
            concept_version: self.concept.version.clone().unwrap_or_default(),
            images: self
                .image_keys
                .iter()
                .map(|key| pb::TrainingImage {
                    source: Some(pb::training_image::Source::ObjectKey(key.clone())),
                })
                .collect(),
            seed: self.training.seed,
            resolution: Some(self.training.resolution),
            prompt_set: prompt_set.into(),
            custom_prompts: self.training.custom_prompts.clone(),
            loss_variant: loss_variant.into(),
            stage1: Some(pb::Stage1Parameters {
                steps: count(self.stage1.steps),
                batch_size: count(self.stage1.batch_size),
                learning_rate: self.stage1.learning_rate,
                weight_decay: self.stage1.weight_decay,
                lambda_embedding: self.stage1.lambda_embedding,
                lambda_attention: self.stage1.lambda_attention,
                disable_embedding_loss: !self.stage1.embedding_loss,
                disable_attention_loss: !self.stage1.attention_loss,
                disable_rescaling: !self.stage1.rescaling,
                rescale_record_at: count(self.stage1.rescale_record_at),
                rescale_until: count(self.stage1.rescale_until),
            }),
            stage2: Some(pb::Stage2Parameters {
                steps: count(self.stage2.steps),
                batch_size: count(self.stage2.batch_size),
                learning_rate: self.stage2.learning_rate,
                weight_decay: self.stage2.weight_decay,
                gradient_checkpointing: self.stage2.gradient_checkpointing,
                precision: precision.into(),
                delta_rank: count(self.stage2.delta_rank),
            }),
            checkpoint_every: Some(self.checkpoints.every as u32),
            previews: Some(pb::PreviewParameters {
                every: count(self.previews.every),
                prompts: self.previews.prompts.clone(),
                steps: count(self.previews.steps),
            }),
        }
    }
}

/// The `TrainingJobSpec` field a job-file key (as [`JobSpec::validate`] names it)
/// came from, so that an error names what the client sent.
fn proto_field(key: &str) -> String {
    match key {
        "concept.name" => "concept_name".into(),
        "concept.version" => "concept_version".into(),
        "concept.category" => "category".into(),
        "concept.token" => "token".into(),
        "checkpoints.every" => "checkpoint_every".into(),
        "images.keys" => "images".into(),
        _ => key.strip_prefix("training.").unwrap_or(key).to_string(),
    }
}

/// A store key a client may point a job at: relative, no `..`, no empty segments, no
/// control characters, and under `upload_prefix` (where users upload). Anything else
/// in the store — other jobs' inputs, concepts, blobs, generated images, the queue —
/// is not a photo a request may name.
fn check_object_key(key: &str, upload_prefix: &str) -> Result<(), String> {
    let bad = key.is_empty()
        || key.len() > 1024
        || key.starts_with('/')
        || key.chars().any(char::is_control)
        || key
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(format!(
            "{key:?} is not a relative object key (no empty, `.` or `..` segments)"
        ));
    }
    if !key.starts_with(upload_prefix) || key.len() == upload_prefix.len() {
        return Err(format!(
            "{key:?} is outside `{upload_prefix}`, the store's folder for uploaded photos"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_cannot_escape_the_upload_folder() {
        for key in [
            "",
            "/etc/passwd",
            "uploads/a/../b",
            "uploads//b",
            "./uploads/a",
            "uploads/a\nb",
            "uploads/",
            "jobs/r1/inputs/00",
            "concepts/toy/v1/manifest.json",
            "blobs/sha256/00",
            "generated/someone-else/0.png",
            "queue/r1",
            "index/000-r1",
            "uploadsx/a.png",
            "a.png",
        ] {
            assert!(
                check_object_key(key, "uploads/").is_err(),
                "{key:?} accepted"
            );
        }
        for key in ["uploads/rex/1.jpg", "uploads/a.png"] {
            assert!(check_object_key(key, "uploads/").is_ok(), "{key:?} refused");
        }
        assert!(check_object_key("team/photos/a.png", "team/photos/").is_ok());
    }
}
