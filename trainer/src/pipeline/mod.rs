//! One training job from start to stored concept: images → stage 1 → stage 2 →
//! artifacts, with checkpoints in the store so that a stopped run resumes exactly.
//!
//! [`Job::run`] reads as the job's life; each part can be read alone:
//! - [`settings`]: the job file's values as the method's configurations, and the
//!   hyper-parameters the manifest records (derived from those configurations);
//! - [`inputs`]: the photos, the placeholder token and the previews, checked before any
//!   training;
//! - [`checkpoint`]: the checkpoint record and its tensors in the store, and where a
//!   run resumes;
//! - [`stage1`] and [`stage2`]: each stage's step and checkpoint loop;
//! - [`publish`]: the concept's artifacts, written last, and the job's result;
//! - [`failure`]: how a library error becomes an exit code;
//! - [`oneshot`]: `coreg-trainer run` around all of it.
//!
//! Everything heavy runs on the calling thread (the model thread); the object store is
//! async and reached through a runtime handle.

mod checkpoint;
mod failure;
mod inputs;
mod oneshot;
mod previews;
mod publish;
mod settings;
mod stage1;
mod stage2;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use coreg::base_model::BaseModel;
use coreg::cadence::Cadence;
use coreg::dataset::BatchShape;
use coreg::store::Store;
use tch::Tensor;
use tokio::runtime::Handle;

use crate::exit::JobFailure;
use crate::job::JobSpec;
use checkpoint::Checkpoint;
use failure::Phase;
use previews::Previewer;

pub use checkpoint::discard_checkpoints;
pub use inputs::MAX_IMAGES;
pub use oneshot::run_job_file;

/// Which part of a job is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Stage 1: the concept's embedding.
    Embedding,
    /// Stage 2: the U-Net.
    UNet,
    /// Writing the concept: the U-Net delta, the blobs, the manifest.
    Writing,
}

impl Stage {
    /// 1 or 2 (3 for writing), as checkpoint and preview names spell the stage.
    fn number(self) -> u8 {
        match self {
            Stage::Embedding => 1,
            Stage::UNet => 2,
            Stage::Writing => 3,
        }
    }
}

/// Why a job stops before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The process is shutting down: checkpoint, then give the job back.
    Shutdown,
    /// The user cancelled the job: stop, write nothing more.
    Cancelled,
    /// Another replica holds the job now: stop at once and touch nothing of it.
    LeaseLost,
}

/// What a running job reports to and asks, between steps, whether to go on.
pub trait JobControl {
    /// Step `step` (1-based) of `total` of `stage` completed with these losses.
    fn step(&self, stage: Stage, step: usize, total: usize, losses: &[(&str, f64)]);
    fn stop(&self) -> Option<StopReason>;
    /// The fence, asked before every write for the job: whether this run still holds
    /// the job. A run with nobody to share the job with (`coreg-trainer run`) always
    /// does.
    fn may_write(&self) -> Result<(), JobFailure> {
        Ok(())
    }
}

/// One job's run against a loaded base model: everything it stores lives under
/// `jobs/<id>/` until the concept is written.
pub struct Job<'a> {
    spec: JobSpec,
    base_dir: PathBuf,
    id: String,
    store: Store,
    /// The object store is async; the job runs on a plain thread and blocks on it.
    runtime: Handle,
    control: &'a dyn JobControl,
    /// The state file the current checkpoint points at, deleted once superseded.
    state_file: RefCell<Option<String>>,
    /// The running stage's checkpoint clock, and when its last step (or checkpoint)
    /// ended.
    cadence: RefCell<Option<(Cadence, Instant)>>,
}

impl<'a> Job<'a> {
    /// `base_dir` resolves relative paths in `spec` (the job file's folder).
    pub fn new(
        spec: JobSpec,
        base_dir: PathBuf,
        id: String,
        store: Store,
        runtime: Handle,
        control: &'a dyn JobControl,
    ) -> Self {
        Job {
            spec,
            base_dir,
            id,
            store,
            runtime,
            control,
            state_file: RefCell::new(None),
            cadence: RefCell::new(None),
        }
    }

    /// Trains the job to its concept on `model`, resuming from the job's checkpoint if
    /// there is one; the model's U-Net is back to its base weights afterwards.
    pub fn run(&self, model: &mut BaseModel) -> Result<String, JobFailure> {
        let restore = |model: &mut BaseModel| model.restore_unet().map_err(Phase::Training.of());
        restore(model)?;
        let result = self.train(model);
        restore(model)?;
        // A cancelled job's checkpoints are dropped by whoever ends it (the service's
        // worker, for every final state but success).
        result
    }

