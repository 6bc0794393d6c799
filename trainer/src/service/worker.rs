//! The model thread: owns the base model (tensors never cross into the async gRPC
//! layer), takes queued jobs from the shared store one at a time under a lease, runs
//! them with the one-shot pipeline, and records their state for every replica to see.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::runtime::Handle;

use crate::exit::JobFailure;
use crate::job::{ModelSpec, StoreSpec};
use crate::job_store::{
    self, JobState, JobStatus, JobStore, Lease, StoredSpec, TrainingProgress, TrainingStage,
};
use crate::pipeline::{Job, JobControl, Stage, StopReason};
use coreg::base_model::{parse_device, BaseModel};

use super::config::ServiceConfig;
use super::metrics::Metrics;
use super::request::TrainingRequest;

/// How many times a job may be given back after transient failures before it fails.
const MAX_ATTEMPTS: u32 = 5;
/// Weight of the newest step in the step-time average.
const STEP_TIME_SMOOTHING: f64 = 0.2;
/// Between steps, how often the holder checks for a cancellation and renews its lease,
/// and the most often it rewrites the job's status.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// What the async layer and the model thread share.
pub struct WorkerShared {
    /// Set on SIGTERM: the running job checkpoints and is given back.
    pub shutdown: AtomicBool,
    /// Wakes an idle worker early (a job was just created here).
    pub wake: std::sync::Mutex<Option<mpsc::Sender<()>>>,
    pub metrics: Arc<Metrics>,
}

impl WorkerShared {
    pub fn wake(&self) {
        if let Some(sender) = self.wake.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = sender.send(());
        }
    }
}

pub struct Worker {
    pub config: ServiceConfig,
    pub replica: String,
    pub jobs: JobStore,
    pub runtime: Handle,
    pub shared: Arc<WorkerShared>,
}

