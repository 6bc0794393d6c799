//! The `coreg.v1.TrainerService` handlers. They validate, read and write job records in
//! the shared store and wake the model thread; they never touch a tensor.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use coreg::artifact::manifest_path;
use coreg::images::ImageLimits;
use coreg::model::tokenizer::ClipTokenizer;
use coreg_proto::v1 as pb;
use coreg_proto::v1::trainer_service_server::TrainerService;
use futures::Stream;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::job_store::{
    self, job_id_for_request, new_job_id, Creation, JobState, JobStatus, JobStore, TrainingStage,
};

use super::request::{RequestImage, TrainingRequest};
use super::worker::WorkerShared;
use crate::pipeline::discard_checkpoints;

/// The most jobs one `ListTrainingJobs` page holds, and the size of an unsized page.
const MAX_PAGE_SIZE: u32 = 100;
const DEFAULT_PAGE_SIZE: u32 = 20;
/// How often a watch looks at the job's status.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

pub struct TrainerApi {
    pub jobs: JobStore,
    pub tokenizer: Arc<ClipTokenizer>,
    pub shared: Arc<WorkerShared>,
    /// Requests in flight; one more is answered RESOURCE_EXHAUSTED.
    pub permits: Arc<Semaphore>,
    pub max_queued_jobs: usize,
    /// Where photos given by key must lie.
    pub upload_prefix: String,
}