    fn train(&self, model: &mut BaseModel) -> Result<String, JobFailure> {
        if let Some(manifest) = self.finished()? {
            return Ok(format!("already done: {manifest}"));
        }
        if let Some(manifest) = self.published()? {
            // An earlier run published and died before recording it: done, not
            // trained again.
            self.finish(&manifest)?;
            return Ok(format!("already published: {manifest}"));
        }
        self.record_job()?;
        let inputs = self.inputs(model)?;
        let resume = self.resume_point()?;
        let (embedding, losses) = self.learn_embedding(model, &inputs, resume.as_ref())?;
        let losses = self.fine_tune_unet(model, &inputs, &embedding, losses, resume)?;
        model.unet.vars.freeze();
        self.publish(model, &inputs, &embedding, losses)
    }

    /// Writes the job as the manifest will record it to `jobs/<id>/job.json`: a store
    /// that cannot be written fails the job here, before any training.
    fn record_job(&self) -> Result<(), JobFailure> {
        let record = serde_json::to_vec_pretty(&self.spec_for_manifest()?)
            .map_err(|e| JobFailure::Failed(format!("recording the job: {e}")))?;
        self.fence()?;
        self.block_on(
            self.store
                .put_overwrite(&self.key("job.json"), Bytes::from(record)),
        )
        .map_err(|e| JobFailure::Transient(format!("the store is not writable: {e}")))
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    /// The store key of `name` in this job's folder.
    fn key(&self, name: &str) -> String {
        format!("jobs/{}/{name}", self.id)
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Asked before every write for the job (see [`JobControl::may_write`]).
    fn fence(&self) -> Result<(), JobFailure> {
        self.control.may_write()
    }

    /// Asked between steps: `Ok(true)` when the job must checkpoint and stop (the
    /// process shuts down); a cancelled job or one another replica took over ends at
    /// once, writing nothing more.
    fn shutting_down(&self) -> Result<bool, JobFailure> {
        match self.control.stop() {
            None => Ok(false),
            Some(StopReason::Shutdown) => Ok(true),
            Some(StopReason::Cancelled) => Err(JobFailure::Cancelled),
            Some(StopReason::LeaseLost) => Err(JobFailure::LeaseLost),
        }
    }

    /// What every step of either stage ends with: progress, the previews due, and a
    /// checkpoint when one is due or the process is stopping, in which case the run
    /// then stops (transient: running the job again resumes from that checkpoint).
    /// `(step, total)` is (the step just done, 1-based; the stage's steps).
    fn after_step(
        &self,
        stage: Stage,
        (step, total): (usize, usize),
        losses: &[(&str, f64)],
        previews: Option<(&Previewer<'_>, &Tensor)>,
        checkpoint: impl FnOnce() -> Result<Checkpoint, JobFailure>,
    ) -> Result<(), JobFailure> {
        self.control.step(stage, step, total, losses);
        crate::failpoint::hit(&format!("stage{}-step-{step}", stage.number()));
        if let Some((previewer, embedding)) = previews {
            self.write_previews(previewer, stage, step, total, embedding)?;
        }
        let stop = self.shutting_down()?;
        if self.checkpoint_due(step, total, stop) {
            let started = Instant::now();
            self.advance_checkpoint(&checkpoint()?)?;
            if let Some((cadence, last)) = self.cadence.borrow_mut().as_mut() {
                cadence.wrote(started.elapsed());
                *last = Instant::now();
            }
            if stop && step < total {
                return Err(JobFailure::Interrupted(format!(
                    "stopped after stage-{} step {step}; run the job again to resume",
                    stage.number()
                )));
            }
        }
        Ok(())
    }

    /// Starts a stage's checkpoint clock; its checkpoints hold about `state_bytes`.
    fn start_cadence(&self, state_bytes: u64) {
        let cadence = Cadence::new(self.spec.checkpoints.policy(), state_bytes);
        *self.cadence.borrow_mut() = Some((cadence, Instant::now()));
    }

    /// Whether the step just done ends with a checkpoint (see `coreg::cadence`).
    fn checkpoint_due(&self, step: usize, total: usize, stopping: bool) -> bool {
        let mut cadence = self.cadence.borrow_mut();
        let Some((cadence, last)) = cadence.as_mut() else {
            return true;
        };
        let now = Instant::now();
        cadence.stepped(now - *last);
        *last = now;
        cadence.due(step, total, stopping).is_some()
    }

    /// The shape of a training batch of `batch_size` at the job's resolution.
    fn batch_shape(&self, batch_size: usize, num_train_timesteps: usize) -> BatchShape {
        BatchShape {
            batch_size,
            resolution: self.spec.training.resolution,
            latent_channels: 4,
            num_train_timesteps,
        }
    }
}
