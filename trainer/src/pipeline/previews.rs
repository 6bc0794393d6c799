//! The job's side of validation previews ([`crate::previews`]): the plan checked and
//! recorded at `jobs/<id>/previews/plan.json`, and the images of each due step stored
//! beside it.

use bytes::Bytes;
use coreg::generate::Pipeline;
use coreg::method::prompts::fill_template;
use coreg::method::stage1::Stage1Config;
use coreg::model::tokenizer::ClipTokenizer;
use tch::Tensor;

use super::failure::Phase;
use super::inputs::Inputs;
use super::{Job, Stage};
use crate::exit::JobFailure;
use crate::previews::{preview_name, PreviewPlan};

/// What a stage needs to render its previews: the plan, the concept's placeholder, and
/// the models as they are at each step.
pub(super) struct Previewer<'a> {
    pub plan: &'a PreviewPlan,
    pub placeholder: &'a str,
    pub placeholder_id: i64,
    pub pipeline: Pipeline<'a>,
}

impl<'a> Previewer<'a> {
    /// `None` unless the job asks for previews.
    pub(super) fn new(inputs: &'a Inputs, pipeline: Pipeline<'a>) -> Option<Self> {
        inputs.previews.as_ref().map(|plan| Previewer {
            plan,
            placeholder: &inputs.placeholder,
            placeholder_id: inputs.placeholder_id,
            pipeline,
        })
    }
}

impl Job<'_> {
    /// The job's preview plan (none unless `previews.every` is set), checked against
    /// the tokenizer and recorded at `jobs/<id>/previews/plan.json`.
    pub(super) fn preview_plan(
        &self,
        stage1: &Stage1Config,
        tokenizer: &ClipTokenizer,
        placeholder: &str,
    ) -> Result<Option<PreviewPlan>, JobFailure> {
        let spec = &self.spec.previews;
        let Some(every) = spec.every else {
            return Ok(None);
        };
        let plan = PreviewPlan::new(
            every,
            &spec.prompts,
            &stage1.prompt_set,
            spec.steps,
            self.spec.training.seed,
            self.spec.training.resolution,
        );
        for template in &plan.templates {
            let prompt = fill_template(template, placeholder);
            let tokens = tokenizer.encode(&prompt).map_err(Phase::Inputs.of())?;
            if tokens.truncated {
                return Err(JobFailure::InvalidJob(format!(
                    "previews.prompts: {prompt:?} is {} CLIP tokens long; the limit is {}",
                    tokens.untruncated_len,
                    tokens.ids.len()
                )));
            }
        }
        let record = serde_json::to_vec_pretty(&plan)
            .map_err(|e| JobFailure::Failed(format!("preview plan: {e}")))?;
        self.fence()?;
        self.block_on(
            self.store
                .put_overwrite(&self.key("previews/plan.json"), Bytes::from(record)),
        )
        .map_err(Phase::Training.of())?;
        Ok(Some(plan))
    }

    /// Renders and stores the previews of `step` if one is due. Previews are a pure
    /// function of the step's weights, so a resumed run rewrites identical images.
    pub(super) fn write_previews(
        &self,
        previewer: &Previewer<'_>,
        stage: Stage,
        step: usize,
        total: usize,
        embedding: &Tensor,
    ) -> Result<(), JobFailure> {
        if !previewer.plan.due(step, total) {
            return Ok(());
        }
        let images = previewer
            .plan
            .render(
                &previewer.pipeline,
                previewer.placeholder,
                previewer.placeholder_id,
                embedding,
            )
            .map_err(Phase::Training.of())?;
        let stage = stage.number();
        for (index, png) in images.into_iter().enumerate() {
            let key = self.key(&preview_name(stage, step, index));
            self.fence()?;
            self.block_on(self.store.put_overwrite(&key, Bytes::from(png)))
                .map_err(Phase::Training.of())?;
        }
        tracing::info!(stage, step, "previews written");
        Ok(())
    }
}
