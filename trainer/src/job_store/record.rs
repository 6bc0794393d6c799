//! A job's records: the spec submitted once, the status its lease holder keeps, the
//! queue and index markers, and the cancel marker.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use coreg::store::CreateOutcome;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::ids::{validate_job_id, validate_request_id};
use super::index::index_key;
use super::{
    corrupt, job_key, queue_key, read_json, to_json, unknown_job, Error, JobStore, Lease, Result,
};

pub(super) const QUEUE_PREFIX: &str = "queue/";
pub(super) const SPEC_FILE: &str = "spec.json";
const STATUS_FILE: &str = "status.json";
const CANCEL_FILE: &str = "cancel";

/// A submitted job as `jobs/<id>/spec.json` holds it; `S` is the service's own spec type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSpec<S> {
    pub id: String,
    /// The idempotency key the job was submitted with, if any.
    pub request_id: Option<String>,
    pub create_time: DateTime<Utc>,
    pub spec: S,
}

/// What [`JobStore::create`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Creation<S> {
    Created(StoredSpec<S>),
    /// A job with this id was already stored (a retried request): its spec, as first
    /// submitted. The spec passed in was not stored.
    Existing(StoredSpec<S>),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a replica, or stopped by one (shutdown, lost replica) until another
    /// resumes it.
    #[default]
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// A final job is never run again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainingStage {
    /// Stage 1: learning the embedding.
    Embedding,
    /// Stage 2: fine-tuning the U-Net.
    Unet,
    /// Writing the concept.
    Writing,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingProgress {
    pub stage: TrainingStage,
    /// Steps of the current stage completed.
    pub step: u32,
    pub total_steps: u32,
    /// The last step's losses by term ("total", "diffusion", "embedding", "attention").
    pub losses: BTreeMap<String, f64>,
    /// Recent mean wall time of a step of this stage, once one was timed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_seconds: Option<f64>,
}

/// `jobs/<id>/status.json`. A job without one is queued and was never started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobStatus {
    pub state: JobState,
    pub progress: Option<TrainingProgress>,
    /// Why the job failed, in words.
    pub error: Option<String>,
    /// The version of the concept a succeeded job wrote.
    pub concept_version: Option<String>,
    /// How many times a replica started or resumed the job.
    pub attempts: u32,
    /// Attempts that ended in a failure a retry may fix (storage trouble), the job
    /// given back; a give-back on shutdown is not one.
    pub failures: u32,
    /// Attempts whose replica died with the job (killed, out of memory, a panic): its
    /// lease expired or was taken back without being released.
    pub crashes: u32,
    /// When the status was last written; `None` until then.
    pub update_time: Option<DateTime<Utc>>,
}

impl JobStore {
    /// Stores a new job: its spec create-only, then its index and queue markers. If a
    /// job `id` already exists (the same request retried) nothing is overwritten: its
    /// markers are completed (a writer may have died between the writes), the queue
    /// marker only while the job is not final, and the stored spec is returned.
    pub async fn create<S>(
        &self,
        id: &str,
        request_id: Option<&str>,
        spec: S,
        now: DateTime<Utc>,
    ) -> coreg::Result<Creation<S>>
    where
        S: Serialize + DeserializeOwned,
    {
        validate_job_id(id)?;
        if let Some(request_id) = request_id {
            validate_request_id(request_id)?;
        }
        let stored = StoredSpec {
            id: id.to_owned(),
            request_id: request_id.map(str::to_owned),
            create_time: now,
            spec,
        };
        let path = job_key(id, SPEC_FILE);
        match self
            .store
            .put_create_only(&path, to_json(&path, &stored)?)
            .await?
        {
            CreateOutcome::Created => {
                self.write_markers(id, now, true).await?;
                Ok(Creation::Created(stored))
            }
            CreateOutcome::AlreadyExists => {
                let existing = self.get_spec::<S>(id).await?;
                self.repair_markers(id, existing.create_time).await?;
                Ok(Creation::Existing(existing))
            }
        }
    }

    /// Completes the markers of an existing job created at `create_time` (whoever
    /// created it may have died between the writes): the index marker always, the
    /// queue marker while the job is not final. A retried create must call this even
    /// when it finds the job, or a job whose creator died would wait forever.
    pub async fn repair_markers(&self, id: &str, create_time: DateTime<Utc>) -> coreg::Result<()> {
        let queued = !self.get_status(id).await?.state.is_final();
        self.write_markers(id, create_time, queued).await
    }

    async fn write_markers(
        &self,
        id: &str,
        create_time: DateTime<Utc>,
        queued: bool,
    ) -> coreg::Result<()> {
        // Create-only: a marker already there (a retry) is left as it is.
        self.store
            .put_create_only(&index_key(create_time, id), Bytes::new())
            .await?;
        if queued {
            self.store
                .put_create_only(&queue_key(id), Bytes::new())
                .await?;
        }
        Ok(())
    }

