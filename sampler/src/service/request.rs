//! A `GenerateRequest` as the model thread needs it, checked field by field against
//! the proto's documented defaults and the configured limits. Every refusal is
//! INVALID_ARGUMENT with a message naming the field, and happens before a generation
//! slot or the store is touched.

use coreg::artifact::{validate_concept_name, validate_concept_version};
use coreg::generate::GenerationParams;
use coreg::method::tto::TtoConfig;
use coreg::optim::AdamWConfig;
use coreg::schedule::SamplerKind;
use coreg_proto::v1 as pb;
use tonic::Status;

use crate::personalized::{ImageRequest, MAX_IMAGES_PER_PROMPT};

use super::config::LimitsConfig;

/// Denoising steps when the request leaves them unset (the paper's).
pub const DEFAULT_STEPS: u32 = 50;
pub const DEFAULT_GUIDANCE: f64 = 7.5;
/// The largest classifier-free guidance scale accepted.
pub const MAX_GUIDANCE: f64 = 50.0;
pub const DEFAULT_TTO_STEPS: u32 = 10;
pub const DEFAULT_TTO_LEARNING_RATE: f64 = 5e-4;
/// The smallest image side in pixels.
pub const MIN_SIDE: u32 = 64;
/// A prompt's length in bytes before tokenizing (the 77-token limit is checked once
/// the concept's token is known); stops a megabyte "prompt" from reaching the
/// tokenizer.
pub const MAX_PROMPT_BYTES: usize = 4096;

/// Where the images go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Inline,
    Store,
}

/// A checked request; `request.seeds` holds one seed per image, drawn when the client
/// gave none.
#[derive(Debug)]
pub struct Checked {
    /// (name, version) when a concept is named; an empty version means the newest.
    pub concept: Option<(String, String)>,
    pub request: ImageRequest,
    pub destination: Destination,
}

fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

