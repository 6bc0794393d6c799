//! The model thread: owns the base model (tensors never cross into the async gRPC
//! layer), takes queued jobs from the shared store one at a time under a lease, runs
//! them with the one-shot pipeline, and records their state for every replica to see.

use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
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
use crate::pipeline::{discard_checkpoints, Job, JobControl, Stage, StopReason};
use coreg::base_model::{parse_device, BaseModel};

use super::config::ServiceConfig;
use super::lease_keeper::KeptLease;
use super::metrics::Metrics;
use super::request::TrainingRequest;
use super::takeover_watch::TakeoverWatch;

/// Weight of the newest step in the step-time average.
const STEP_TIME_SMOOTHING: f64 = 0.2;
/// Between steps, how often the holder checks for a cancellation, and the most often it
/// rewrites the job's status.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How many leases a write waits for a failing store to come back before the job is
/// given back (5 minutes at the default 30 s lease).
const OUTAGE_LEASES: u32 = 10;
/// How often a write waiting for the lease to be renewed looks again.
const FENCE_POLL: Duration = Duration::from_millis(100);

/// What the async layer and the model thread share.
pub struct WorkerShared {
    /// Set on SIGTERM: the running job checkpoints and is given back.
    pub shutdown: AtomicBool,
    /// Wakes an idle worker early (a job was just created here).
    pub wake: std::sync::Mutex<Option<mpsc::Sender<()>>>,
    pub metrics: Arc<Metrics>,
    /// Why the model thread stopped taking jobs for good (it panicked); the service
    /// then turns NOT_SERVING and exits non-zero, for Kubernetes to restart it.
    pub died: std::sync::Mutex<Option<String>>,
    pub died_notify: tokio::sync::Notify,
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
        let mut watch = TakeoverWatch::new(self.config.lease());
        while !self.shared.shutdown.load(Ordering::SeqCst) {
            let ran = match self.take_one(&mut model, &mut watch) {
                Ok(ran) => ran,
                Err(e) => {
                    tracing::warn!("looking for work failed: {e}");
                    Ran::Nothing
                }
            };
            match ran {
                Ran::Job => {}
                Ran::Nothing => {
                    let _ = wake_rx.recv_timeout(self.config.poll_interval());
                }
                Ran::Panicked(message) => {
                    *self.shared.died.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
                    self.shared.died_notify.notify_one();
                    return;
                }
            }
        }
        tracing::info!("worker stopped");
    }

    /// Runs the first queued job this replica can claim; a job another replica holds
    /// only once `watch` saw its lease go unrenewed for a whole lease.
    fn take_one(
        &self,
        model: &mut BaseModel,
        watch: &mut TakeoverWatch,
    ) -> Result<Ran, job_store::Error> {
        let queued = self.runtime.block_on(self.jobs.queued_jobs())?;
        self.shared.metrics.queue_depth.set(queued.len() as i64);
        watch.retain(&queued);
        for id in queued {
            if self.shared.shutdown.load(Ordering::SeqCst) {
                return Ok(Ran::Nothing);
            }
            let claim = match self.runtime.block_on(self.jobs.current_claim(&id)) {
                Ok(claim) => claim,
                // The newest claim vanished as it was read: replicas are busy on it.
                Err(coreg::Error::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            if !watch.may_take(&id, claim.as_ref(), &self.replica, Instant::now()) {
                continue;
            }
            let lease = self.runtime.block_on(self.jobs.acquire(
                &id,
                &self.replica,
                self.config.lease(),
                Utc::now(),
            ))?;
            if let Some(lease) = lease {
                return self.run_job(model, lease);
            }
        }
        Ok(Ran::Nothing)
    }

    fn run_job(&self, model: &mut BaseModel, lease: Lease) -> Result<Ran, job_store::Error> {
        let id = lease.job_id().to_owned();
        let _span = tracing::info_span!("job", job = %id).entered();
        let stored: StoredSpec<TrainingRequest> = self.runtime.block_on(self.jobs.get_spec(&id))?;
        let status = self.runtime.block_on(self.jobs.get_status(&id))?;
        let Some((lease, status)) = self.admit(lease, status)? else {
            return Ok(Ran::Job);
        };
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
        let kept = KeptLease::keep(self.jobs.clone(), lease, self.runtime.clone());
        let control = ServiceControl {
            worker: self,
            job_id: id.clone(),
            lease: &kept,
            status: RefCell::new(status),
            last_check: Cell::new(Instant::now()),
            last_status: Cell::new(Instant::now()),
            last_step: Cell::new(None),
            step_seconds: Cell::new(None),
        };
        let job = Job::new(
            spec,
            std::path::PathBuf::from("."),
            id.clone(),
            self.jobs.store().clone(),
            self.runtime.clone(),
            &control,
        );
        // The model's weights may be half-updated after a panic: the job is given
        // back (or failed) and the replica leaves, so that Kubernetes restarts it.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| job.run(model)));
        self.shared.metrics.running.set(0);
        let status = control.status.take();
        let Some(lease) = kept.stop() else {
            tracing::warn!("another replica took the job over; stopped");
            self.tidy_after_takeover(&id);
            return Ok(Ran::Job);
        };
        match result {
            Ok(result) => {
                self.record_outcome(result, lease, status, version)?;
                Ok(Ran::Job)
            }
            Err(panic) => {
                let message = panic_message(panic.as_ref());
                tracing::error!("the model thread panicked: {message}");
                self.record_crash(lease, status, &message)?;
                Ok(Ran::Panicked(message))
            }
        }
    }

    /// Decides whether the claimed job runs: a crash of its previous holder is counted,
    /// and a job cancelled meanwhile or crashed too often ends here. Otherwise the job
    /// is marked running; `None` when it ended.
    fn admit(
        &self,
        lease: Lease,
        mut status: JobStatus,
    ) -> Result<Option<(Lease, JobStatus)>, job_store::Error> {
        if lease.previous_holder_died() {
            status.crashes += 1;
            tracing::warn!(
                crashes = status.crashes,
                "the job's previous replica died with it"
            );
        }
        if self
            .runtime
            .block_on(self.jobs.cancel_requested(lease.job_id()))?
        {
            status.state = JobState::Cancelled;
            self.finish(lease, status)?;
            return Ok(None);
        }
        if status.crashes >= self.config.max_crashes {
            status.state = JobState::Failed;
            status.error = Some(format!(
                "the replicas running this job died with it {} times (killed, out of \
                 memory, or a panic: see their logs); last error: {}",
                status.crashes,
                status.error.as_deref().unwrap_or("none recorded")
            ));
            self.finish(lease, status)?;
            return Ok(None);
        }
        status.state = JobState::Running;
        status.attempts += 1;
        status.error = None;
        self.runtime
            .block_on(self.jobs.put_status(&lease, status.clone(), Utc::now()))?;
        tracing::info!(attempt = status.attempts, "job started");
        Ok(Some((lease, status)))
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
            // Shutdown: given back, not counted against the job.
            Err(JobFailure::Interrupted(message)) => self.give_back(lease, status, message),
            // The lease could not be renewed in time (the store is failing): the
            // claim may already be another replica's, and releasing it is harmless
            // either way.
            Err(JobFailure::LeaseLost) => {
                let id = lease.job_id().to_owned();
                self.runtime
                    .block_on(self.jobs.release(lease, Utc::now()))?;
                self.tidy_after_takeover(&id);
                Ok(())
            }
            Err(JobFailure::Transient(message))
                if status.failures + 1 < self.config.max_failures =>
            {
                status.failures += 1;
                self.give_back(lease, status, message)
            }
            Err(failure) => {
                tracing::warn!("job failed: {failure}");
                if matches!(failure, JobFailure::Transient(_)) {
                    status.failures += 1;
                }
                status.state = JobState::Failed;
                status.error = Some(failure.to_string());
                self.finish(lease, status)
            }
        }
    }

    /// A panic ended the attempt: counted as a crash (the replica is leaving), then the
    /// job is given back, or failed once it crashed too often.
    fn record_crash(
        &self,
        lease: Lease,
        mut status: JobStatus,
        message: &str,
    ) -> Result<(), job_store::Error> {
        status.crashes += 1;
        let error = format!("the trainer panicked: {message}");
        if status.crashes >= self.config.max_crashes {
            status.state = JobState::Failed;
            status.error = Some(format!(
                "the replicas running this job died with it {} times; last: {error}",
                status.crashes
            ));
            return self.finish(lease, status);
        }
        self.give_back(lease, status, error)
    }

    /// Queues the job again for any replica to resume from its last checkpoint.
    fn give_back(
        &self,
        lease: Lease,
        mut status: JobStatus,
        message: String,
    ) -> Result<(), job_store::Error> {
        tracing::warn!("job given back: {message}");
        status.state = JobState::Queued;
        status.error = Some(message);
        self.runtime
            .block_on(self.jobs.put_status(&lease, status, Utc::now()))?;
        self.runtime
            .block_on(self.jobs.release(lease, Utc::now()))
            .map_err(Into::into)
    }

    /// Ends the job for good. A job that did not succeed is never resumed, so its
    /// checkpoints go first (a success already dropped them when it published).
    fn finish(&self, lease: Lease, status: JobStatus) -> Result<(), job_store::Error> {
        let state = status.state;
        if state != JobState::Succeeded {
            self.runtime
                .block_on(discard_checkpoints(self.jobs.store(), lease.job_id()))?;
        }
        self.runtime
            .block_on(self.jobs.finish(lease, status, Utc::now()))?;
        self.shared.metrics.finished(state);
        tracing::info!(?state, "job ended");
        Ok(())
    }
}

