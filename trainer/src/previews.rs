//! Validation previews: every N steps of either stage, a few fixed-seed prompts are
//! rendered with the embedding and U-Net as they are at that step and stored with the
//! job (`jobs/<id>/previews/`), so a user can watch the concept form.
//!
//! Every preview of a job starts from the same noise (the job's seed), so two previews
//! of one prompt differ only by what training changed. Generation runs without autograd
//! and draws no randomness from the training streams, so a run with previews trains
//! exactly what the same run without them trains.

use std::ops::ControlFlow;

use coreg::generate::{seeded_noise, Generation, GenerationParams, Pipeline, TextConditioning};
use coreg::images::tensor_to_png;
use coreg::method::prompts::{fill_template, PromptSet, TRAINING_TEMPLATE};
use coreg::{Error, Result};
use serde::Serialize;
use tch::Tensor;

/// Fewer denoising steps than the paper's 50: previews show progress, not final quality.
pub const DEFAULT_STEPS: usize = 25;
/// The most prompts one preview may render (each costs a full generation).
pub const MAX_PROMPTS: usize = 8;

/// What each preview renders, fixed for the whole job.
#[derive(Debug, Clone, Serialize)]
pub struct PreviewPlan {
    /// Steps between previews within a stage; the last step of a stage always gets one.
    pub every: usize,
    /// Templates with `{}` where the concept's placeholder goes.
    pub templates: Vec<String>,
    pub seed: u64,
    #[serde(skip)]
    pub params: GenerationParams,
    /// The generation settings as recorded next to the images.
    pub steps: usize,
    pub guidance_scale: f64,
    pub size: u32,
}

impl PreviewPlan {
    /// `templates` empty: the training prompt plus the prompt set's first template (the
    /// kind of context the regularization protects).
    pub fn new(
        every: usize,
        templates: &[String],
        prompt_set: &PromptSet,
        steps: Option<usize>,
        seed: u64,
        size: u32,
    ) -> Self {
        let templates = if templates.is_empty() {
            let mut defaults = vec![TRAINING_TEMPLATE.to_string()];
            if let Some(first) = prompt_set.templates().first() {
                if first != TRAINING_TEMPLATE {
                    defaults.push(first.clone());
                }
            }
            defaults
        } else {
            templates.to_vec()
        };
        let params = GenerationParams {
            steps: steps.unwrap_or(DEFAULT_STEPS),
            height: size,
            width: size,
            ..GenerationParams::default()
        };
        PreviewPlan {
            every,
            templates,
            seed,
            steps: params.steps,
            guidance_scale: params.guidance_scale,
            size,
            params,
        }
    }

    /// Whether step `step` (1-based, after it ran) of a `total`-step stage gets a
    /// preview.
    pub fn due(&self, step: usize, total: usize) -> bool {
        step == total || step % self.every == 0
    }

    /// One PNG per template, in template order, for the concept whose placeholder
    /// `placeholder` has id `placeholder_id` and vector `embedding` `[D]`.
    pub fn render(
        &self,
        pipeline: &Pipeline<'_>,
        placeholder: &str,
        placeholder_id: i64,
        embedding: &Tensor,
    ) -> Result<Vec<Vec<u8>>> {
        let prompts: Vec<String> = self
            .templates
            .iter()
            .map(|t| fill_template(t, placeholder))
            .collect();
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let embedding = embedding.detach();
        let conditioning: TextConditioning =
            pipeline.encode_prompts(&prompts, "", &[(placeholder_id, &embedding)])?;
        let channels = pipeline.unet.model.in_channels();
        let seeds = vec![self.seed; prompts.len()];
        let noise = seeded_noise(&seeds, channels, &self.params);
        match pipeline.generate(&conditioning, &self.params, &noise, |_, _| {
            ControlFlow::Continue(())
        })? {
            Generation::Completed(generated) => (0..prompts.len() as i64)
                .map(|i| tensor_to_png(&generated.images.get(i)))
                .collect(),
            Generation::Cancelled { .. } => Err(Error::InvalidInput(
                "preview generation was cancelled".into(),
            )),
        }
    }
}

/// The store key of preview `index` at `step` of `stage`, sortable by training time.
pub fn preview_name(stage: u8, step: usize, index: usize) -> String {
    format!("previews/stage{stage}-{step:06}-{index}.png")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prompts_are_the_training_prompt_and_a_regularization_template() {
        let set = PromptSet::animate();
        let plan = PreviewPlan::new(10, &[], &set, None, 7, 64);
        assert_eq!(plan.templates[0], TRAINING_TEMPLATE);
        assert_eq!(plan.templates[1], set.templates()[0]);
        assert_eq!(plan.templates.len(), 2);
        assert_eq!(plan.params.steps, DEFAULT_STEPS);
        assert_eq!((plan.params.height, plan.params.width), (64, 64));

        // The single-prompt ablation's only template is the training prompt itself.
        let single = PreviewPlan::new(10, &[], &PromptSet::single_photo(), None, 7, 64);
        assert_eq!(single.templates, vec![TRAINING_TEMPLATE.to_string()]);

        let custom = PreviewPlan::new(10, &["a {} in snow".into()], &set, Some(5), 7, 64);
        assert_eq!(custom.templates, vec!["a {} in snow".to_string()]);
        assert_eq!(custom.params.steps, 5);
    }

    #[test]
    fn previews_fall_on_multiples_and_on_the_last_step() {
        let plan = PreviewPlan::new(4, &[], &PromptSet::animate(), None, 0, 64);
        let due: Vec<usize> = (1..=10).filter(|&s| plan.due(s, 10)).collect();
        assert_eq!(due, vec![4, 8, 10]);
        assert_eq!(preview_name(2, 40, 1), "previews/stage2-000040-1.png");
    }
}