/// Checks `request`; `default_side` is the model's native image size.
pub fn check(
    request: &pb::GenerateRequest,
    limits: &LimitsConfig,
    default_side: u32,
) -> Result<Checked, Status> {
    let concept = match &request.concept {
        None => None,
        Some(reference) => {
            validate_concept_name(&reference.name)
                .map_err(|e| invalid("concept.name", strip(&e)))?;
            if !reference.version.is_empty() {
                validate_concept_version(&reference.version)
                    .map_err(|e| invalid("concept.version", strip(&e)))?;
            }
            Some((reference.name.clone(), reference.version.clone()))
        }
    };

    let prompts = &request.prompts;
    let max_images = limits.max_images_per_request;
    if prompts.is_empty() || prompts.len() > max_images as usize {
        return Err(invalid(
            "prompts",
            format!("{} given; a request has 1 to {max_images}", prompts.len()),
        ));
    }
    for (i, prompt) in prompts.iter().enumerate() {
        check_text(&format!("prompts[{i}]"), prompt, false)?;
    }
    check_text("negative_prompt", &request.negative_prompt, true)?;

    let per_prompt = request.images_per_prompt.max(1);
    if per_prompt as usize > MAX_IMAGES_PER_PROMPT {
        return Err(invalid(
            "images_per_prompt",
            format!("{per_prompt} is outside [1, {MAX_IMAGES_PER_PROMPT}]"),
        ));
    }
    let images = u64::from(per_prompt) * prompts.len() as u64;
    if images > u64::from(max_images) {
        return Err(invalid(
            "images_per_prompt",
            format!(
                "{} prompts × {per_prompt} images is {images}; a request makes at most \
                 {max_images}",
                prompts.len()
            ),
        ));
    }
    let seeds = if request.seeds.is_empty() {
        (0..images).map(|_| rand::random::<u64>()).collect()
    } else if request.seeds.len() as u64 == images {
        request.seeds.clone()
    } else {
        return Err(invalid(
            "seeds",
            format!(
                "{} given for {images} images (one per image, prompt-major, or none)",
                request.seeds.len()
            ),
        ));
    };

    let steps = request.steps.unwrap_or(DEFAULT_STEPS);
    if steps == 0 || steps > limits.max_steps {
        return Err(invalid(
            "steps",
            format!("{steps} is outside [1, {}]", limits.max_steps),
        ));
    }
    let guidance_scale = request.guidance_scale.unwrap_or(DEFAULT_GUIDANCE);
    if !(0.0..=MAX_GUIDANCE).contains(&guidance_scale) {
        return Err(invalid(
            "guidance_scale",
            format!("{guidance_scale} is not a number in [0, {MAX_GUIDANCE}]"),
        ));
    }
    let side = |field: &str, value: u32| -> Result<u32, Status> {
        let value = if value == 0 { default_side } else { value };
        if value < MIN_SIDE || value > limits.max_image_side || value % 8 != 0 {
            return Err(invalid(
                field,
                format!(
                    "{value} px must be a multiple of 8 in [{MIN_SIDE}, {}]",
                    limits.max_image_side
                ),
            ));
        }
        Ok(value)
    };
    let width = side("width", request.width)?;
    let height = side("height", request.height)?;
    let sampler = match pb::Scheduler::try_from(request.scheduler) {
        Ok(pb::Scheduler::Unspecified | pb::Scheduler::DpmSolverMultistep) => {
            SamplerKind::DpmSolverPlusPlus
        }
        Ok(pb::Scheduler::Ddim) => SamplerKind::Ddim,
        Ok(pb::Scheduler::EulerDiscrete) => SamplerKind::EulerDiscrete,
        Err(_) => return Err(invalid("scheduler", "unknown value")),
    };
    let destination = match pb::ImageDestination::try_from(request.destination) {
        Ok(pb::ImageDestination::Unspecified | pb::ImageDestination::Inline) => Destination::Inline,
        Ok(pb::ImageDestination::Store) => Destination::Store,
        Err(_) => return Err(invalid("destination", "unknown value")),
    };

    let tto = match &request.test_time_optimization {
        Some(tto) if tto.enabled => {
            if concept.is_none() {
                return Err(invalid(
                    "test_time_optimization",
                    "optimizes a concept's embedding: name a concept",
                ));
            }
            let steps = tto.steps.unwrap_or(DEFAULT_TTO_STEPS);
            if steps == 0 || steps > limits.max_tto_steps {
                return Err(invalid(
                    "test_time_optimization.steps",
                    format!("{steps} is outside [1, {}]", limits.max_tto_steps),
                ));
            }
            let lr = tto.learning_rate.unwrap_or(DEFAULT_TTO_LEARNING_RATE);
            if !(lr > 0.0 && lr <= 1.0) {
                return Err(invalid(
                    "test_time_optimization.learning_rate",
                    format!("{lr} is not in (0, 1]"),
                ));
            }
            let defaults = TtoConfig::default();
            Some(TtoConfig {
                steps: steps as usize,
                optimizer: AdamWConfig {
                    lr,
                    ..defaults.optimizer
                },
                ..defaults
            })
        }
        _ => None,
    };

    let request = ImageRequest {
        prompts: prompts.clone(),
        negative_prompt: request.negative_prompt.clone(),
        images_per_prompt: per_prompt as usize,
        seeds,
        params: GenerationParams {
            steps: steps as usize,
            guidance_scale,
            height,
            width,
            sampler,
        },
        tto,
    };
    // The library's own checks (per-prompt image count among them) as a last word.
    request
        .validate()
        .map_err(|e| Status::invalid_argument(strip(&e)))?;
    Ok(Checked {
        concept,
        request,
        destination,
    })
}

fn check_text(field: &str, text: &str, may_be_empty: bool) -> Result<(), Status> {
    if text.trim().is_empty() && !may_be_empty {
        return Err(invalid(field, "is empty"));
    }
    if text.len() > MAX_PROMPT_BYTES {
        return Err(invalid(
            field,
            format!(
                "is {} bytes; the limit is {MAX_PROMPT_BYTES} (and 77 CLIP tokens)",
                text.len()
            ),
        ));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(invalid(field, "holds control characters"));
    }
    Ok(())
}

