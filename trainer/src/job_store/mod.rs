//! The trainer service's durable job store: training jobs kept in the object store, so
//! that a restarted service, or another replica sharing the store, sees and continues
//! them, with each job running on exactly one replica at a time.
//!
//! Layout, relative to the store's prefix (all JSON):
//! - `jobs/<id>/spec.json`: the submitted job ([`StoredSpec`]), written create-only once.
//! - `index/<20-digit inverted create time>-<id>`: an empty marker per job; the store
//!   lists keys in lexicographic order, which is then newest first ([`JobStore::list_jobs`]).
//! - `queue/<id>`: an empty marker while the job is not final; workers find work by
//!   listing `queue/` alone ([`JobStore::queued_jobs`]).
//! - `jobs/<id>/status.json`: the [`JobStatus`], written only by the replica holding the
//!   job's lease (the [`Lease`] is the proof every writing method asks for); absent
//!   means queued.
//! - `jobs/<id>/cancel`: an empty create-only marker anyone may write; the holder checks
//!   it between steps.
//! - `jobs/<id>/claims/<20-digit epoch>.json`: the lease log ([`claim::Claim`]); the highest
//!   epoch is the current claim.
//!
//! Everything builds on create-only writes, the one conditional write that the local
//! file system, S3, GCS, Azure and memory all have; nothing relies on compare-and-swap.
//!
//! Every method takes the time (`now`) instead of reading the clock, so that tests
//! control it; the service passes `chrono::Utc::now()`. Leases assume that replica
//! clocks agree within a margin much smaller than the lease's time to live: a holder
//! renews before `expires_at - margin` and stops working on the job as soon as a
//! renewal fails.

mod claim;
mod ids;
mod index;
mod record;

#[cfg(test)]
mod tests;

use coreg::store::Store;

pub use claim::{Claim, Lease};
pub use ids::{job_id_for_request, new_job_id};
pub use record::{Creation, JobState, JobStatus, StoredSpec, TrainingProgress, TrainingStage};

/// The jobs kept in one object store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct JobStore {
    store: Store,
}

impl JobStore {
    pub fn new(store: Store) -> JobStore {
        JobStore { store }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// What can go wrong with a job store: the store itself (and bad ids, unknown jobs), or
/// a lease that another replica took over.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Coreg(#[from] coreg::Error),
    /// The lease expired, or another replica claimed the job after it: whoever held
    /// it must stop working on the job at once.
    #[error("training job `{job}`: the lease at epoch {epoch} expired or was taken over by another replica")]
    LeaseLost { job: String, epoch: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `jobs/<id>/<name>`; `id` must already be validated.
fn job_key(id: &str, name: &str) -> String {
    format!("jobs/{id}/{name}")
}

fn queue_key(id: &str) -> String {
    format!("{}{id}", record::QUEUE_PREFIX)
}

fn unknown_job(id: &str) -> coreg::Error {
    coreg::Error::NotFound {
        what: format!("training job `{id}`"),
    }
}

fn corrupt(path: &str, message: impl std::fmt::Display) -> coreg::Error {
    coreg::Error::CorruptArtifact {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Reads and parses a JSON record; a missing object stays [`coreg::Error::NotFound`].
async fn read_json<T: serde::de::DeserializeOwned>(store: &Store, path: &str) -> coreg::Result<T> {
    let bytes = store.get(path).await?;
    serde_json::from_slice(&bytes).map_err(|e| corrupt(path, format!("not a valid record: {e}")))
}

fn to_json<T: serde::Serialize>(path: &str, value: &T) -> coreg::Result<bytes::Bytes> {
    serde_json::to_vec_pretty(value)
        .map(bytes::Bytes::from)
        .map_err(|e| coreg::Error::InvalidInput(format!("`{path}` cannot be written as JSON: {e}")))
}