/// A store error as the client should see it.
fn status_of(e: coreg::Error) -> Status {
    match e {
        coreg::Error::InvalidInput(m) => Status::invalid_argument(m),
        coreg::Error::NotFound { .. } => Status::not_found(e.to_string()),
        coreg::Error::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        coreg::Error::CorruptArtifact { .. } => Status::data_loss(e.to_string()),
        coreg::Error::Store { .. } => Status::unavailable(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

fn job_store_status(e: job_store::Error) -> Status {
    match e {
        job_store::Error::Coreg(e) => status_of(e),
        other => Status::aborted(other.to_string()),
    }
}

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

fn state_to_proto(state: JobState) -> pb::JobState {
    match state {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

fn progress_to_proto(status: &JobStatus) -> Option<pb::TrainingProgress> {
    status.progress.as_ref().map(|p| pb::TrainingProgress {
        stage: match p.stage {
            TrainingStage::Embedding => pb::TrainingStage::Embedding,
            TrainingStage::Unet => pb::TrainingStage::Unet,
            TrainingStage::Writing => pb::TrainingStage::Writing,
        }
        .into(),
        step: p.step,
        total_steps: p.total_steps,
        losses: p.losses.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        timing: p.step_seconds.map(|seconds| {
            let remaining = p.total_steps.saturating_sub(p.step);
            pb::Timing {
                step_time: Some(duration(seconds)),
                eta: Some(duration(seconds * f64::from(remaining))),
            }
        }),
    })
}

fn duration(seconds: f64) -> prost_types::Duration {
    let seconds = seconds.clamp(0.0, 1e9);
    prost_types::Duration {
        seconds: seconds.trunc() as i64,
        nanos: (seconds.fract() * 1e9) as i32,
    }
}

impl TrainerApi {
    /// A concept version is never overwritten: a request for one that exists is
    /// refused now, not after the whole training.
    async fn check_version_free(&self, training: &TrainingRequest, id: &str) -> Result<(), Status> {
        let concept = &training.concept;
        let version = concept.version.as_deref().unwrap_or(id);
        let path = manifest_path(&concept.name, version).map_err(status_of)?;
        if self.jobs.store().exists(&path).await.map_err(status_of)? {
            return Err(Status::already_exists(format!(
                "spec.concept_version: concept `{}` version `{version}` already exists; \
                 versions are never overwritten, choose another",
                concept.name
            )));
        }
        Ok(())
    }

    fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("the trainer is handling too many requests; retry later")
        })
    }

    async fn job(&self, id: &str) -> Result<pb::TrainingJob, Status> {
        let stored = self
            .jobs
            .get_spec::<TrainingRequest>(id)
            .await
            .map_err(status_of)?;
        let status = self.jobs.get_status(id).await.map_err(status_of)?;
        Ok(pb::TrainingJob {
            id: stored.id.clone(),
            spec: Some(stored.spec.to_proto()),
            state: state_to_proto(status.state).into(),
            progress: progress_to_proto(&status),
            concept: status
                .concept_version
                .clone()
                .map(|version| pb::ConceptRef {
                    name: stored.spec.concept.name.clone(),
                    version,
                }),
            error: status.error.clone().unwrap_or_default(),
            create_time: Some(timestamp(stored.create_time)),
            update_time: Some(timestamp(status.update_time.unwrap_or(stored.create_time))),
            attempts: status.attempts,
        })
    }

    /// Stores inline images under `jobs/<id>/inputs/` and checks that uploaded ones
    /// exist; returns every image's key.
    async fn store_images(
        &self,
        id: &str,
        images: Vec<RequestImage>,
    ) -> Result<Vec<String>, Status> {
        let store = self.jobs.store();
        // Every referenced photo must exist, within the size limit (from its metadata:
        // nothing is downloaded here), before anything is written, so a refused request
        // leaves nothing behind.
        let max_bytes = ImageLimits::default().max_bytes as u64;
        for (i, image) in images.iter().enumerate() {
            if let RequestImage::Stored(key) = image {
                let field = format!("spec.images[{i}].object_key");
                match store.size(key).await {
                    Ok(size) if size > max_bytes => {
                        return Err(Status::invalid_argument(format!(
                            "{field}: {key:?} is {size} bytes; a photo may be at most \
                             {max_bytes}"
                        )))
                    }
                    Ok(_) => {}
                    Err(coreg::Error::NotFound { .. }) => {
                        return Err(Status::invalid_argument(format!(
                            "{field}: {key:?} is not in the trainer's store"
                        )))
                    }
                    Err(e) => return Err(status_of(e)),
                }
            }
        }
        let mut keys = Vec::with_capacity(images.len());
        let mut written: Vec<String> = Vec::new();
        for (i, image) in images.into_iter().enumerate() {
            match image {
                RequestImage::Inline(bytes) => {
                    let key = format!("jobs/{id}/inputs/{i:02}");
                    if let Err(e) = store.put_overwrite(&key, Bytes::from(bytes)).await {
                        // Best effort: the job is not created, its inputs are garbage.
                        for key in &written {
                            let _ = store.delete(key).await;
                        }
                        return Err(status_of(e));
                    }
                    written.push(key.clone());
                    keys.push(key);
                }
                RequestImage::Stored(key) => keys.push(key),
            }
        }
        Ok(keys)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::TrainingJobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl TrainerService for TrainerApi {
    async fn create_training_job(
        &self,
        request: Request<pb::CreateTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        let _permit = self.permit()?;
        let request = request.into_inner();
        let spec = request
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        let request_id = (!request.request_id.is_empty()).then_some(request.request_id);
        let id = match &request_id {
            Some(request_id) => job_id_for_request(request_id)
                .map_err(|e| Status::invalid_argument(format!("request_id: {e}")))?,
            None => new_job_id(Utc::now()),
        };
        // A retried request returns the job its first call created, storing nothing but
        // the markers a first call that died part-way may have left unwritten.
        if request_id.is_some() {
            match self.jobs.get_spec::<TrainingRequest>(&id).await {
                Ok(stored) => {
                    self.jobs
                        .repair_markers(&id, stored.create_time)
                        .await
                        .map_err(status_of)?;
                    self.shared.wake();
                    return Ok(Response::new(self.job(&id).await?));
                }
                Err(coreg::Error::NotFound { .. }) => {}
                Err(e) => return Err(status_of(e)),
            }
        }
        let (mut training, images) =
            TrainingRequest::from_proto(spec, &self.tokenizer, &self.upload_prefix)?;
        self.check_version_free(&training, &id).await?;
        let queued = self.jobs.queued_jobs().await.map_err(status_of)?;
        if queued.len() >= self.max_queued_jobs {
            return Err(Status::resource_exhausted(format!(
                "{} jobs are waiting, the most this trainer queues; retry later",
                queued.len()
            )));
        }
        training.image_keys = self.store_images(&id, images).await?;
        let created = self
            .jobs
            .create(&id, request_id.as_deref(), training, Utc::now())
            .await
            .map_err(status_of)?;
        if let Creation::Created(_) = created {
            self.shared
                .metrics
                .jobs_created
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(job = %id, "job created");
        }
        self.shared.wake();
        Ok(Response::new(self.job(&id).await?))
    }

    async fn get_training_job(
        &self,
        request: Request<pb::GetTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        let _permit = self.permit()?;
        Ok(Response::new(self.job(&request.into_inner().id).await?))
    }

    async fn list_training_jobs(
        &self,
        request: Request<pb::ListTrainingJobsRequest>,
    ) -> Result<Response<pb::ListTrainingJobsResponse>, Status> {
        let _permit = self.permit()?;
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(Status::invalid_argument(format!(
                    "page_size: {n} is over {MAX_PAGE_SIZE}"
                )))
            }
            n => n,
        } as usize;
        let wanted = pb::JobState::try_from(request.state)
            .map_err(|_| Status::invalid_argument("state: unknown value"))?;
        // A state filter applies before paging: pages are filled from as many index
        // pages as it takes.
        let mut jobs = Vec::new();
        let mut token = request.page_token;
        loop {
            let page = self
                .jobs
                .list_jobs(page_size - jobs.len(), &token)
                .await
                .map_err(|e| match e {
                    coreg::Error::InvalidInput(m) => {
                        Status::invalid_argument(format!("page_token: {m}"))
                    }
                    other => status_of(other),
                })?;
            for id in &page.job_ids {
                let job = self.job(id).await?;
                if wanted == pb::JobState::Unspecified || job.state == wanted as i32 {
                    jobs.push(job);
                }
            }
            token = page.next_page_token;
            if token.is_empty() || jobs.len() >= page_size {
                break;
            }
        }
        Ok(Response::new(pb::ListTrainingJobsResponse {
            jobs,
            next_page_token: token,
        }))
    }

    async fn cancel_training_job(
        &self,
        request: Request<pb::CancelTrainingJobRequest>,
    ) -> Result<Response<pb::TrainingJob>, Status> {
        let _permit = self.permit()?;
        let id = request.into_inner().id;
        let job = self.job(&id).await?;
        if matches!(
            pb::JobState::try_from(job.state),
            Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
        ) {
            return Ok(Response::new(job));
        }
        self.jobs.request_cancel(&id).await.map_err(status_of)?;
        // A job no replica holds ends here and now; a running one at its next step.
        let replica = format!("cancel-{}", std::process::id());
        if let Some(lease) = self
            .jobs
            .acquire(&id, &replica, Duration::from_secs(10), Utc::now())
            .await
            .map_err(status_of)?
        {
            let mut status = self.jobs.get_status(&id).await.map_err(status_of)?;
            status.state = JobState::Cancelled;
            // A job queued after a give-back has checkpoints: never resumed now.
            discard_checkpoints(self.jobs.store(), &id)
                .await
                .map_err(status_of)?;
            self.jobs
                .finish(lease, status, Utc::now())
                .await
                .map_err(job_store_status)?;
            self.shared.metrics.finished(JobState::Cancelled);
        }
        Ok(Response::new(self.job(&id).await?))
    }

    type WatchTrainingJobStream = EventStream;

    async fn watch_training_job(
        &self,
        request: Request<pb::WatchTrainingJobRequest>,
    ) -> Result<Response<Self::WatchTrainingJobStream>, Status> {
        let id = request.into_inner().id;
        let first = self.job(&id).await?;
        let jobs = self.jobs.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let this = TrainerApi {
            jobs,
            tokenizer: self.tokenizer.clone(),
            shared: self.shared.clone(),
            permits: self.permits.clone(),
            max_queued_jobs: self.max_queued_jobs,
            upload_prefix: self.upload_prefix.clone(),
        };
        tokio::spawn(async move { this.watch(id, first, tx).await });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

impl TrainerApi {
    /// Sends the job, then every state change and step, until a final state or the
    /// client goes away.
    async fn watch(
        &self,
        id: String,
        first: pb::TrainingJob,
        tx: tokio::sync::mpsc::Sender<Result<pb::TrainingJobEvent, Status>>,
    ) {
        let is_final = |job: &pb::TrainingJob| {
            matches!(
                pb::JobState::try_from(job.state),
                Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
            )
        };
        let mut state = first.state;
        let mut progress = first.progress.clone();
        let done = is_final(&first);
        let event = |job| pb::TrainingJobEvent {
            event: Some(pb::training_job_event::Event::Job(job)),
        };
        if tx.send(Ok(event(first))).await.is_err() || done {
            return;
        }
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            let job = match self.job(&id).await {
                Ok(job) => job,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            if job.progress != progress {
                progress = job.progress.clone();
                if let Some(p) = &progress {
                    let event = pb::TrainingJobEvent {
                        event: Some(pb::training_job_event::Event::Progress(p.clone())),
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
            }
            if job.state != state {
                state = job.state;
                let done = is_final(&job);
                if tx.send(Ok(event(job))).await.is_err() || done {
                    return;
                }
            }
        }
    }
}
