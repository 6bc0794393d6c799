//! The end of a job: the concept's artifacts (S*, the U-Net delta from the base, the
//! photos' latents for test-time optimization, the manifest) written to the store with
//! the manifest last, then `jobs/<id>/result.json` naming it and the checkpoints
//! dropped. A run that finds `result.json` is done.

use bytes::Bytes;
use coreg::artifact::{
    base_model_identity, unet_delta, write_concept, ConceptArtifacts, LearnedEmbedding,
    LossHistory, UNetDelta,
};
use coreg::base_model::BaseModel;
use tch::{Device, Tensor};

use super::failure::Phase;
use super::inputs::Inputs;
use super::Job;
use crate::exit::JobFailure;

impl Job<'_> {
    /// Writes the concept trained into `model` with `embedding`; returns a summary.
    pub(super) fn publish(
        &self,
        model: &BaseModel,
        inputs: &Inputs,
        embedding: &Tensor,
        losses: LossHistory,
    ) -> Result<String, JobFailure> {
        crate::failpoint::hit("writing");
        let artifacts = self.artifacts(model, inputs, embedding, losses)?;
        let concept = &self.spec.concept;
        let version = concept.version.clone().unwrap_or_else(|| self.id.clone());
        crate::failpoint::hit("before-manifest");
        let written = self
            .block_on(write_concept(
                &self.store,
                &concept.name,
                &version,
                artifacts,
            ))
            .map_err(Phase::Training.of())?;
        crate::failpoint::hit("after-manifest");
        self.finish(&written.path)?;
        Ok(format!(
            "wrote {} (sha256 {})",
            written.path, written.sha256
        ))
    }

    /// Everything the concept's version holds.
    fn artifacts(
        &self,
        model: &BaseModel,
        inputs: &Inputs,
        embedding: &Tensor,
        losses: LossHistory,
    ) -> Result<ConceptArtifacts, JobFailure> {
        let training = Phase::Training.of();
        let tuned = unet_delta::snapshot(&model.unet.vars, Device::Cpu).map_err(&training)?;
        let base = model.base_unet();
        let unet_delta = match self.spec.stage2.delta_rank {
            Some(rank) => UNetDelta::low_rank(base, &tuned, rank as i64),
            None => UNetDelta::exact(base, &tuned),
        }
        .map_err(&training)?;
        let resolution = self.spec.training.resolution;
        Ok(ConceptArtifacts {
            embedding: LearnedEmbedding::new(&inputs.placeholder, embedding).map_err(&training)?,
            unet_delta,
            training_latents: inputs.photos.centre_crop_latents(&model.vae, resolution),
            super_category: inputs.category.clone(),
            base_model: base_model_identity(&model.folder).map_err(&training)?,
            hyper_parameters: self.hyper_parameters(&inputs.stage1, &inputs.stage2)?,
            seed: self.spec.training.seed,
            losses,
        })
    }

    /// Records the result and drops the checkpoints, which the concept supersedes.
    fn finish(&self, manifest: &str) -> Result<(), JobFailure> {
        let result = serde_json::json!({ "manifest": manifest });
        self.block_on(
            self.store
                .put_overwrite(&self.key("result.json"), Bytes::from(result.to_string())),
        )
        .map_err(Phase::Training.of())?;
        self.discard_checkpoints()
    }

    /// The manifest a finished run of this job wrote, if any.
    pub(super) fn finished(&self) -> Result<Option<String>, JobFailure> {
        match self.block_on(self.store.get(&self.key("result.json"))) {
            Ok(bytes) => {
                let value: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| JobFailure::Failed(format!("unreadable job result: {e}")))?;
                Ok(value["manifest"].as_str().map(str::to_owned))
            }
            Err(coreg::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Phase::Training.classify(e)),
        }
    }
}
