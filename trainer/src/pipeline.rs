//! One training job from start to stored concept: images → stage 1 → stage 2 →
//! artifacts, with checkpoints in the store so that a stopped run resumes exactly.
//!
//! Everything heavy runs on the calling thread (the model thread); the object store is
//! async and reached through a runtime handle.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use coreg::artifact::{
    base_model_identity, unet_delta, write_concept, ConceptArtifacts, LearnedEmbedding,
    LossHistory, UNetDelta,
};
use coreg::dataset::{BatchShape, TrainingImages};
use coreg::generate::Pipeline;
use coreg::images::ImageLimits;
use coreg::method::losses::LossVariant;
use coreg::method::prompts::{PromptSet, PromptSetKind};
use coreg::method::regularization::RegularizationTerms;
use coreg::method::rescale::RescaleWindow;
use coreg::method::stage1::{FrozenModels, Stage1, Stage1Config, Stage1Scalars, Stage1State};
use coreg::method::stage2::{
    MixedPrecision, Stage2, Stage2Config, Stage2Models, Stage2Scalars, Stage2State,
};
use coreg::model::tokenizer::ClipTokenizer;
use coreg::optim::AdamWConfig;
use coreg::store::Store;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};
use tokio::runtime::{Handle, Runtime};

use crate::exit::JobFailure;
use crate::job::JobSpec;
use crate::previews::{preview_name, PreviewPlan};
use crate::progress::Progress;
use coreg::base_model::{parse_device, BaseModel};

/// Most photos a job may train on, and the fewest (the paper uses 3–10).
pub const MAX_IMAGES: usize = 20;

/// Runs the job in `path` to completion; returns a one-line summary.
pub fn run_job_file(path: &Path, job_id: Option<String>) -> Result<String, JobFailure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| JobFailure::InvalidJob(format!("{}: {e}", path.display())))?;
    let spec = JobSpec::from_toml(&text)
        .map_err(|e| JobFailure::InvalidJob(format!("{}: {e}", path.display())))?;
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

/// Which part of a job is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Stage 1: the concept's embedding.
    Embedding,
    /// Stage 2: the U-Net.
    UNet,
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
}

/// The one-shot `run`: progress lines on the terminal, SIGTERM/SIGINT as shutdown.
struct TerminalControl {
    stop: Arc<AtomicBool>,
    progress: RefCell<Option<(Stage, Progress)>>,
}

