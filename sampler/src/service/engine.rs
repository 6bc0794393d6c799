//! The model thread: it alone owns the base model's tensors (README.md, "Load and
//! cancellation"). Generations reach it over a channel, one at a time; it switches the U-Net
//! to the generation's concept (from the untouched base weights, so nothing drifts),
//! renders, and streams progress and images back. Between denoising steps it checks
//! whether the client is still there, so a cancelled call stops within one step.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coreg::base_model::BaseModel;
use coreg::generate::GenerationParams;
use coreg::schedule::SamplerKind;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::OwnedSemaphorePermit;
use tonic::Status;

use crate::cache::{ConceptKey, SharedConcept};
use crate::personalized::{render, ActiveConcept, ImageRequest, Progress, Rendered};

use super::metrics::{Metrics, Outcome};

/// One admitted generation.
pub struct Job {
    /// For logs.
    pub id: String,
    pub concept: Option<Arc<SharedConcept>>,
    pub request: ImageRequest,
    pub events: UnboundedSender<Event>,
    /// Its admission slot, given back when the job is dropped (done or skipped).
    pub permit: OwnedSemaphorePermit,
}

/// What the model thread reports for a job.
pub enum Event {
    Progress {
        optimized_prompts: u32,
        step: u32,
        total_steps: u32,
        /// Mean of the recent denoising steps.
        step_time: Duration,
        /// At that pace, to the end of the request's denoising.
        eta: Duration,
    },
    Image(FinishedImage),
    Failed(Status),
}

pub struct FinishedImage {
    pub index: u32,
    pub prompt: String,
    pub seed: u64,
    /// `None` when the latents became non-finite.
    pub png: Option<Vec<u8>>,
    pub width: u32,
    pub height: u32,
}

pub struct Engine {
    pub model: BaseModel,
    pub jobs: Receiver<Job>,
    pub metrics: Arc<Metrics>,
    /// Set on SIGTERM: the queue is drained and the thread ends.
    pub shutdown: Arc<AtomicBool>,
}

/// Denoising steps averaged for the reported step time.
const STEP_WINDOW: usize = 8;

impl Engine {
    /// Makes sure the model runs end to end (a short generation through every
    /// component), so that readiness means "can serve".
    pub fn warm_up(&self) -> coreg::Result<()> {
        self.model.warm_up()?;
        let request = ImageRequest {
            prompts: vec!["a photo".into()],
            negative_prompt: String::new(),
            images_per_prompt: 1,
            seeds: vec![0],
            params: GenerationParams {
                steps: 1,
                height: 64,
                width: 64,
                sampler: SamplerKind::DpmSolverPlusPlus,
                ..GenerationParams::default()
            },
            tto: None,
        };
        render(&self.model, None, &request, |_| ControlFlow::Continue(()))?;
        Ok(())
    }

    /// Runs jobs until shutdown is asked and the queue is empty, or every sender is
    /// gone.
    pub fn run(mut self) {
        let mut active: Option<(ConceptKey, ActiveConcept)> = None;
        loop {
            let job = match self.jobs.recv_timeout(Duration::from_millis(100)) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    if self.shutdown.load(Ordering::SeqCst) {
                        return;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            self.run_job(job, &mut active);
        }
    }

    fn run_job(&mut self, job: Job, active: &mut Option<(ConceptKey, ActiveConcept)>) {
        let span = tracing::info_span!("generate", id = %job.id);
        let _entered = span.enter();
        let metrics = self.metrics.clone();
        if job.events.is_closed() {
            tracing::info!("the client left before its turn");
            metrics.ended(Outcome::Cancelled);
            return;
        }
        let started = Instant::now();
        // A libtorch panic inside one request must not take the service down.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.generate(&job, active)))
            .unwrap_or_else(|panic| {
                // The U-Net may hold a half-applied delta: switch afresh next time.
                *active = None;
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic without a message");
                Err(Status::internal(format!("generation failed: {message}")))
            });
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "failed");
                let _ = job.events.send(Event::Failed(status));
                Outcome::Failed
            }
        };
        metrics.ended(outcome);
        tracing::info!(?outcome, seconds = started.elapsed().as_secs_f64(), "ended");
        drop(job.permit);
    }

    fn generate(
        &mut self,
        job: &Job,
        active: &mut Option<(ConceptKey, ActiveConcept)>,
    ) -> Result<Outcome, Status> {
        let engine_error = |e: coreg::Error| match e {
            coreg::Error::InvalidInput(message) => Status::invalid_argument(message),
            e => Status::internal(e.to_string()),
        };
        // Switch the U-Net only when the concept changes: consecutive requests for one
        // concept pay nothing.
        match &job.concept {
            Some(concept) => {
                let concept = concept.loaded();
                let key = (
                    concept.manifest.concept.clone(),
                    concept.manifest.version.clone(),
                );
                if active.as_ref().map(|(k, _)| k) != Some(&key) {
                    *active = None;
                    let activated =
                        ActiveConcept::activate(&mut self.model, concept).map_err(engine_error)?;
                    *active = Some((key, activated));
                }
            }
            None => {
                if active.take().is_some() {
                    self.model.restore_unet().map_err(engine_error)?;
                }
            }
        }
        let concept = active.as_ref().map(|(_, c)| c);

        let request = &job.request;
        let prompts = request.prompts.len();
        let total = request.params.steps;
        let mut optimized = 0u32;
        let mut recent: VecDeque<Duration> = VecDeque::with_capacity(STEP_WINDOW);
        let mut last = Instant::now();
        let metrics = &self.metrics;
        let events = &job.events;
        let rendered = render(&self.model, concept, request, |progress| {
            if events.is_closed() {
                return ControlFlow::Break(());
            }
            let (prompt, step) = match progress {
                Progress::Optimized { prompt } => {
                    optimized += 1;
                    last = Instant::now();
                    (prompt, 0)
                }
                Progress::Denoised { prompt, step, .. } => {
                    let now = Instant::now();
                    if recent.len() == STEP_WINDOW {
                        recent.pop_front();
                    }
                    recent.push_back(now - last);
                    last = now;
                    metrics.denoising_steps.inc();
                    metrics
                        .step_seconds
                        .set(recent.back().expect("just pushed").as_secs_f64());
                    (prompt, step)
                }
            };
            let step_time = if recent.is_empty() {
                Duration::ZERO
            } else {
                recent.iter().sum::<Duration>() / recent.len() as u32
            };
            let remaining = (total - step) + (prompts - prompt - 1) * total;
            let sent = events.send(Event::Progress {
                optimized_prompts: optimized,
                step: step as u32,
                total_steps: total as u32,
                step_time,
                eta: step_time * remaining as u32,
            });
            if sent.is_err() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .map_err(engine_error)?;
        let images = match rendered {
            Rendered::Completed { images, .. } => images,
            Rendered::Cancelled { .. } => {
                tracing::info!("the client left: stopped between steps");
                return Ok(Outcome::Cancelled);
            }
        };
        for image in images {
            metrics.images.inc();
            let finite = image.is_finite();
            let sent = events.send(Event::Image(FinishedImage {
                index: image.index as u32,
                prompt: request.prompts[image.index / request.images_per_prompt].clone(),
                seed: image.seed,
                png: finite.then_some(image.png),
                width: request.params.width,
                height: request.params.height,
            }));
            if sent.is_err() {
                return Ok(Outcome::Cancelled);
            }
        }
        Ok(Outcome::Completed)
    }
}
