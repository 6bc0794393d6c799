//! The job's stage 2: every U-Net weight fine-tuned with S* frozen (coreg's
//! `method::stage2`), from the start or from a stage-2 checkpoint. `stage2.steps = 0`
//! skips it.

use coreg::artifact::LossHistory;
use coreg::base_model::BaseModel;
use coreg::generate::Pipeline;
use coreg::method::stage2::{Stage2, Stage2Models, Stage2State};
use tch::Tensor;

use super::checkpoint::Checkpoint;
use super::failure::Phase;
use super::inputs::Inputs;
use super::previews::Previewer;
use super::{Job, Stage};
use crate::exit::JobFailure;

impl Job<'_> {
    /// Fine-tunes `model`'s U-Net in place; returns the loss history with stage 2's
    /// losses added.
    pub(super) fn fine_tune_unet(
        &self,
        model: &mut BaseModel,
        inputs: &Inputs,
        embedding: &Tensor,
        losses: LossHistory,
        resume: Option<Checkpoint>,
    ) -> Result<LossHistory, JobFailure> {
        if inputs.stage2.steps == 0 {
            return Ok(losses);
        }
        // From here the U-Net differs from the base until `BaseModel::restore_unet`.
        model.mark_unet_trained();
        let embedding_blob = self.put_tensors(
            "embedding",
            &[("embedding".into(), embedding.shallow_clone())],
        )?;
        let models = Stage2Models {
            text_encoder: &model.text_encoder,
            unet: &mut model.unet,
            unet_config: &model.folder.unet,
            vae: &model.vae,
            schedule: &model.schedule,
            prediction_type: model.folder.scheduler.prediction_type,
        };
        let stage2 = Stage2::new(
            inputs.stage2,
            models,
            &inputs.tokenizer,
            &inputs.placeholder,
            embedding,
        )
        .map_err(Phase::Inputs.of())?;
        let (mut state, losses) = match resume {
            Some(Checkpoint::Stage2 {
                tensors,
                scalars,
                losses,
                ..
            }) => {
                let state = stage2
                    .restore_state(self.get_tensors(&tensors)?, &scalars)
                    .map_err(Phase::Training.of())?;
                (state, losses)
            }
            _ => (stage2.init_state().map_err(Phase::Training.of())?, losses),
        };
        let pipeline = Pipeline {
            tokenizer: &inputs.tokenizer,
            text_encoder: &model.text_encoder,
            unet: stage2.unet(),
            vae: &model.vae,
            scheduler: &model.folder.scheduler,
        };
        let previewer = Previewer::new(inputs, pipeline);
        self.run_stage2(
            &stage2,
            &mut state,
            inputs,
            losses,
            &embedding_blob,
            previewer.as_ref(),
        )
    }

    /// Steps stage 2 from `state` to its last step, checkpointing as it goes.
    fn run_stage2(
        &self,
        stage2: &Stage2<'_>,
        state: &mut Stage2State,
        inputs: &Inputs,
        mut losses: LossHistory,
        embedding_blob: &str,
        previewer: Option<&Previewer<'_>>,
    ) -> Result<LossHistory, JobFailure> {
        let config = stage2.config();
        let device = stage2.unet().vars.device();
        let shape = self.batch_shape(config.batch_size, stage2.schedule().num_train_timesteps());
        let seed = self.spec.training.seed;
        // The U-Net and AdamW's two moments, in the U-Net's precision.
        let unet_bytes: u64 = stage2
            .unet()
            .vars
            .trainable_variables()
            .iter()
            .map(|v| (v.numel() * v.kind().elt_size_in_bytes()) as u64)
            .sum();
        self.start_cadence(3 * unet_bytes);
        while state.step < config.steps {
            let batch = inputs
                .photos
                .stage2_batch(seed, state.step, &shape, device)
                .map_err(Phase::Training.of())?;
            let step = stage2.step(state, &batch).map_err(Phase::Training.of())?;
            losses
                .stage2
                .entry("diffusion".into())
                .or_default()
                .push(step.diffusion as f32);
            let state = &*state;
            self.after_step(
                Stage::UNet,
                (state.step, config.steps),
                &[("diffusion", step.diffusion)],
                previewer.map(|p| (p, stage2.concept_embedding())),
                || {
                    let (tensors, scalars) = stage2.checkpoint(state);
                    Ok(Checkpoint::Stage2 {
                        embedding: embedding_blob.to_string(),
                        tensors: self
                            .put_tensors(&format!("stage2-{:06}", state.step), &tensors)?,
                        scalars,
                        losses: losses.clone(),
                    })
                },
            )?;
        }
        Ok(losses)
    }
}