impl Worker {
    /// After losing a job: a write that was already under way when the lease lapsed
    /// (the fence is checked before a write, and object stores cannot refuse one
    /// already sent) may have landed after the new holder finished the job and dropped
    /// its checkpoints. A final job never needs them, so they go again; a job still
    /// running keeps them (its holder overwrites or drops them).
    fn tidy_after_takeover(&self, id: &str) {
        let tidied = self.runtime.block_on(async {
            if self.jobs.get_status(id).await?.state.is_final() {
                discard_checkpoints(self.jobs.store(), id).await?;
            }
            Ok::<(), coreg::Error>(())
        });
        if let Err(e) = tidied {
            tracing::warn!("tidying a lost job's checkpoints: {e}");
        }
    }
}

/// What a panic carried, in words.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// What taking one job came to.
enum Ran {
    /// No job could be claimed.
    Nothing,
    /// A job ran and its outcome is recorded.
    Job,
    /// The model thread panicked running a job: the replica must leave.
    Panicked(String),
}

/// The pipeline's view of the service while one job runs: progress goes to the job's
/// status (at most every [`CHECK_INTERVAL`]); between steps cancellation and shutdown
/// are checked; before every write the lease is asked (the fence). The lease itself
/// is renewed by its own task ([`KeptLease`]).
struct ServiceControl<'w> {
    worker: &'w Worker,
    job_id: String,
    lease: &'w KeptLease,
    status: RefCell<JobStatus>,
    last_check: Cell<Instant>,
    last_status: Cell<Instant>,
    /// When and in which stage the last step ended.
    last_step: Cell<Option<(Instant, Stage)>>,
    /// Exponential moving average of this stage's step times.
    step_seconds: Cell<Option<f64>>,
}

