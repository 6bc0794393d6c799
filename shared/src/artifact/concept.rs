//! A concept in the object store: its blobs, content-addressed under
//! `blobs/sha256/<hex>`, and its manifest at `concepts/<name>/<version>/manifest.json`.
//!
//! Writing puts every blob first (create-only; an identical blob already there is
//! verified and reused) and the manifest **last**, create-only. A writer that dies in
//! between leaves only unreferenced blobs: no half-written concept is ever visible,
//! and an existing version is never overwritten. Readers trust only manifests and
//! verify every blob's size and digest.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use chrono::Utc;
use tch::{Device, Kind, Tensor};

use crate::artifact::embedding::LearnedEmbedding;
use crate::artifact::manifest::{
    roles, BaseModelIdentity, LossHistory, Manifest, MANIFEST_FORMAT_VERSION,
};
use crate::artifact::tensor_file::{self, corrupt};
use crate::artifact::unet_delta::{DeltaSummary, UNetDelta};
use crate::store::{BlobRef, CreateOutcome, Store};
use crate::{Error, Result};

/// Where manifests live, relative to the store's prefix.
pub const CONCEPTS_PREFIX: &str = "concepts";
const MANIFEST_FILE: &str = "manifest.json";
const LATENTS_KEY: &str = "latents";
const MAX_NAME_LEN: usize = 64;

/// Checks a concept name: 1–64 characters of `a-z 0-9 . _ -`, starting with a letter
/// or digit, without `..`. Names become object-store path segments, so this is what
/// keeps a request from reaching outside its concept's folder.
pub fn validate_concept_name(name: &str) -> Result<()> {
    validate_segment("concept name", name)
}

/// Checks a concept version, with the same rules as [`validate_concept_name`].
pub fn validate_concept_version(version: &str) -> Result<()> {
    validate_segment("concept version", version)
}

fn validate_segment(what: &str, value: &str) -> Result<()> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
    let starts_well = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if starts_well
        && value.len() <= MAX_NAME_LEN
        && value.chars().all(allowed)
        && !value.contains("..")
    {
        return Ok(());
    }
    // Echo at most a prefix: the value may be long or hostile.
    let shown: String = value.chars().take(MAX_NAME_LEN).collect();
    let ellipsis = if value.chars().count() > MAX_NAME_LEN {
        "…"
    } else {
        ""
    };
    Err(Error::InvalidInput(format!(
        "{what} {shown:?}{ellipsis} ({} characters) is not allowed: use 1–{MAX_NAME_LEN} \
         characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit, \
         without '..'",
        value.chars().count()
    )))
}

/// The path of a concept version's manifest, relative to the store's prefix.
pub fn manifest_path(name: &str, version: &str) -> Result<String> {
    validate_concept_name(name)?;
    validate_concept_version(version)?;
    Ok(format!(
        "{CONCEPTS_PREFIX}/{name}/{version}/{MANIFEST_FILE}"
    ))
}

/// What a finished training run hands over to be stored.
#[derive(Debug)]
pub struct ConceptArtifacts {
    /// The learned S* (its token is the concept's placeholder token).
    pub embedding: LearnedEmbedding,
    pub unet_delta: UNetDelta,
    /// The training images' VAE latents `[N, C, h, w]`, for test-time optimization.
    pub training_latents: Tensor,
    pub super_category: String,
    pub base_model: BaseModelIdentity,
    pub hyper_parameters: serde_json::Value,
    pub seed: u64,
    pub losses: LossHistory,
}

/// A written concept: where its manifest is, its digest, and its content.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestRef {
    pub path: String,
    pub sha256: String,
    pub manifest: Manifest,
}

/// A concept read back and verified.
#[derive(Debug)]
pub struct LoadedConcept {
    pub manifest: Manifest,
    pub embedding: LearnedEmbedding,
    pub unet_delta: UNetDelta,
    /// `[N, C, h, w]` fp32 on the CPU.
    pub training_latents: Tensor,
}

