//! The concepts the store holds, as the API sees them: resolving "the newest version",
//! loading verified concepts through the memory-budgeted cache, and manifest
//! summaries for ListConcepts/GetConcept.

use std::sync::{Arc, Mutex, OnceLock};

use coreg::artifact::manifest::Manifest;
use coreg::artifact::{list_concepts, list_versions, read_concept, read_manifest};
use coreg::store::Store;
use coreg_proto::v1 as pb;
use tonic::Status;

use crate::cache::{ConceptCache, ConceptKey, SharedConcept};

use super::metrics::Metrics;

/// A store error as the client should see it: unknown → NOT_FOUND, a blob that fails
/// its digest → DATA_LOSS (never a wrong image), an unreachable store → UNAVAILABLE.
pub fn status_of(error: coreg::Error) -> Status {
    match error {
        coreg::Error::InvalidInput(message) => Status::invalid_argument(message),
        e @ coreg::Error::NotFound { .. } => Status::not_found(e.to_string()),
        e @ coreg::Error::CorruptArtifact { .. } => Status::data_loss(e.to_string()),
        e @ coreg::Error::Store { .. } => Status::unavailable(e.to_string()),
        e => Status::internal(e.to_string()),
    }
}

pub struct Concepts {
    pub store: Store,
    cache: Mutex<ConceptCache>,
    metrics: Arc<Metrics>,
    /// The SHA-256 identity of the base model this replica serves (known once the
    /// model thread has hashed it): a concept trained on another base would render
    /// garbage, so it is refused.
    base_model_sha256: OnceLock<String>,
}

impl Concepts {
    pub fn new(store: Store, budget_bytes: u64, metrics: Arc<Metrics>) -> Self {
        Concepts {
            store,
            cache: Mutex::new(ConceptCache::new(budget_bytes)),
            metrics,
            base_model_sha256: OnceLock::new(),
        }
    }

    /// Records the identity of the base model this replica serves.
    pub fn serve_base_model(&self, sha256: String) {
        let _ = self.base_model_sha256.set(sha256);
    }

    /// Every version of `name`, oldest first by creation time (NOT_FOUND when none).
    pub async fn versions(&self, name: &str) -> Result<Vec<Manifest>, Status> {
        let names = list_versions(&self.store, name).await.map_err(status_of)?;
        let mut manifests = Vec::with_capacity(names.len());
        for version in names {
            manifests.push(
                read_manifest(&self.store, name, &version)
                    .await
                    .map_err(status_of)?,
            );
        }
        if manifests.is_empty() {
            return Err(Status::not_found(format!(
                "the store holds no concept {name:?}"
            )));
        }
        // By creation time, not by name: "v10" is newer than "v9", and job ids do not
        // sort by time at all.
        manifests.sort_by(|a, b| (a.created_at, &a.version).cmp(&(b.created_at, &b.version)));
        Ok(manifests)
    }

    /// The version a request means: the one named, or the newest.
    pub async fn resolve(&self, name: &str, version: &str) -> Result<String, Status> {
        if !version.is_empty() {
            return Ok(version.to_owned());
        }
        let mut versions = self.versions(name).await?;
        Ok(versions.pop().expect("versions() is never empty").version)
    }

    /// The verified concept, from the cache or the store (every blob's size and digest
    /// checked), refused if trained on another base model.
    pub async fn load(&self, name: &str, version: &str) -> Result<Arc<SharedConcept>, Status> {
        let key: ConceptKey = (name.to_owned(), version.to_owned());
        let cached = self.cache.lock().expect("cache lock").get(&key);
        let concept = match cached {
            Some(concept) => {
                self.metrics.cache_hits.inc();
                concept
            }
            None => {
                self.metrics.cache_misses.inc();
                let loaded = read_concept(&self.store, name, version).await;
                let concept = match loaded {
                    Ok(concept) => Arc::new(SharedConcept::new(concept)),
                    Err(e @ coreg::Error::CorruptArtifact { .. }) => {
                        // The client only sees DATA_LOSS; the operator must hear that
                        // the store holds damaged data.
                        tracing::error!(concept = name, version, error = %e, "concept failed verification");
                        return Err(status_of(e));
                    }
                    Err(e) => return Err(status_of(e)),
                };
                let mut cache = self.cache.lock().expect("cache lock");
                let evicted = cache.insert(key, concept.clone(), concept.bytes());
                if !evicted.is_empty() {
                    tracing::info!(?evicted, "concepts evicted from the cache");
                }
                self.metrics.cache_bytes.set(cache.used_bytes() as i64);
                concept
            }
        };
        let trained_on = &concept.manifest().base_model;
        let serving = self
            .base_model_sha256
            .get()
            .ok_or_else(|| Status::unavailable("the sampler is still loading its model"))?;
        if &trained_on.sha256 != serving {
            return Err(Status::failed_precondition(format!(
                "concept {name:?} version {version:?} was trained on base model {:?} \
                 (sha256 {}), this sampler serves sha256 {serving}",
                trained_on.name, trained_on.sha256
            )));
        }
        Ok(concept)
    }

    /// The concept names, sorted; for paging.
    pub async fn names(&self) -> Result<Vec<String>, Status> {
        list_concepts(&self.store).await.map_err(status_of)
    }
}

/// The proto view of a concept version, with every version the store holds.
pub fn summary(manifest: &Manifest, versions: &[Manifest]) -> pb::Concept {
    let created = manifest.created_at;
    pb::Concept {
        r#ref: Some(pb::ConceptRef {
            name: manifest.concept.clone(),
            version: manifest.version.clone(),
        }),
        token: manifest.token.clone(),
        category: manifest.super_category.clone(),
        base_model: manifest.base_model.name.clone(),
        base_model_sha256: manifest.base_model.sha256.clone(),
        versions: versions.iter().map(|m| m.version.clone()).collect(),
        create_time: Some(prost_types::Timestamp {
            seconds: created.timestamp(),
            nanos: created.timestamp_subsec_nanos() as i32,
        }),
        software_version: manifest.software_version.clone(),
        hyper_parameters_json: manifest.hyper_parameters.to_string(),
    }
}
