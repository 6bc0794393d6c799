//! The concept manifest: the one object a reader trusts. It lists every blob of a
//! concept with its size and SHA-256, and records what is needed to reproduce or
//! audit the concept: the base model's identity and content hash, the placeholder
//! token and super-category, every hyper-parameter, the seed, the software version,
//! the loss history and what kind of U-Net delta was stored (with its error).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::artifact::unet_delta::DeltaSummary;
use crate::model::ModelFolder;
use crate::store::BlobRef;
use crate::{Error, Result};

/// The manifest layout this build writes and reads.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// The roles of a concept's blobs in [`Manifest::blobs`].
pub mod roles {
    /// diffusers' `learned_embeds.safetensors`.
    pub const EMBEDDING: &str = "embedding";
    /// The AUTOMATIC1111-compatible export of the same embedding.
    pub const EMBEDDING_A1111: &str = "embedding_a1111";
    /// The fine-tuned U-Net as a delta from the base.
    pub const UNET_DELTA: &str = "unet_delta";
    /// The training images' VAE latents, for test-time optimization.
    pub const TRAINING_LATENTS: &str = "training_latents";
    /// Every role a complete concept has.
    pub const ALL: [&str; 4] = [EMBEDDING, EMBEDDING_A1111, UNET_DELTA, TRAINING_LATENTS];
}

/// Per-step losses of both stages, by term (e.g. `total`, `diffusion`, `embedding`,
/// `attention`): compact arrays rather than one record per step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LossHistory {
    pub stage1: BTreeMap<String, Vec<f32>>,
    pub stage2: BTreeMap<String, Vec<f32>>,
}

impl LossHistory {
    /// A NaN or infinite loss means a broken run, whose artifact must not be written
    /// (JSON cannot hold such values either).
    pub fn check_finite(&self) -> Result<()> {
        for (stage, terms) in [("stage 1", &self.stage1), ("stage 2", &self.stage2)] {
            for (term, values) in terms {
                if let Some(step) = values.iter().position(|v| !v.is_finite()) {
                    return Err(Error::InvalidInput(format!(
                        "{stage} loss `{term}` is {} at step {step}",
                        values[step]
                    )));
                }
            }
        }
        Ok(())
    }
}

/// One file of the base model and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashedFile {
    /// Relative to the model folder, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Which base model a concept was trained on: its folder name, the `_name_or_path`
/// its configs carry (if any), and a content hash over its weights and configs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModelIdentity {
    pub name: String,
    pub name_or_path: Option<String>,
    /// SHA-256 over the sorted `path size sha256` lines of [`BaseModelIdentity::files`]:
    /// two folders with the same files have the same hash wherever they live.
    pub sha256: String,
    pub files: Vec<HashedFile>,
}

/// The identity of the model in `folder`: every safetensors file and `config.json` of
/// `text_encoder/`, `unet/` and `vae/`, the tokenizer files, the scheduler config and
/// `model_index.json`, each hashed while streaming (a 5 GB model is never in memory).
pub fn base_model_identity(folder: &ModelFolder) -> Result<BaseModelIdentity> {
    let root = &folder.root;
    let mut relative: Vec<String> = vec![
        "model_index.json".to_owned(),
        "scheduler/scheduler_config.json".to_owned(),
    ];
    for component in ["text_encoder", "unet", "vae"] {
        let weights = files_in(root, component, |name| name.ends_with(".safetensors"))?;
        if weights.is_empty() {
            return Err(Error::weights(
                root.join(component),
                "no safetensors weights to identify the base model by",
            ));
        }
        relative.extend(weights);
        relative.push(format!("{component}/config.json"));
    }
    relative.extend(files_in(root, "tokenizer", |_| true)?);
    relative.sort();

    let mut files = Vec::with_capacity(relative.len());
    let mut listing = Sha256::new();
    for path in relative {
        let (size, sha256) = hash_file(&root.join(&path))?;
        listing.update(format!("{path} {size} {sha256}\n"));
        files.push(HashedFile { path, size, sha256 });
    }
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(BaseModelIdentity {
        name,
        name_or_path: name_or_path(root),
        sha256: hex::encode(listing.finalize()),
        files,
    })
}

/// `component/<file>` for the regular files of `root/component` that `keep` accepts.
fn files_in(root: &Path, component: &str, keep: impl Fn(&str) -> bool) -> Result<Vec<String>> {
    let dir = root.join(component);
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let is_file = entry
            .file_type()
            .map_err(|e| Error::io(entry.path(), e))?
            .is_file();
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_file && keep(&name) {
            found.push(format!("{component}/{name}"));
        }
    }
    Ok(found)
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(|e| Error::io(path, e))?;
        if read == 0 {
            break;
        }
        size += read as u64;
        hasher.update(&buffer[..read]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// The hub id or path the model was saved from, as diffusers and transformers record
/// it in `_name_or_path`; absent in freshly made folders.
fn name_or_path(root: &Path) -> Option<String> {
    [
        "model_index.json",
        "unet/config.json",
        "text_encoder/config.json",
        "vae/config.json",
    ]
    .iter()
    .find_map(|file| {
        let text = std::fs::read(root.join(file)).ok()?;
        let value: serde_json::Value = serde_json::from_slice(&text).ok()?;
        let name = value.get("_name_or_path")?.as_str()?.trim();
        (!name.is_empty()).then(|| name.to_owned())
    })
}

/// Everything a reader needs to find, verify and interpret a concept's blobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub concept: String,
    pub version: String,
    /// The placeholder token, e.g. `<my-dog>`.
    pub token: String,
    /// The super-category word the embedding started from, e.g. `dog`.
    pub super_category: String,
    pub base_model: BaseModelIdentity,
    /// Role (see [`roles`]) → blob.
    pub blobs: BTreeMap<String, BlobRef>,
    /// Every hyper-parameter of the run, as the trainer records them.
    pub hyper_parameters: serde_json::Value,
    pub seed: u64,
    /// The `coreg` version that wrote the concept.
    pub software_version: String,
    pub losses: LossHistory,
    pub unet_delta: DeltaSummary,
    pub created_at: DateTime<Utc>,
    /// The training job that published this version, when a job did: a job that finds
    /// its own manifest already there (it died after publishing) knows it is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

impl Manifest {
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self)
            .map_err(|e| Error::InvalidInput(format!("serializing the manifest: {e}")))
    }

    /// Parses a manifest read from `path`; malformed JSON or a format this build does
    /// not know is an [`Error::CorruptArtifact`].
    pub fn from_json(path: &str, bytes: &[u8]) -> Result<Manifest> {
        let corrupt = |message: String| Error::CorruptArtifact {
            path: path.to_owned(),
            message,
        };
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not a manifest: {e}")))?;
        if manifest.format_version != MANIFEST_FORMAT_VERSION {
            return Err(corrupt(format!(
                "manifest format version {} (this build reads {MANIFEST_FORMAT_VERSION})",
                manifest.format_version
            )));
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_must_be_finite() {
        let mut losses = LossHistory::default();
        losses.stage1.insert("total".into(), vec![0.5, 0.4]);
        losses.check_finite().unwrap();
        losses
            .stage2
            .insert("diffusion".into(), vec![0.1, f32::NAN]);
        let err = losses.check_finite().unwrap_err().to_string();
        assert!(err.contains("stage 2") && err.contains("step 1"), "{err}");
    }

    #[test]
    fn file_hashes_are_sha256_of_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello").unwrap();
        let (size, digest) = hash_file(&path).unwrap();
        assert_eq!(size, 5);
        assert_eq!(
            digest,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }
}