/// The error's message without its "invalid input:" prefix.
pub fn strip(error: &coreg::Error) -> String {
    match error {
        coreg::Error::InvalidInput(message) => message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::config::SamplerConfig;

    fn base() -> pb::GenerateRequest {
        pb::GenerateRequest {
            concept: Some(pb::ConceptRef {
                name: "rex".into(),
                version: String::new(),
            }),
            prompts: vec!["a photo of {}".into()],
            ..Default::default()
        }
    }

    fn checked(request: pb::GenerateRequest) -> Result<Checked, Status> {
        check(&request, &SamplerConfig::default().limits, 512)
    }

    #[test]
    fn unset_fields_take_the_documented_defaults() {
        let c = checked(base()).unwrap();
        assert_eq!(c.concept, Some(("rex".into(), String::new())));
        let p = &c.request.params;
        assert_eq!((p.steps, p.guidance_scale), (50, 7.5));
        assert_eq!((p.width, p.height), (512, 512));
        assert_eq!(p.sampler, SamplerKind::DpmSolverPlusPlus);
        assert_eq!(c.request.images_per_prompt, 1);
        assert_eq!(c.request.seeds.len(), 1, "a seed is drawn per image");
        assert!(c.request.tto.is_none());
        assert_eq!(c.destination, Destination::Inline);

        let mut r = base();
        r.test_time_optimization = Some(pb::TestTimeOptimization {
            enabled: true,
            ..Default::default()
        });
        let tto = checked(r).unwrap().request.tto.unwrap();
        assert_eq!((tto.steps, tto.optimizer.lr), (10, 5e-4));
    }

    #[test]
    fn each_bad_field_is_named() {
        type Edit = fn(&mut pb::GenerateRequest);
        let cases: Vec<(Edit, &str)> = vec![
            (
                |r| r.concept.as_mut().unwrap().name = "../etc".into(),
                "concept.name",
            ),
            (
                |r| r.concept.as_mut().unwrap().version = "a/b".into(),
                "concept.version",
            ),
            (|r| r.prompts.clear(), "prompts"),
            (|r| r.prompts = vec!["{}".into(); 17], "prompts"),
            (|r| r.prompts = vec!["  ".into()], "prompts[0]"),
            (|r| r.prompts = vec!["x".repeat(5000)], "prompts[0]"),
            (|r| r.prompts = vec!["a\u{0}b {}".into()], "prompts[0]"),
            (|r| r.negative_prompt = "n".repeat(5000), "negative_prompt"),
            (|r| r.images_per_prompt = 9, "images_per_prompt"),
            (
                |r| {
                    r.prompts = vec!["{}".into(); 3];
                    r.images_per_prompt = 6;
                },
                "images_per_prompt",
            ),
            (|r| r.seeds = vec![1, 2], "seeds"),
            (|r| r.steps = Some(0), "steps"),
            (|r| r.steps = Some(10_000), "steps"),
            (|r| r.guidance_scale = Some(f64::NAN), "guidance_scale"),
            (|r| r.guidance_scale = Some(-1.0), "guidance_scale"),
            (|r| r.guidance_scale = Some(f64::INFINITY), "guidance_scale"),
            (|r| r.width = 500, "width"),
            (|r| r.height = 2048, "height"),
            (|r| r.width = 8, "width"),
            (|r| r.scheduler = 99, "scheduler"),
            (|r| r.destination = 7, "destination"),
            (
                |r| {
                    r.test_time_optimization = Some(pb::TestTimeOptimization {
                        enabled: true,
                        steps: Some(1000),
                        learning_rate: None,
                    })
                },
                "test_time_optimization.steps",
            ),
            (
                |r| {
                    r.test_time_optimization = Some(pb::TestTimeOptimization {
                        enabled: true,
                        steps: None,
                        learning_rate: Some(f64::NAN),
                    })
                },
                "test_time_optimization.learning_rate",
            ),
            (
                |r| {
                    r.concept = None;
                    r.test_time_optimization = Some(pb::TestTimeOptimization {
                        enabled: true,
                        ..Default::default()
                    })
                },
                "name a concept",
            ),
        ];
        for (edit, needle) in cases {
            let mut request = base();
            edit(&mut request);
            let status = checked(request).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{needle}");
            assert!(
                status.message().contains(needle),
                "{needle}: {}",
                status.message()
            );
        }
    }
}