impl JobControl for TerminalControl {
    fn step(&self, stage: Stage, step: usize, total: usize, losses: &[(&str, f64)]) {
        let mut progress = self.progress.borrow_mut();
        if progress.as_ref().is_none_or(|(s, _)| *s != stage) {
            let name = match stage {
                Stage::Embedding => "stage 1",
                Stage::UNet => "stage 2",
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
}

/// Where a job's run stands in the store (`jobs/<id>/checkpoint.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
enum Checkpoint {
    Stage1 {
        tensors: String,
        scalars: Stage1Scalars,
        losses: LossHistory,
    },
    Stage2 {
        embedding: String,
        tensors: String,
        scalars: Stage2Scalars,
        losses: LossHistory,
    },
}

/// What a stage needs to render its validation previews.
struct Previewer<'a> {
    plan: &'a PreviewPlan,
    placeholder: &'a str,
    placeholder_id: i64,
}

fn bad_input(e: coreg::Error) -> JobFailure {
    JobFailure::BadInput(e.to_string())
}

fn failed(e: coreg::Error) -> JobFailure {
    JobFailure::Failed(e.to_string())
}

fn transient(e: coreg::Error) -> JobFailure {
    JobFailure::Transient(e.to_string())
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
        }
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    fn key(&self, name: &str) -> String {
        format!("jobs/{}/{name}", self.id)
    }

    /// The photos' encoded bytes, from the job's folder or the store.
    fn image_bytes(&self) -> Result<Vec<Vec<u8>>, JobFailure> {
        let images = &self.spec.images;
        let bytes: Vec<Vec<u8>> = if let Some(folder) = &images.folder {
            let folder = self.resolve(folder);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
                .map_err(|e| {
                    JobFailure::BadInput(format!("images.folder {}: {e}", folder.display()))
                })?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            if files.len() > MAX_IMAGES {
                return Err(JobFailure::BadInput(format!(
                    "{} holds {} files; a job trains on at most {MAX_IMAGES} images",
                    folder.display(),
                    files.len()
                )));
            }
            files
                .iter()
                .map(|p| {
                    std::fs::read(p)
                        .map_err(|e| JobFailure::BadInput(format!("{}: {e}", p.display())))
                })
                .collect::<Result<_, _>>()?
        } else {
            if images.keys.len() > MAX_IMAGES {
                return Err(JobFailure::BadInput(format!(
                    "{} image keys; a job trains on at most {MAX_IMAGES} images",
                    images.keys.len()
                )));
            }
            images
                .keys
                .iter()
                .map(|key| {
                    self.runtime
                        .block_on(self.store.get(key))
                        .map(|b| b.to_vec())
                        .map_err(|e| match e {
                            coreg::Error::NotFound { .. } => JobFailure::BadInput(e.to_string()),
                            other => transient(other),
                        })
                })
                .collect::<Result<_, _>>()?
        };
        if bytes.is_empty() {
            return Err(JobFailure::BadInput(
                "the job has no training images".into(),
            ));
        }
        Ok(bytes)
    }

    fn stage1_config(&self) -> Result<Stage1Config, JobFailure> {
        let t = &self.spec.training;
        let s = &self.spec.stage1;
        let kind: PromptSetKind = t.prompt_set.parse().map_err(|e: coreg::Error| {
            JobFailure::InvalidJob(format!("training.prompt_set: {e}"))
        })?;
        let prompt_set = match kind {
            PromptSetKind::Custom => PromptSet::custom(t.custom_prompts.clone())
                .map_err(|e| JobFailure::InvalidJob(format!("training.custom_prompts: {e}")))?,
            _ if !t.custom_prompts.is_empty() => {
                return Err(JobFailure::InvalidJob(
                    "training.custom_prompts: only with prompt_set = \"custom\"".into(),
                ))
            }
            builtin => PromptSet::builtin(builtin).map_err(bad_input)?,
        };
        let variant: LossVariant = t.loss_variant.parse().map_err(|e: coreg::Error| {
            JobFailure::InvalidJob(format!("training.loss_variant: {e}"))
        })?;
        let mut config = Stage1Config::new(prompt_set);
        config.variant = variant;
        config.resolution = t.resolution as usize;
        config.steps = s.steps.unwrap_or(config.steps);
        config.batch_size = s.batch_size.unwrap_or(config.batch_size);
        config.optimizer = AdamWConfig {
            lr: s.learning_rate.unwrap_or(config.optimizer.lr),
            weight_decay: s.weight_decay.unwrap_or(config.optimizer.weight_decay),
            ..config.optimizer
        };
        config.weights.embedding = s.lambda_embedding.unwrap_or(config.weights.embedding);
        config.weights.attention = s.lambda_attention.unwrap_or(config.weights.attention);
        config.terms = RegularizationTerms {
            embedding: s.embedding_loss,
            attention: s.attention_loss,
        };
        config.rescale = if s.rescaling {
            let default = RescaleWindow::default();
            Some(RescaleWindow {
                record_at: s.rescale_record_at.unwrap_or(default.record_at),
                until: s.rescale_until.unwrap_or(default.until),
            })
        } else {
            None
        };
        config
            .validate()
            .map_err(|e| JobFailure::InvalidJob(format!("stage1: {e}")))?;
        Ok(config)
    }

    fn stage2_config(&self, device: Device) -> Result<Stage2Config, JobFailure> {
        let s = &self.spec.stage2;
        let defaults = Stage2Config::default();
        let mixed_precision = match s.precision.as_deref() {
            None | Some("fp32") => MixedPrecision::Fp32,
            Some("bf16") => MixedPrecision::Bf16,
            Some("fp16") => MixedPrecision::Fp16,
            Some(other) => {
                return Err(JobFailure::InvalidJob(format!(
                    "stage2.precision: {other:?} is not fp32, bf16 or fp16"
                )))
            }
        };
        let config = Stage2Config {
            steps: s.steps.unwrap_or(defaults.steps),
            batch_size: s.batch_size.unwrap_or(defaults.batch_size),
            optimizer: AdamWConfig {
                lr: s.learning_rate.unwrap_or(defaults.optimizer.lr),
                weight_decay: s.weight_decay.unwrap_or(defaults.optimizer.weight_decay),
                ..defaults.optimizer
            },
            gradient_checkpointing: s.gradient_checkpointing,
            mixed_precision,
            resolution: self.spec.training.resolution as usize,
        };
        if config.steps > 0 {
            config
                .validate(device)
                .map_err(|e| JobFailure::InvalidJob(format!("stage2: {e}")))?;
        }
        Ok(config)
    }

    fn load_checkpoint(&self) -> Result<Option<Checkpoint>, JobFailure> {
        match self
            .runtime
            .block_on(self.store.get(&self.key("checkpoint.json")))
        {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| JobFailure::Failed(format!("unreadable checkpoint record: {e}"))),
            Err(coreg::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(transient(e)),
        }
    }

    /// Writes a stage's state tensors under `jobs/<id>/checkpoints/`; the caller then
    /// points `checkpoint.json` at them and drops the previous file, so a crash between
    /// the two leaves the previous checkpoint in force.
    fn put_tensors(&self, name: &str, tensors: &[(String, Tensor)]) -> Result<String, JobFailure> {
        let named: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        let bytes =
            coreg::artifact::tensor_file::encode(&named, Default::default()).map_err(failed)?;
        let path = self.key(&format!("checkpoints/{name}.safetensors"));
        self.runtime
            .block_on(self.store.put_overwrite(&path, Bytes::from(bytes)))
            .map_err(transient)?;
        Ok(path)
    }

    /// Points `checkpoint.json` at `checkpoint`, then deletes the state file the
    /// previous pointer named (unless it is still referenced).
    fn advance_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), JobFailure> {
        self.put_checkpoint(checkpoint)?;
        let current = match checkpoint {
            Checkpoint::Stage1 { tensors, .. } | Checkpoint::Stage2 { tensors, .. } => tensors,
        };
        let previous = self.state_file.borrow_mut().replace(current.clone());
        if let Some(old) = previous {
            if &old != current {
                self.runtime
                    .block_on(self.store.delete(&old))
                    .map_err(transient)?;
            }
        }
        Ok(())
    }