impl ServiceControl<'_> {
    fn write_status(&self) {
        let status = self.status.borrow().clone();
        if let Err(e) = self.lease.put_status(&self.worker.jobs, status) {
            tracing::warn!("writing the job's progress failed: {e}");
        }
        self.last_status.set(Instant::now());
    }
}

impl JobControl for ServiceControl<'_> {
    fn step(&self, stage: Stage, step: usize, total: usize, losses: &[(&str, f64)]) {
        let now = Instant::now();
        let previous = self.last_step.replace(Some((now, stage)));
        let new_stage = previous.is_none_or(|(_, previous_stage)| previous_stage != stage);
        match previous {
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
                Stage::Writing => TrainingStage::Writing,
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
        // A new stage is shown at once: watchers (and a cancel) see the writing phase.
        if new_stage || step == total || now - self.last_status.get() >= CHECK_INTERVAL {
            self.write_status();
        }
    }

    fn stop(&self) -> Option<StopReason> {
        if self.lease.lost() {
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
        match self
            .worker
            .runtime
            .block_on(jobs.cancel_requested(&self.job_id))
        {
            Ok(true) => Some(StopReason::Cancelled),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!("checking for cancellation failed: {e}");
                None
            }
        }
    }

    fn may_write(&self) -> Result<(), JobFailure> {
        // While renewals fail (a store outage) the fence is down; wait for the renewal
        // task to get through rather than give up the job: the other replicas' takeover
        // watch leaves the holder a lease's time to renew once the store is back. Only
        // an outage of many leases gives the job back.
        let deadline = Instant::now() + OUTAGE_LEASES * self.worker.config.lease();
        loop {
            if self.lease.lost() {
                return Err(JobFailure::LeaseLost);
            }
            if self.lease.holds() {
                return Ok(());
            }
            if self.worker.shared.shutdown.load(Ordering::SeqCst) {
                return Err(JobFailure::Interrupted(
                    "shut down while the store was unreachable".into(),
                ));
            }
            if Instant::now() >= deadline {
                return Err(JobFailure::Transient(format!(
                    "the job's lease could not be renewed (it expired at {}); giving the \
                     job back",
                    self.lease.expires_at()
                )));
            }
            std::thread::sleep(FENCE_POLL);
        }
    }
}