/// Writes a concept version: blobs first, manifest last (see the module doc). An
/// existing version is [`Error::AlreadyExists`]; NaN/Inf losses or latents are
/// refused before anything is written.
///
/// Takes the artifacts by value and encodes them before the first await, so the
/// future holds only bytes and can be sent between threads.
pub async fn write_concept(
    store: &Store,
    name: &str,
    version: &str,
    artifacts: ConceptArtifacts,
) -> Result<ManifestRef> {
    let path = manifest_path(name, version)?;
    let staged = StagedConcept::encode(artifacts)?;
    if store.exists(&path).await? {
        return Err(already_exists(name, version));
    }
    staged
        .put_blobs(store)
        .await?
        .publish(store, name, version, None)
        .await
}

/// A concept on its way into the store, in two steps a caller can stand between: the
/// blobs ([`StagedConcept::put_blobs`], harmless to repeat or abandon, since they are
/// content-addressed and unreferenced until published), then the manifest
/// ([`BlobsWritten::publish`], the one step that makes the version exist).
pub struct StagedConcept {
    encoded: EncodedConcept,
    /// Kept as tensors: it is written straight from them.
    unet_delta: UNetDelta,
}

/// A concept whose blobs are all stored: only its manifest is left to write.
pub struct BlobsWritten {
    encoded: EncodedConcept,
    blobs: BTreeMap<String, BlobRef>,
}

impl StagedConcept {
    /// Checks and encodes `artifacts`; no tensor is kept.
    pub fn encode(artifacts: ConceptArtifacts) -> Result<StagedConcept> {
        let (encoded, unet_delta) = EncodedConcept::new(artifacts)?;
        Ok(StagedConcept {
            encoded,
            unet_delta,
        })
    }

    /// Stores every blob (an identical blob already there is verified and reused).
    /// The U-Net delta — 3.4 GB for SD 2.1's exact delta — streams from its tensors
    /// in parts ([`Store::put_blob_streamed`]); the others are small.
    pub async fn put_blobs(self, store: &Store) -> Result<BlobsWritten> {
        let mut blobs = BTreeMap::new();
        for (role, bytes) in &self.encoded.blobs {
            blobs.insert((*role).to_owned(), store.put_blob(bytes.clone()).await?);
        }
        let file = {
            let (named, metadata) = self.unet_delta.layout()?;
            tensor_file::TensorFile::new(&named, metadata)?
        };
        let delta = store
            .put_blob_streamed(move || Ok(Box::new(file.reader())))
            .await?;
        blobs.insert(roles::UNET_DELTA.to_owned(), delta);
        Ok(BlobsWritten {
            encoded: self.encoded,
            blobs,
        })
    }
}

impl BlobsWritten {
    /// Writes the manifest, create-only, recording `job` as the version's publisher.
    ///
    /// Publication is idempotent for a job: if the version exists and its manifest
    /// names the same `job` (an earlier attempt published it and died before saying
    /// so), that manifest is returned as written. Any other existing version is
    /// [`Error::AlreadyExists`].
    pub async fn publish(
        self,
        store: &Store,
        name: &str,
        version: &str,
        job: Option<&str>,
    ) -> Result<ManifestRef> {
        let path = manifest_path(name, version)?;
        let encoded = self.encoded;
        let manifest = Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            concept: name.to_owned(),
            version: version.to_owned(),
            token: encoded.token,
            super_category: encoded.super_category,
            base_model: encoded.base_model,
            blobs: self.blobs,
            hyper_parameters: encoded.hyper_parameters,
            seed: encoded.seed,
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            losses: encoded.losses,
            unet_delta: encoded.unet_delta,
            created_at: Utc::now(),
            job: job.map(str::to_owned),
        };
        let bytes = Bytes::from(manifest.to_json()?);
        let digest = BlobRef::of(&bytes).sha256;
        match store.put_create_only(&path, bytes).await? {
            CreateOutcome::Created => Ok(ManifestRef {
                path,
                sha256: digest,
                manifest,
            }),
            CreateOutcome::AlreadyExists => match job {
                Some(job) => published_by(store, name, version, job)
                    .await?
                    .ok_or_else(|| already_exists(name, version)),
                None => Err(already_exists(name, version)),
            },
        }
    }
}

