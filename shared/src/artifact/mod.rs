//! What a training run leaves behind, as stored in the object store: the learned
//! embedding (diffusers' `learned_embeds` layout, plus an AUTOMATIC1111 export), the
//! fine-tuned U-Net as a delta from the base model, and the manifest that lists and
//! verifies them. [`concept`] writes and reads a whole concept version.

pub mod concept;
pub mod embedding;
pub mod manifest;
pub mod tensor_file;
pub mod unet_delta;

pub use concept::{
    list_concepts, list_versions, manifest_path, published_by, read_concept, read_manifest,
    validate_concept_name, validate_concept_version, write_concept, BlobsWritten, ConceptArtifacts,
    LoadedConcept, ManifestRef, StagedConcept,
};
pub use embedding::LearnedEmbedding;
pub use manifest::{base_model_identity, BaseModelIdentity, LossHistory, Manifest};
pub use unet_delta::{DeltaSummary, UNetDelta};