    fn get_tensors(&self, path: &str) -> Result<Vec<(String, Tensor)>, JobFailure> {
        let bytes = self
            .runtime
            .block_on(self.store.get(path))
            .map_err(transient)?;
        let (tensors, _) = coreg::artifact::tensor_file::decode(path, &bytes).map_err(failed)?;
        Ok(tensors.into_iter().collect())
    }

    fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), JobFailure> {
        let bytes = serde_json::to_vec_pretty(checkpoint).expect("checkpoints serialize");
        self.runtime
            .block_on(
                self.store
                    .put_overwrite(&self.key("checkpoint.json"), Bytes::from(bytes)),
            )
            .map_err(transient)
    }

    /// Trains the job to its concept on `model`, resuming from the job's checkpoint if
    /// there is one; the model's U-Net is back to its base weights afterwards.
    pub fn run(&self, model: &mut BaseModel) -> Result<String, JobFailure> {
        model.restore_unet().map_err(failed)?;
        let result = self.train(model);
        model.restore_unet().map_err(failed)?;
        if matches!(result, Err(JobFailure::Cancelled)) {
            // A cancelled job is never resumed: its checkpoints are garbage.
            self.discard_checkpoints()?;
        }
        result
    }

    fn train(&self, model: &mut BaseModel) -> Result<String, JobFailure> {
        let spec = &self.spec;
        if let Some(manifest) = self.finished()? {
            return Ok(format!("already done: {manifest}"));
        }
        // Fail fast on a store that cannot be written, before any training.
        let record = serde_json::to_vec_pretty(&self.spec_for_manifest()).expect("JSON");
        self.runtime
            .block_on(
                self.store
                    .put_overwrite(&self.key("job.json"), Bytes::from(record)),
            )
            .map_err(|e| JobFailure::Transient(format!("the store is not writable: {e}")))?;
        let device = model.device;
        let stage1_config = self.stage1_config()?;
        let stage2_config = self.stage2_config(device)?;
        let limits = ImageLimits::default();
        let photos = TrainingImages::decode(&self.image_bytes()?, &limits)
            .map_err(bad_input)?
            .downscaled(2 * spec.training.resolution);

        let mut tokenizer = model.tokenizer.clone();
        let placeholder = spec
            .concept
            .token
            .clone()
            .unwrap_or_else(|| format!("<{}>", spec.concept.name));
        tokenizer
            .add_placeholder(&placeholder)
            .map_err(|e| JobFailure::InvalidJob(format!("concept.token: {e}")))?;
        let placeholder_id = tokenizer
            .token_id(&placeholder)
            .expect("the placeholder was just added");
        let preview_plan = self.preview_plan(&stage1_config, &tokenizer, &placeholder)?;
        let previewer = preview_plan.as_ref().map(|plan| Previewer {
            plan,
            placeholder: &placeholder,
            placeholder_id,
        });
        if stage2_config.steps > 0 {
            model.mark_unet_trained();
        }
        let (folder, text_encoder, vae, schedule) = (
            &model.folder,
            &model.text_encoder,
            &model.vae,
            &model.schedule,
        );
        let category = spec.concept.category.trim().to_string();

        let mut checkpoint = self.load_checkpoint()?;
        if let Some(c) = &checkpoint {
            let (stage, step, tensors) = match c {
                Checkpoint::Stage1 {
                    scalars, tensors, ..
                } => (1, scalars.step, tensors),
                Checkpoint::Stage2 {
                    scalars, tensors, ..
                } => (2, scalars.step, tensors),
            };
            *self.state_file.borrow_mut() = Some(tensors.clone());
            tracing::info!(job = %self.id, stage, step, "resuming from checkpoint");
        }

        // Stage 1: the embedding.
        let (embedding, mut losses) = {
            let models = FrozenModels {
                text_encoder,
                unet: &model.unet,
                vae,
                schedule,
                prediction_type: folder.scheduler.prediction_type,
            };
            let stage1 = Stage1::new(
                stage1_config.clone(),
                models,
                &tokenizer,
                &placeholder,
                &category,
            )
            .map_err(bad_input)?;
            match checkpoint.take() {
                Some(Checkpoint::Stage2 {
                    embedding,
                    tensors,
                    scalars,
                    losses,
                }) => {
                    checkpoint = Some(Checkpoint::Stage2 {
                        embedding: embedding.clone(),
                        tensors,
                        scalars,
                        losses: losses.clone(),
                    });
                    let mut stored = self.get_tensors(&embedding)?;
                    let (_, vector) = stored.pop().ok_or_else(|| {
                        JobFailure::Failed("stage-2 checkpoint lacks the embedding".into())
                    })?;
                    (vector, losses)
                }
                previous => {
                    let (mut state, losses) = match previous {
                        Some(Checkpoint::Stage1 {
                            tensors,
                            scalars,
                            losses,
                        }) => (
                            stage1
                                .restore_state(self.get_tensors(&tensors)?, &scalars)
                                .map_err(failed)?,
                            losses,
                        ),
                        _ => (
                            stage1.init_state().map_err(bad_input)?,
                            LossHistory::default(),
                        ),
                    };
                    let pipeline = Pipeline {
                        tokenizer: &tokenizer,
                        text_encoder,
                        unet: &model.unet,
                        vae,
                        scheduler: &folder.scheduler,
                    };
                    let previews = previewer.as_ref().map(|p| (p, pipeline));
                    let losses = self.run_stage1(
                        &stage1,
                        &mut state,
                        &photos,
                        losses,
                        schedule.num_train_timesteps(),
                        previews,
                    )?;
                    (state.embedding.detach().copy(), losses)
                }
            }
        };

        // Stage 2: the U-Net.
        if stage2_config.steps > 0 {
            let embedding_blob = self.put_tensors(
                "embedding",
                &[("embedding".into(), embedding.shallow_clone())],
            )?;
            let models = Stage2Models {
                text_encoder,
                unet: &mut model.unet,
                unet_config: &folder.unet,
                vae,
                schedule,
                prediction_type: folder.scheduler.prediction_type,
            };
            let stage2 = Stage2::new(stage2_config, models, &tokenizer, &placeholder, &embedding)
                .map_err(bad_input)?;
            let mut state = match checkpoint.take() {
                Some(Checkpoint::Stage2 {
                    tensors,
                    scalars,
                    losses: stored,
                    ..
                }) => {
                    losses = stored;
                    stage2
                        .restore_state(self.get_tensors(&tensors)?, &scalars)
                        .map_err(failed)?
                }
                _ => stage2.init_state().map_err(failed)?,
            };
            let pipeline = Pipeline {
                tokenizer: &tokenizer,
                text_encoder,
                unet: stage2.unet(),
                vae,
                scheduler: &folder.scheduler,
            };
            let previews = previewer.as_ref().map(|p| (p, pipeline));
            losses = self.run_stage2(
                &stage2,
                &mut state,
                &photos,
                losses,
                &embedding_blob,
                previews,
            )?;
        }
        model.unet.vars.freeze();

        // Artifacts.
        let tuned = unet_delta::snapshot(&model.unet.vars, Device::Cpu).map_err(failed)?;
        let base = model.base_unet();
        let delta = match spec.stage2.delta_rank {
            Some(rank) => UNetDelta::low_rank(base, &tuned, rank as i64),
            None => UNetDelta::exact(base, &tuned),
        }
        .map_err(failed)?;
        let training_latents = self.training_latents(&photos, &model.vae)?;
        let hyper_parameters = serde_json::json!({
            "job": self.spec_for_manifest(),
            "stage1": {
                "steps": stage1_config.steps,
                "batch_size": stage1_config.batch_size,
                "learning_rate": stage1_config.optimizer.lr,
                "weight_decay": stage1_config.optimizer.weight_decay,
                "lambda_embedding": stage1_config.weights.embedding,
                "lambda_attention": stage1_config.weights.attention,
                "embedding_loss": stage1_config.terms.embedding,
                "attention_loss": stage1_config.terms.attention,
                "rescale": stage1_config.rescale.map(|w| [w.record_at, w.until]),
                "loss_variant": stage1_config.variant.name(),
                "prompt_set": stage1_config.prompt_set.kind().name(),
                "prompt_templates": stage1_config.prompt_set.templates(),
                "resolution": stage1_config.resolution,
            },
            "stage2": serde_json::to_value(stage2_config).unwrap_or_default(),
        });
        let base_model = base_model_identity(&model.folder).map_err(transient)?;
        let artifacts = ConceptArtifacts {
            embedding: LearnedEmbedding::new(&placeholder, &embedding).map_err(failed)?,
            unet_delta: delta,
            training_latents,
            super_category: category,
            base_model,
            hyper_parameters,
            seed: spec.training.seed,
            losses,
        };
        let version = spec
            .concept
            .version
            .clone()
            .unwrap_or_else(|| self.id.clone());
        let written = self
            .runtime
            .block_on(write_concept(
                &self.store,
                &spec.concept.name,
                &version,
                artifacts,
            ))
            .map_err(|e| match e {
                coreg::Error::AlreadyExists { .. } => JobFailure::BadInput(e.to_string()),
                coreg::Error::InvalidInput(_) => failed(e),
                other => transient(other),
            })?;
        self.finish(&written.path)?;
        Ok(format!(
            "wrote {} (sha256 {})",
            written.path, written.sha256
        ))
    }

    /// Records the result and drops the checkpoints, which the concept supersedes.
    fn finish(&self, manifest: &str) -> Result<(), JobFailure> {
        let result = serde_json::json!({ "manifest": manifest });
        self.runtime
            .block_on(
                self.store
                    .put_overwrite(&self.key("result.json"), Bytes::from(result.to_string())),
            )
            .map_err(transient)?;
        self.discard_checkpoints()
    }

    /// Deletes the checkpoint record first, so that a crash part-way leaves no record
    /// naming a deleted checkpoint, then the checkpoints.
    fn discard_checkpoints(&self) -> Result<(), JobFailure> {
        self.runtime
            .block_on(self.store.delete(&self.key("checkpoint.json")))
            .map_err(transient)?;
        let checkpoints = self
            .runtime
            .block_on(self.store.list(&self.key("checkpoints/")))
            .map_err(transient)?;
        for object in checkpoints {
            self.runtime
                .block_on(self.store.delete(&object.path))
                .map_err(transient)?;
        }
        Ok(())
    }

    /// The manifest a finished run of this job wrote, if any.
    fn finished(&self) -> Result<Option<String>, JobFailure> {
        match self
            .runtime
            .block_on(self.store.get(&self.key("result.json")))
        {
            Ok(bytes) => {
                let value: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| JobFailure::Failed(format!("unreadable job result: {e}")))?;
                Ok(value["manifest"].as_str().map(str::to_owned))
            }
            Err(coreg::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(transient(e)),
        }
    }

    fn batch_shape(&self, batch_size: usize, num_train_timesteps: usize) -> BatchShape {
        BatchShape {
            batch_size,
            resolution: self.spec.training.resolution,
            latent_channels: 4,
            num_train_timesteps,
        }
    }

    /// The job as the manifest records it; store options may hold credentials, so
    /// only their keys are kept.
    fn spec_for_manifest(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(&self.spec).unwrap_or_default();
        if let Some(options) = value.pointer_mut("/store/options") {
            let keys: Vec<String> = self.spec.store.options.keys().cloned().collect();
            *options = serde_json::json!(keys);
        }
        value
    }

    /// The job's preview plan (none unless `previews.every` is set), checked against
    /// the tokenizer and recorded at `jobs/<id>/previews/plan.json`.
    fn preview_plan(
        &self,
        stage1: &Stage1Config,
        tokenizer: &ClipTokenizer,
        placeholder: &str,
    ) -> Result<Option<PreviewPlan>, JobFailure> {
        let spec = &self.spec.previews;
        let Some(every) = spec.every else {
            return Ok(None);
        };
        let plan = PreviewPlan::new(
            every,
            &spec.prompts,
            &stage1.prompt_set,
            spec.steps,
            self.spec.training.seed,
            self.spec.training.resolution,
        );
        for template in &plan.templates {
            let prompt = coreg::method::prompts::fill_template(template, placeholder);
            let tokens = tokenizer.encode(&prompt).map_err(bad_input)?;
            if tokens.truncated {
                return Err(JobFailure::InvalidJob(format!(
                    "previews.prompts: {prompt:?} is {} CLIP tokens long; the limit is {}",
                    tokens.untruncated_len,
                    tokens.ids.len()
                )));
            }
        }
        let record = serde_json::to_vec_pretty(&plan).expect("JSON");
        self.runtime
            .block_on(
                self.store
                    .put_overwrite(&self.key("previews/plan.json"), Bytes::from(record)),
            )
            .map_err(transient)?;
        Ok(Some(plan))
    }

    /// Renders and stores the previews of `step` if one is due. Previews are a pure
    /// function of the step's weights, so a resumed run rewrites identical images.
    fn write_previews(
        &self,
        previewer: &Previewer<'_>,
        pipeline: &Pipeline<'_>,
        stage: u8,
        step: usize,
        total: usize,
        embedding: &Tensor,
    ) -> Result<(), JobFailure> {
        if !previewer.plan.due(step, total) {
            return Ok(());
        }
        let images = previewer
            .plan
            .render(
                pipeline,
                previewer.placeholder,
                previewer.placeholder_id,
                embedding,
            )
            .map_err(failed)?;
        for (index, png) in images.into_iter().enumerate() {
            let key = self.key(&preview_name(stage, step, index));
            self.runtime
                .block_on(self.store.put_overwrite(&key, Bytes::from(png)))
                .map_err(transient)?;
        }
        tracing::info!(stage, step, "previews written");
        Ok(())
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

    fn checkpoint_due(&self, step: usize, total: usize) -> bool {
        let every = self.spec.checkpoints.every;
        step == total || (every > 0 && step % every == 0)
    }

    fn run_stage1(
        &self,
        stage1: &Stage1<'_>,
        state: &mut Stage1State,
        photos: &TrainingImages,
        mut losses: LossHistory,
        num_train_timesteps: usize,
        previews: Option<(&Previewer<'_>, Pipeline<'_>)>,
    ) -> Result<LossHistory, JobFailure> {
        let config = stage1.config();
        let device = state.embedding.device();
        let shape = self.batch_shape(config.batch_size, num_train_timesteps);
        while state.step < config.steps {
            let batch = photos
                .stage1_batch(
                    self.spec.training.seed,
                    state.step,
                    &shape,
                    config.prompt_set.len(),
                    device,
                )
                .map_err(failed)?;
            let step = stage1.step(state, &batch).map_err(failed)?;
            let record = [
                ("total", Some(step.total)),
                ("diffusion", Some(step.diffusion)),
                ("embedding", step.embedding),
                ("attention", step.attention),
            ];
            for (term, value) in record {
                if let Some(v) = value {
                    losses.stage1.entry(term.into()).or_default().push(v as f32);
                }
            }
            let mut reported = vec![("total", step.total), ("diffusion", step.diffusion)];
            reported.extend(step.embedding.map(|v| ("embedding", v)));
            reported.extend(step.attention.map(|v| ("attention", v)));
            self.control
                .step(Stage::Embedding, state.step, config.steps, &reported);
            if let Some((previewer, pipeline)) = &previews {
                self.write_previews(
                    previewer,
                    pipeline,
                    1,
                    state.step,
                    config.steps,
                    &state.embedding,
                )?;
            }
            let stop = self.shutting_down()?;
            if stop || self.checkpoint_due(state.step, config.steps) {
                let (tensors, scalars) = state.checkpoint();
                let tensors = self.put_tensors(&format!("stage1-{:06}", state.step), &tensors)?;
                self.advance_checkpoint(&Checkpoint::Stage1 {
                    tensors,
                    scalars,
                    losses: losses.clone(),
                })?;
                if stop && state.step < config.steps {
                    return Err(JobFailure::Transient(format!(
                        "stopped after stage-1 step {}; run the job again to resume",
                        state.step
                    )));
                }
            }
        }
        Ok(losses)
    }

    fn run_stage2(
        &self,
        stage2: &Stage2<'_>,
        state: &mut Stage2State,
        photos: &TrainingImages,
        mut losses: LossHistory,
        embedding_blob: &str,
        previews: Option<(&Previewer<'_>, Pipeline<'_>)>,
    ) -> Result<LossHistory, JobFailure> {
        let config = stage2.config();
        let device = stage2.unet().vars.device();
        let shape = self.batch_shape(config.batch_size, stage2.schedule().num_train_timesteps());
        while state.step < config.steps {
            let batch = photos
                .stage2_batch(self.spec.training.seed, state.step, &shape, device)
                .map_err(failed)?;
            let step = stage2.step(state, &batch).map_err(failed)?;
            losses
                .stage2
                .entry("diffusion".into())
                .or_default()
                .push(step.diffusion as f32);
            self.control.step(
                Stage::UNet,
                state.step,
                config.steps,
                &[("diffusion", step.diffusion)],
            );
            if let Some((previewer, pipeline)) = &previews {
                let embedding = stage2.concept_embedding();
                self.write_previews(previewer, pipeline, 2, state.step, config.steps, embedding)?;
            }
            let stop = self.shutting_down()?;
            if stop || self.checkpoint_due(state.step, config.steps) {
                let (tensors, scalars) = stage2.checkpoint(state);
                let tensors = self.put_tensors(&format!("stage2-{:06}", state.step), &tensors)?;
                self.advance_checkpoint(&Checkpoint::Stage2 {
                    embedding: embedding_blob.to_string(),
                    tensors,
                    scalars,
                    losses: losses.clone(),
                })?;
                if stop && state.step < config.steps {
                    return Err(JobFailure::Transient(format!(
                        "stopped after stage-2 step {}; run the job again to resume",
                        state.step
                    )));
                }
            }
        }
        Ok(losses)
    }

    /// The photos' VAE posterior means × scaling factor at the training resolution
    /// (resized and centre-cropped, no augmentation): what test-time optimization
    /// noises afresh for each prompt.
    fn training_latents(
        &self,
        photos: &TrainingImages,
        vae: &coreg::model::Component<coreg::model::vae::AutoencoderKl>,
    ) -> Result<Tensor, JobFailure> {
        let _guard = tch::no_grad_guard();
        let pixels =
            centre_crops(photos, self.spec.training.resolution).to_device(vae.vars.device());
        let latents = vae.model.encode(&pixels).mean() * vae.model.scaling_factor();
        Ok(latents.to_device(Device::Cpu).to_kind(Kind::Float))
    }
}

/// Every photo with its shorter side resized to `size` (bilinear) and centre-cropped to
/// a square: [N, 3, size, size] in [−1, 1].
fn centre_crops(photos: &TrainingImages, size: u32) -> Tensor {
    let crops: Vec<Tensor> = photos
        .photos()
        .iter()
        .map(|photo| {
            let (w, h) = coreg::images::augment::shorter_side_to(photo.dimensions(), size);
            let resized =
                image::imageops::resize(photo, w, h, image::imageops::FilterType::Triangle);
            let (x, y) = ((w - size) / 2, (h - size) / 2);
            let crop = image::imageops::crop_imm(&resized, x, y, size, size).to_image();
            Tensor::from_slice(crop.as_raw())
                .view([i64::from(size), i64::from(size), 3])
                .permute([2, 0, 1])
                .to_kind(Kind::Float)
                / 127.5
                - 1.0
        })
        .collect();
    Tensor::stack(&crops, 0)
}
