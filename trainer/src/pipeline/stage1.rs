//! The job's stage 1: the concept's embedding S*, learned with CoRe's context
//! regularization (coreg's `method::stage1`), from the start or from a stage-1
//! checkpoint. A job whose checkpoint is already in stage 2 reads its stored S*
//! instead.

use coreg::artifact::LossHistory;
use coreg::base_model::BaseModel;
use coreg::generate::Pipeline;
use coreg::method::stage1::{FrozenModels, Stage1, Stage1State, Stage1StepLosses};
use tch::Tensor;

use super::checkpoint::Checkpoint;
use super::failure::Phase;
use super::inputs::Inputs;
use super::previews::Previewer;
use super::{Job, Stage};
use crate::exit::JobFailure;

impl Job<'_> {
    /// S* and the loss history so far.
    pub(super) fn learn_embedding(
        &self,
        model: &BaseModel,
        inputs: &Inputs,
        resume: Option<&Checkpoint>,
    ) -> Result<(Tensor, LossHistory), JobFailure> {
        let models = FrozenModels {
            text_encoder: &model.text_encoder,
            unet: &model.unet,
            vae: &model.vae,
            schedule: &model.schedule,
            prediction_type: model.folder.scheduler.prediction_type,
        };
        // Built even when stage 1 is done: it checks the category word and prompts.
        let stage1 = Stage1::new(
            inputs.stage1.clone(),
            models,
            &inputs.tokenizer,
            &inputs.placeholder,
            &inputs.category,
        )
        .map_err(Phase::Inputs.of())?;
        let (mut state, losses) = match resume {
            Some(Checkpoint::Stage2 {
                embedding, losses, ..
            }) => return Ok((self.stored_embedding(embedding)?, losses.clone())),
            Some(Checkpoint::Stage1 {
                tensors,
                scalars,
                losses,
            }) => {
                let state = stage1
                    .restore_state(self.get_tensors(tensors)?, scalars)
                    .map_err(Phase::Training.of())?;
                (state, losses.clone())
            }
            None => {
                let state = stage1.init_state().map_err(Phase::Inputs.of())?;
                (state, LossHistory::default())
            }
        };
        let pipeline = Pipeline {
            tokenizer: &inputs.tokenizer,
            text_encoder: &model.text_encoder,
            unet: &model.unet,
            vae: &model.vae,
            scheduler: &model.folder.scheduler,
        };
        let previewer = Previewer::new(inputs, pipeline);
        let num_train_timesteps = model.schedule.num_train_timesteps();
        let losses = self.run_stage1(
            &stage1,
            &mut state,
            inputs,
            losses,
            num_train_timesteps,
            previewer.as_ref(),
        )?;
        Ok((state.embedding.detach().copy(), losses))
    }

    /// The stage-1 result a stage-2 checkpoint names.
    fn stored_embedding(&self, key: &str) -> Result<Tensor, JobFailure> {
        let (_, vector) = self
            .get_tensors(key)?
            .pop()
            .ok_or_else(|| JobFailure::Failed("stage-2 checkpoint lacks the embedding".into()))?;
        Ok(vector)
    }

    /// Steps stage 1 from `state` to its last step, checkpointing as it goes.
    fn run_stage1(
        &self,
        stage1: &Stage1<'_>,
        state: &mut Stage1State,
        inputs: &Inputs,
        mut losses: LossHistory,
        num_train_timesteps: usize,
        previewer: Option<&Previewer<'_>>,
    ) -> Result<LossHistory, JobFailure> {
        let config = stage1.config();
        let device = state.embedding.device();
        let shape = self.batch_shape(config.batch_size, num_train_timesteps);
        let seed = self.spec.training.seed;
        // The embedding and its optimizer moments: a few KB.
        self.start_cadence(0);
        while state.step < config.steps {
            let batch = inputs
                .photos
                .stage1_batch(seed, state.step, &shape, config.prompt_set.len(), device)
                .map_err(Phase::Training.of())?;
            let step = stage1.step(state, &batch).map_err(Phase::Training.of())?;
            let reported = reported_losses(&step);
            for (term, value) in &reported {
                losses
                    .stage1
                    .entry(term.to_string())
                    .or_default()
                    .push(*value as f32);
            }
            let state = &*state;
            self.after_step(
                Stage::Embedding,
                (state.step, config.steps),
                &reported,
                previewer.map(|p| (p, &state.embedding)),
                || {
                    let (tensors, scalars) = state.checkpoint();
                    Ok(Checkpoint::Stage1 {
                        tensors: self
                            .put_tensors(&format!("stage1-{:06}", state.step), &tensors)?,
                        scalars,
                        losses: losses.clone(),
                    })
                },
            )?;
        }
        Ok(losses)
    }
}

/// A step's losses by name, the context terms only when they ran.
fn reported_losses(step: &Stage1StepLosses) -> Vec<(&'static str, f64)> {
    let mut reported = vec![("total", step.total), ("diffusion", step.diffusion)];
    reported.extend(step.embedding.map(|v| ("embedding", v)));
    reported.extend(step.attention.map(|v| ("attention", v)));
    reported
}