    /// The job's stored spec; [`coreg::Error::NotFound`] for an unknown job.
    pub async fn get_spec<S: DeserializeOwned>(&self, id: &str) -> coreg::Result<StoredSpec<S>> {
        validate_job_id(id)?;
        let path = job_key(id, SPEC_FILE);
        let stored: StoredSpec<S> = read_json(&self.store, &path).await.map_err(|e| match e {
            coreg::Error::NotFound { .. } => unknown_job(id),
            e => e,
        })?;
        if stored.id != id {
            return Err(corrupt(&path, format!("holds job `{}`", stored.id)));
        }
        Ok(stored)
    }

    /// The job's status: the default (queued, never started) until a holder writes one;
    /// [`coreg::Error::NotFound`] for an unknown job.
    pub async fn get_status(&self, id: &str) -> coreg::Result<JobStatus> {
        validate_job_id(id)?;
        match read_json(&self.store, &job_key(id, STATUS_FILE)).await {
            Err(coreg::Error::NotFound { .. }) => {
                if self.store.exists(&job_key(id, SPEC_FILE)).await? {
                    Ok(JobStatus::default())
                } else {
                    Err(unknown_job(id))
                }
            }
            read => read,
        }
    }

    /// Writes the job's status, stamped with `now`. Only the lease holder can call this,
    /// and only while its lease is unexpired at `now`. Losses must be finite (JSON has no
    /// NaN: a non-finite one would make the record unreadable).
    pub async fn put_status(
        &self,
        lease: &Lease,
        mut status: JobStatus,
        now: DateTime<Utc>,
    ) -> Result<()> {
        lease.check_valid_at(now)?;
        if let Some(progress) = &status.progress {
            if let Some((term, value)) = progress.losses.iter().find(|(_, v)| !v.is_finite()) {
                return Err(coreg::Error::InvalidInput(format!(
                    "training job `{}`: loss `{term}` is {value}; a status holds finite losses only",
                    lease.job_id()
                ))
                .into());
            }
        }
        status.update_time = Some(now);
        let path = job_key(lease.job_id(), STATUS_FILE);
        self.store
            .put_overwrite(&path, to_json(&path, &status)?)
            .await?;
        Ok(())
    }

    /// Ends the job: writes its final `status`, takes it off the queue and releases the
    /// lease. The lease is renewed first, which proves it is still held (nothing is
    /// written if it was lost) and leaves a full time to live for the writes. A finished
    /// job is never run again: [`JobStore::acquire`] refuses it.
    pub async fn finish(
        &self,
        mut lease: Lease,
        status: JobStatus,
        now: DateTime<Utc>,
    ) -> Result<()> {
        if !status.state.is_final() {
            return Err(coreg::Error::InvalidInput(format!(
                "training job `{}`: finishing needs a final state, not {:?}",
                lease.job_id(),
                status.state
            ))
            .into());
        }
        self.renew(&mut lease, now).await?;
        self.put_status(&lease, status, now).await?;
        self.store.delete(&queue_key(lease.job_id())).await?;
        self.release(lease, now).await.map_err(Error::from)
    }

    /// Asks the job's holder to cancel it (it checks between steps). Asking again is
    /// harmless; [`coreg::Error::NotFound`] for an unknown job.
    pub async fn request_cancel(&self, id: &str) -> coreg::Result<()> {
        validate_job_id(id)?;
        if !self.store.exists(&job_key(id, SPEC_FILE)).await? {
            return Err(unknown_job(id));
        }
        self.store
            .put_create_only(&job_key(id, CANCEL_FILE), Bytes::new())
            .await?;
        Ok(())
    }

    /// Whether cancelling the job was asked for. One existence check, as the holder
    /// calls this between steps: an unknown job reads as not cancelled.
    pub async fn cancel_requested(&self, id: &str) -> coreg::Result<bool> {
        validate_job_id(id)?;
        self.store.exists(&job_key(id, CANCEL_FILE)).await
    }

    /// The ids of every job not yet final (queued, or running on some replica), in id
    /// order. A worker tries [`JobStore::acquire`] on them.
    pub async fn queued_jobs(&self) -> coreg::Result<Vec<String>> {
        let markers = self.store.list(QUEUE_PREFIX).await?;
        Ok(markers
            .into_iter()
            .filter_map(|marker| {
                let id = marker.path.strip_prefix(QUEUE_PREFIX)?;
                match validate_job_id(id) {
                    Ok(()) => Some(id.to_owned()),
                    Err(e) => {
                        tracing::warn!(marker = %marker.path, "ignoring a queue marker: {e}");
                        None
                    }
                }
            })
            .collect())
    }
}
