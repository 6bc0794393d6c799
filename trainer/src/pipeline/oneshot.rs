//! `coreg-trainer run`: one job file trained to completion in this process, progress
//! on the terminal, SIGTERM/SIGINT as a request to checkpoint and stop.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use coreg::base_model::{parse_device, BaseModel};
use coreg::store::Store;
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;

use super::{Job, JobControl, Stage, StopReason};
use crate::exit::JobFailure;
use crate::job::JobSpec;
use crate::progress::Progress;

/// Runs the job in `path` to completion; returns a one-line summary.
pub fn run_job_file(path: &Path, job_id: Option<String>) -> Result<String, JobFailure> {
    let invalid =
        |e: &dyn std::fmt::Display| JobFailure::InvalidJob(format!("{}: {e}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| invalid(&e))?;
    let spec = JobSpec::from_toml(&text).map_err(|e| invalid(&e))?;
    let job_id =
        job_id.unwrap_or_else(|| hex::encode(Sha256::digest(text.as_bytes()))[..16].into());
    coreg::artifact::validate_concept_version(&job_id)
        .map_err(|e| JobFailure::InvalidJob(format!("job id: {e}")))?;
    let base_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();

    let runtime = Runtime::new().map_err(|e| JobFailure::Transient(format!("runtime: {e}")))?;
    let stop = Arc::new(AtomicBool::new(false));
    runtime.spawn(stop_on_signal(stop.clone()));
    let store = Store::open(&spec.store.url, spec.store.options.clone())
        .map_err(|e| JobFailure::InvalidJob(format!("store: {e}")))?;
    let device = parse_device(&spec.model.device)
        .map_err(|e| JobFailure::InvalidJob(format!("model.device: {e}")))?;
    let model_path = if spec.model.path.is_absolute() {
        spec.model.path.clone()
    } else {
        base_dir.join(&spec.model.path)
    };
    let mut model = BaseModel::load(&model_path, device, spec.model.variant.clone())
        .map_err(|e| JobFailure::InvalidJob(format!("model: {e}")))?;
    let control = TerminalControl {
        stop,
        progress: RefCell::new(None),
    };
    let job = Job::new(
        spec,
        base_dir,
        job_id,
        store,
        runtime.handle().clone(),
        &control,
    );
    job.run(&mut model)
}

/// Progress lines on the terminal; SIGTERM/SIGINT as shutdown.
struct TerminalControl {
    stop: Arc<AtomicBool>,
    progress: RefCell<Option<(Stage, Progress)>>,
}

impl JobControl for TerminalControl {
    fn step(&self, stage: Stage, step: usize, total: usize, losses: &[(&str, f64)]) {
        if stage == Stage::Writing {
            if step == 0 {
                eprintln!("writing the concept");
            }
            return;
        }
        let mut progress = self.progress.borrow_mut();
        if progress.as_ref().is_none_or(|(s, _)| *s != stage) {
            let name = match stage {
                Stage::Embedding => "stage 1",
                Stage::UNet | Stage::Writing => "stage 2",
            };
            *progress = Some((stage, Progress::new(name, step - 1, total)));
        }
        if let Some((_, p)) = progress.as_ref() {
            p.step(step, losses);
        }
    }

    fn stop(&self) -> Option<StopReason> {
        self.stop
            .load(Ordering::SeqCst)
            .then_some(StopReason::Shutdown)
    }
}

/// Sets `stop` on SIGTERM or SIGINT; the training loop checkpoints and exits at the
/// next step boundary.
async fn stop_on_signal(stop: Arc<AtomicBool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("stop requested: checkpointing at the next step boundary");
    stop.store(true, Ordering::SeqCst);
}