impl Worker {
    /// Loads and warms the model (reporting the outcome on `ready`), then works until
    /// shutdown. Runs on its own OS thread.
    pub fn run(self, ready: tokio::sync::oneshot::Sender<Result<(), String>>) {
        let (wake_tx, wake_rx) = mpsc::channel();
        *self.shared.wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(wake_tx);
        let model = parse_device(&self.config.model.device)
            .map_err(|e| format!("model.device: {e}"))
            .and_then(|device| {
                BaseModel::load(
                    &self.config.model.path,
                    device,
                    self.config.model.variant.clone(),
                )
                .map_err(|e| format!("model: {e}"))
            })
            .and_then(|model| {
                model.warm_up().map_err(|e| format!("model warm-up: {e}"))?;
                Ok(model)
            });
        let mut model = match model {
            Ok(model) => {
                let _ = ready.send(Ok(()));
                model
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        tracing::info!(replica = %self.replica, "model loaded; taking jobs");
        crate::failpoint::hit("before-taking-jobs");
        while !self.shared.shutdown.load(Ordering::SeqCst) {
            let worked = match self.take_one(&mut model) {
                Ok(worked) => worked,
                Err(e) => {
                    tracing::warn!("looking for work failed: {e}");
                    false
                }
            };
            if !worked {
                let _ = wake_rx.recv_timeout(self.config.poll_interval());
            }
        }
        tracing::info!("worker stopped");
    }

    /// Runs the first queued job this replica can claim; `Ok(false)` when there was
    /// none.
    fn take_one(&self, model: &mut BaseModel) -> Result<bool, job_store::Error> {
        let queued = self.runtime.block_on(self.jobs.queued_jobs())?;
        self.shared.metrics.queue_depth.set(queued.len() as i64);
        for id in queued {
            if self.shared.shutdown.load(Ordering::SeqCst) {
                return Ok(false);
            }
            let lease = self.runtime.block_on(self.jobs.acquire(
                &id,
                &self.replica,
                self.config.lease(),
                Utc::now(),
            ))?;
            if let Some(lease) = lease {
                self.run_job(model, lease)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn run_job(&self, model: &mut BaseModel, lease: Lease) -> Result<(), job_store::Error> {
        let id = lease.job_id().to_owned();
        let _span = tracing::info_span!("job", job = %id).entered();
        let stored: StoredSpec<TrainingRequest> = self.runtime.block_on(self.jobs.get_spec(&id))?;
        let mut status = self.runtime.block_on(self.jobs.get_status(&id))?;
        if self.runtime.block_on(self.jobs.cancel_requested(&id))? {
            status.state = JobState::Cancelled;
            return self.finish(lease, status);
        }
        status.state = JobState::Running;
        status.attempts += 1;
        status.error = None;
        self.runtime
            .block_on(self.jobs.put_status(&lease, status.clone(), Utc::now()))?;
        tracing::info!(attempt = status.attempts, "job started");
        self.shared.metrics.running.set(1);

        let spec = stored.spec.job_spec(
            ModelSpec {
                path: self.config.model.path.clone(),
                device: self.config.model.device.clone(),
                variant: self.config.model.variant.clone(),
            },
            StoreSpec {
                url: self.config.store.url.clone(),
                options: self.config.store.options.clone(),
            },
        );
        let version = spec.concept.version.clone().unwrap_or_else(|| id.clone());
        let control = ServiceControl {
            worker: self,
            lease: RefCell::new(Some(lease)),
            status: RefCell::new(status),
            last_check: Cell::new(Instant::now()),
            last_status: Cell::new(Instant::now()),
            last_step: Cell::new(None),
            step_seconds: Cell::new(None),
            lost: Cell::new(false),
        };
        let job = Job::new(
            spec,
            std::path::PathBuf::from("."),
            id.clone(),
            self.jobs.store().clone(),
            self.runtime.clone(),
            &control,
        );
        let result = job.run(model);
        self.shared.metrics.running.set(0);
        let lost = control.lost.get();
        let (Some(lease), status) = (control.lease.take(), control.status.take()) else {
            return Ok(());
        };
        if lost {
            tracing::warn!("another replica took the job over; stopped");
            return Ok(());
        }
        self.record_outcome(result, lease, status, version)
    }

    /// Ends the job's attempt in the store as `result` says: succeeded, cancelled,
    /// failed, or given back for any replica to resume.
    fn record_outcome(
        &self,
        result: Result<String, JobFailure>,
        lease: Lease,
        mut status: JobStatus,
        version: String,
    ) -> Result<(), job_store::Error> {
        match result {
            Ok(summary) => {
                tracing::info!("{summary}");
                status.state = JobState::Succeeded;
                status.concept_version = Some(version);
                self.finish(lease, status)
            }
            Err(JobFailure::Cancelled) => {
                status.state = JobState::Cancelled;
                self.finish(lease, status)
            }
            Err(JobFailure::LeaseLost) => Ok(()),
            Err(JobFailure::Transient(message)) if status.attempts < MAX_ATTEMPTS => {
                // Shutdown, or storage trouble: give the job back for any replica to
                // resume from its last checkpoint.
                tracing::warn!("job given back: {message}");
                status.state = JobState::Queued;
                status.error = Some(message);
                self.runtime
                    .block_on(self.jobs.put_status(&lease, status, Utc::now()))?;
                self.runtime
                    .block_on(self.jobs.release(lease, Utc::now()))
                    .map_err(Into::into)
            }
            Err(failure) => {
                tracing::warn!("job failed: {failure}");
                status.state = JobState::Failed;
                status.error = Some(failure.to_string());
                self.finish(lease, status)
            }
        }
    }

    fn finish(&self, lease: Lease, status: JobStatus) -> Result<(), job_store::Error> {
        let state = status.state;
        self.runtime
            .block_on(self.jobs.finish(lease, status, Utc::now()))?;
        self.shared.metrics.finished(state);
        tracing::info!(?state, "job ended");
        Ok(())
    }
}

/// The pipeline's view of the service while one job runs: progress goes to the job's
/// status (at most every [`CHECK_INTERVAL`]), and between steps the lease is renewed and
/// cancellation and shutdown are checked.
struct ServiceControl<'w> {
    worker: &'w Worker,
    lease: RefCell<Option<Lease>>,
    status: RefCell<JobStatus>,
    last_check: Cell<Instant>,
    last_status: Cell<Instant>,
    /// When and in which stage the last step ended.
    last_step: Cell<Option<(Instant, Stage)>>,
    /// Exponential moving average of this stage's step times.
    step_seconds: Cell<Option<f64>>,
    lost: Cell<bool>,
}

impl ServiceControl<'_> {
    fn write_status(&self) {
        let lease = self.lease.borrow();
        let Some(lease) = lease.as_ref() else { return };
        let status = self.status.borrow().clone();
        let jobs = &self.worker.jobs;
        if let Err(e) = self
            .worker
            .runtime
            .block_on(jobs.put_status(lease, status, Utc::now()))
        {
            tracing::warn!("writing the job's progress failed: {e}");
        }
        self.last_status.set(Instant::now());
    }
}

impl JobControl for ServiceControl<'_> {
    fn step(&self, stage: Stage, step: usize, total: usize, losses: &[(&str, f64)]) {
        let now = Instant::now();
        match self.last_step.replace(Some((now, stage))) {
            Some((previous, previous_stage)) if previous_stage == stage => {
                let seconds = (now - previous).as_secs_f64();
                self.worker.shared.metrics.step_seconds.set(seconds);
                // Smoothed, so a checkpoint or preview step does not swing the ETA.
                let mean = match self.step_seconds.get() {
                    Some(mean) => mean + STEP_TIME_SMOOTHING * (seconds - mean),
                    None => seconds,
                };
                self.step_seconds.set(Some(mean));
            }
            // A new stage: its steps cost something else.
            _ => self.step_seconds.set(None),
        }
        self.status.borrow_mut().progress = Some(TrainingProgress {
            stage: match stage {
                Stage::Embedding => TrainingStage::Embedding,
                Stage::UNet => TrainingStage::Unet,
            },
            step: step as u32,
            total_steps: total as u32,
            losses: losses
                .iter()
                .filter(|(_, v)| v.is_finite())
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            step_seconds: self.step_seconds.get(),
        });
        if step == total || now - self.last_status.get() >= CHECK_INTERVAL {
            self.write_status();
        }
    }

    fn stop(&self) -> Option<StopReason> {
        if self.lost.get() {
            return Some(StopReason::LeaseLost);
        }
        if self.worker.shared.shutdown.load(Ordering::SeqCst) {
            return Some(StopReason::Shutdown);
        }
        if self.last_check.get().elapsed() < CHECK_INTERVAL {
            return None;
        }
        self.last_check.set(Instant::now());
        let jobs = &self.worker.jobs;
        let runtime = &self.worker.runtime;
        let mut lease = self.lease.borrow_mut();
        let held = lease.as_mut()?;
        // Renew once half the lease has passed, so that a slow store still leaves time.
        let remaining = held.expires_at() - Utc::now();
        if remaining
            < chrono::TimeDelta::from_std(self.worker.config.lease() / 2).unwrap_or_default()
        {
            if let Err(e) = runtime.block_on(jobs.renew(held, Utc::now())) {
                tracing::warn!("renewing the lease failed: {e}");
                if matches!(e, job_store::Error::LeaseLost { .. })
                    || Utc::now() >= held.expires_at()
                {
                    self.lost.set(true);
                    return Some(StopReason::LeaseLost);
                }
            }
        }
        match runtime.block_on(jobs.cancel_requested(held.job_id())) {
            Ok(true) => Some(StopReason::Cancelled),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!("checking for cancellation failed: {e}");
                None
            }
        }
    }
}
