//! The end of a job: the concept's artifacts (S*, the U-Net delta from the base, the
//! photos' latents for test-time optimization, the manifest) written to the store with
//! the manifest last, then `jobs/<id>/result.json` naming it and the checkpoints
//! dropped. A run that finds `result.json` is done; so is one that finds the
//! concept's manifest naming this job (an earlier run died between the two).
//!
//! Cancellation and the lease are checked once more between the blobs and the
//! manifest: blobs are harmless to leave (content-addressed, unreferenced), the
//! manifest is what makes the version exist.

use bytes::Bytes;
use coreg::artifact::{
    base_model_identity, published_by, unet_delta, ConceptArtifacts, LearnedEmbedding, LossHistory,
    StagedConcept, UNetDelta,
};
use coreg::base_model::BaseModel;
use tch::{Device, Tensor};

use super::failure::Phase;
use super::inputs::Inputs;
use super::{Job, Stage};
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
        self.control.step(Stage::Writing, 0, 1, &[]);
        crate::failpoint::hit("writing");
        let training = Phase::Training.of();
        let staged = StagedConcept::encode(self.artifacts(model, inputs, embedding, losses)?)
            .map_err(&training)?;
        let blobs = self
            .block_on(staged.put_blobs(&self.store))
            .map_err(&training)?;
        crate::failpoint::hit("before-manifest");
        // A cancel or shutdown that came while the blobs were written still counts.
        if self.shutting_down()? {
            return Err(JobFailure::Interrupted(
                "stopped before publishing; run the job again to resume".into(),
            ));
        }
        self.fence()?;
        let version = self.version();
        let written = self
            .block_on(blobs.publish(
                &self.store,
                &self.spec.concept.name,
                &version,
                Some(&self.id),
            ))
            .map_err(&training)?;
        crate::failpoint::hit("after-manifest");
        self.finish(&written.path)?;
        self.control.step(Stage::Writing, 1, 1, &[]);
        Ok(format!(
            "wrote {} (sha256 {})",
            written.path, written.sha256
        ))
    }

    /// The concept version the job publishes.
    fn version(&self) -> String {
        self.spec
            .concept
            .version
            .clone()
            .unwrap_or_else(|| self.id.clone())
    }

    /// The manifest of the job's concept version if this job already published it;
    /// a version another job published is refused as bad input.
    pub(super) fn published(&self) -> Result<Option<String>, JobFailure> {
        let name = &self.spec.concept.name;
        self.block_on(published_by(&self.store, name, &self.version(), &self.id))
            .map(|found| found.map(|manifest| manifest.path))
            .map_err(Phase::Inputs.of())
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
    pub(super) fn finish(&self, manifest: &str) -> Result<(), JobFailure> {
        let result = serde_json::json!({ "manifest": manifest });
        self.fence()?;
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