/// The version's manifest if it exists and `job` published it; `None` if the version
/// does not exist. A version published by anything else is [`Error::AlreadyExists`].
pub async fn published_by(
    store: &Store,
    name: &str,
    version: &str,
    job: &str,
) -> Result<Option<ManifestRef>> {
    let path = manifest_path(name, version)?;
    let bytes = match store.get(&path).await {
        Ok(bytes) => bytes,
        Err(Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let manifest = Manifest::from_json(&path, &bytes)?;
    if manifest.job.as_deref() != Some(job) {
        return Err(already_exists(name, version));
    }
    Ok(Some(ManifestRef {
        sha256: BlobRef::of(&bytes).sha256,
        path,
        manifest,
    }))
}

/// The artifacts as blob bytes and manifest fields, all but the U-Net delta (see
/// [`StagedConcept`]).
struct EncodedConcept {
    blobs: Vec<(&'static str, Bytes)>,
    token: String,
    super_category: String,
    base_model: BaseModelIdentity,
    hyper_parameters: serde_json::Value,
    seed: u64,
    losses: LossHistory,
    unet_delta: DeltaSummary,
}

impl EncodedConcept {
    fn new(artifacts: ConceptArtifacts) -> Result<(EncodedConcept, UNetDelta)> {
        let ConceptArtifacts {
            embedding,
            unet_delta,
            training_latents,
            super_category,
            base_model,
            hyper_parameters,
            seed,
            losses,
        } = artifacts;
        losses.check_finite()?;
        if super_category.trim().is_empty() {
            return Err(Error::InvalidInput(
                "the super-category is empty".to_owned(),
            ));
        }
        let latents = checked_latents(&training_latents).map_err(Error::InvalidInput)?;
        let blobs = vec![
            (
                roles::EMBEDDING,
                Bytes::from(embedding.to_learned_embeds()?),
            ),
            (roles::EMBEDDING_A1111, Bytes::from(embedding.to_a1111()?)),
            (
                roles::TRAINING_LATENTS,
                Bytes::from(tensor_file::encode(
                    &[(LATENTS_KEY.to_owned(), &latents)],
                    Default::default(),
                )?),
            ),
        ];
        let encoded = EncodedConcept {
            blobs,
            token: embedding.token().to_owned(),
            super_category,
            base_model,
            hyper_parameters,
            seed,
            losses,
            unet_delta: unet_delta.summary(),
        };
        Ok((encoded, unet_delta))
    }
}

/// Reads a concept version's manifest, without fetching its blobs (for listing and
/// inspection). An absent version is [`Error::NotFound`].
pub async fn read_manifest(store: &Store, name: &str, version: &str) -> Result<Manifest> {
    let path = manifest_path(name, version)?;
    let bytes = match store.get(&path).await {
        Ok(bytes) => bytes,
        Err(Error::NotFound { .. }) => {
            return Err(Error::NotFound {
                what: format!("concept `{name}` version `{version}`"),
            })
        }
        Err(e) => return Err(e),
    };
    let manifest = Manifest::from_json(&path, &bytes)?;
    if manifest.concept != name || manifest.version != version {
        return Err(corrupt(
            &path,
            format!(
                "the manifest describes concept `{}` version `{}`",
                manifest.concept, manifest.version
            ),
        ));
    }
    Ok(manifest)
}

/// Reads a concept version and verifies it: every blob the manifest lists must exist
/// with its recorded size and SHA-256 (else [`Error::CorruptArtifact`]), and decode
/// consistently with the manifest.
pub async fn read_concept(store: &Store, name: &str, version: &str) -> Result<LoadedConcept> {
    let manifest = read_manifest(store, name, version).await?;
    let path = manifest_path(name, version)?;
    for role in roles::ALL {
        if !manifest.blobs.contains_key(role) {
            return Err(corrupt(
                &path,
                format!("the manifest lists no `{role}` blob"),
            ));
        }
    }
    // The U-Net delta (3.4 GB exact at full size) is read in verified ranges straight
    // into its tensors; the other blobs are small and read whole.
    let mut contents = BTreeMap::new();
    for (role, blob) in &manifest.blobs {
        if role != roles::UNET_DELTA {
            contents.insert(role.as_str(), store.get_blob(blob).await?);
        }
    }
    let at = |role: &str| -> (&str, &Bytes) { (&manifest.blobs[role].path, &contents[role]) };

    let (blob_path, bytes) = at(roles::EMBEDDING);
    let embedding =
        LearnedEmbedding::from_learned_embeds(bytes).map_err(|e| relabel(e, blob_path))?;
    if embedding.token() != manifest.token {
        return Err(corrupt(
            blob_path,
            format!(
                "the embedding is for token {:?}, the manifest says {:?}",
                embedding.token(),
                manifest.token
            ),
        ));
    }
    let (blob_path, bytes) = at(roles::EMBEDDING_A1111);
    let exported =
        LearnedEmbedding::from_a1111(&manifest.token, bytes).map_err(|e| relabel(e, blob_path))?;
    if !exported.vector().equal(&embedding.vector()) {
        return Err(corrupt(
            blob_path,
            "the AUTOMATIC1111 export differs from the embedding",
        ));
    }

    let blob = &manifest.blobs[roles::UNET_DELTA];
    let blob_path = &blob.path;
    let unet_delta = UNetDelta::read_blob(store, blob)
        .await
        .map_err(|e| relabel(e, blob_path))?;
    if !same_delta_kind(&unet_delta.summary(), &manifest.unet_delta) {
        return Err(corrupt(
            blob_path,
            "the U-Net delta's kind, rank or size differs from the manifest's",
        ));
    }

    let (blob_path, bytes) = at(roles::TRAINING_LATENTS);
    let (mut tensors, _) = tensor_file::decode(blob_path, bytes)?;
    let latents = match (tensors.remove(LATENTS_KEY), tensors.is_empty()) {
        (Some(latents), true) if latents.kind() == Kind::Float => latents,
        _ => {
            return Err(corrupt(
                blob_path,
                format!("expected one fp32 tensor `{LATENTS_KEY}`"),
            ))
        }
    };
    let training_latents = checked_latents(&latents).map_err(|m| corrupt(blob_path, m))?;
    Ok(LoadedConcept {
        manifest,
        embedding,
        unet_delta,
        training_latents,
    })
}

/// The names of the concepts that have at least one complete (manifested) version,
/// sorted.
pub async fn list_concepts(store: &Store) -> Result<Vec<String>> {
    let names: BTreeSet<String> = manifested(store, CONCEPTS_PREFIX)
        .await?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    Ok(names.into_iter().collect())
}

/// The complete versions of concept `name`, sorted as strings.
pub async fn list_versions(store: &Store, name: &str) -> Result<Vec<String>> {
    validate_concept_name(name)?;
    let versions: BTreeSet<String> = manifested(store, &format!("{CONCEPTS_PREFIX}/{name}"))
        .await?
        .into_iter()
        .filter(|(found, _)| found == name)
        .map(|(_, version)| version)
        .collect();
    Ok(versions.into_iter().collect())
}

/// (name, version) of every `concepts/<name>/<version>/manifest.json` under `prefix`
/// whose name and version are valid; anything else in the folder is ignored.
async fn manifested(store: &Store, prefix: &str) -> Result<Vec<(String, String)>> {
    Ok(store
        .list(prefix)
        .await?
        .into_iter()
        .filter_map(|object| {
            let mut parts = object.path.split('/');
            match (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) {
                (Some(CONCEPTS_PREFIX), Some(name), Some(version), Some(MANIFEST_FILE), None)
                    if validate_concept_name(name).is_ok()
                        && validate_concept_version(version).is_ok() =>
                {
                    Some((name.to_owned(), version.to_owned()))
                }
                _ => None,
            }
        })
        .collect())
}

fn already_exists(name: &str, version: &str) -> Error {
    Error::AlreadyExists {
        what: format!("concept `{name}` version `{version}`"),
    }
}

/// Points a decoding error at the blob it came from.
fn relabel(error: Error, blob_path: &str) -> Error {
    match error {
        Error::CorruptArtifact { path, message } if path != blob_path => Error::CorruptArtifact {
            path: blob_path.to_owned(),
            message: format!("{path}: {message}"),
        },
        other => other,
    }
}

fn same_delta_kind(a: &DeltaSummary, b: &DeltaSummary) -> bool {
    match (a, b) {
        (DeltaSummary::Exact { parameters: p }, DeltaSummary::Exact { parameters: q }) => p == q,
        (
            DeltaSummary::LowRank {
                rank: r,
                parameters: p,
                ..
            },
            DeltaSummary::LowRank {
                rank: s,
                parameters: q,
                ..
            },
        ) => r == s && p == q,
        _ => false,
    }
}

/// `[N, C, h, w]` float latents with finite values, as an fp32 CPU tensor.
fn checked_latents(latents: &Tensor) -> std::result::Result<Tensor, String> {
    let shape = latents.size();
    if shape.len() != 4 || shape.contains(&0) || !latents.is_floating_point() {
        return Err(format!(
            "training latents must be a non-empty float [N, C, h, w] tensor, got {:?} {shape:?}",
            latents.kind()
        ));
    }
    let latents = latents
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    if latents.isfinite().all().int64_value(&[]) != 1 {
        return Err("training latents hold NaN or infinite values".to_owned());
    }
    Ok(latents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_use_a_safe_character_set() {
        for good in ["dog", "my-dog_2", "a", "v1.2.3", &"x".repeat(64)] {
            validate_concept_name(good).unwrap();
        }
        let long = "x".repeat(300);
        for bad in [
            "", "../x", "..", "a/b", "a..b", "Dog", "-dog", ".hidden", "dög", &long,
        ] {
            let err = validate_concept_name(bad).unwrap_err().to_string();
            assert!(err.contains("concept name"), "{bad}: {err}");
        }
        let err = validate_concept_name(&long).unwrap_err().to_string();
        assert!(err.contains("300 characters") && err.len() < 400, "{err}");
        assert!(validate_concept_version("v/1").is_err());
    }

    #[test]
    fn write_concept_futures_can_move_between_threads() {
        fn assert_send<T: Send>(_: &T) {}
        let store = Store::open("memory:///", Vec::<(String, String)>::new()).unwrap();
        let artifacts = ConceptArtifacts {
            embedding: LearnedEmbedding::new("<t>", &Tensor::ones([4], (Kind::Float, Device::Cpu)))
                .unwrap(),
            unet_delta: UNetDelta::empty(),
            training_latents: Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu)),
            super_category: "dog".into(),
            base_model: BaseModelIdentity {
                name: "m".into(),
                name_or_path: None,
                sha256: String::new(),
                files: vec![],
            },
            hyper_parameters: serde_json::Value::Null,
            seed: 0,
            losses: LossHistory::default(),
        };
        let future = write_concept(&store, "c", "1", artifacts);
        assert_send(&future);
        drop(future);
        assert_send(&read_concept(&store, "c", "1"));
    }
}
