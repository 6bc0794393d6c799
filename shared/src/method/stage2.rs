//! Stage 2 of CoRe: fine-tuning every U-Net parameter for the concept's identity
//! (docs/method.md, "Stage 2"), with S* and the text encoder frozen and the diffusion loss
//! on "a photo of a S*" alone.
//!
//! Mixed precision (CUDA only) keeps the U-Net's own fp32 weights as the master copy
//! the optimizer updates, and runs forward and backward on a bf16 or fp16 copy of
//! them refreshed before every step; the gradients are upcast to fp32 for AdamW. fp16
//! uses dynamic loss scaling with torch's `GradScaler` defaults, so that small
//! gradients do not underflow: a step whose scaled gradients overflow updates nothing
//! and halves the scale.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::dataset::Stage2Batch;
use crate::method::checks::{check_batch, check_frozen, finite_value};
use crate::method::diffusion::{diffusion_loss, encode_latents, training_prompt_ids};
use crate::model::clip::ClipTextTransformer;
use crate::model::config::UNetConfig;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKl;
use crate::model::Component;
use crate::optim::{AdamW, AdamWConfig, AdamWState};
use crate::schedule::{NoiseSchedule, PredictionType};
use crate::{Error, Result};

/// The precision the U-Net's forward and backward passes run in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// Everything in the weights' own precision (the only choice on the CPU).
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

impl MixedPrecision {
    pub fn name(self) -> &'static str {
        match self {
            MixedPrecision::Fp32 => "fp32",
            MixedPrecision::Bf16 => "bf16",
            MixedPrecision::Fp16 => "fp16",
        }
    }

    /// The kind of the working copy; `None` for fp32 (no copy).
    fn working_kind(self) -> Option<Kind> {
        match self {
            MixedPrecision::Fp32 => None,
            MixedPrecision::Bf16 => Some(Kind::BFloat16),
            MixedPrecision::Fp16 => Some(Kind::Half),
        }
    }
}

impl fmt::Display for MixedPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MixedPrecision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" => Ok(MixedPrecision::Fp32),
            "bf16" => Ok(MixedPrecision::Bf16),
            "fp16" => Ok(MixedPrecision::Fp16),
            _ => Err(Error::InvalidInput(format!(
                "unknown mixed precision {s:?} (expected fp32, bf16 or fp16)"
            ))),
        }
    }
}

/// Stage 2's hyper-parameters; the defaults are the paper's. `steps`, `batch_size`
/// and `resolution` tell the caller what to draw; [`Stage2::step`] takes whatever
/// batch it is given.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stage2Config {
    pub steps: usize,
    pub batch_size: usize,
    #[serde(flatten)]
    pub optimizer: AdamWConfig,
    /// Recompute each U-Net block's activations during backward instead of keeping
    /// them: the same gradients for far less memory.
    pub gradient_checkpointing: bool,
    pub mixed_precision: MixedPrecision,
    /// Side of the square training images in pixels.
    pub resolution: usize,
}

impl Default for Stage2Config {
    /// 1000 steps, batch 4, AdamW lr 2e-6 (β 0.9/0.999, ε 1e-8, decay 1e-2), fp32,
    /// no gradient checkpointing, 512 px.
    fn default() -> Self {
        Stage2Config {
            steps: 1000,
            batch_size: 4,
            optimizer: AdamWConfig::with_lr(2e-6),
            gradient_checkpointing: false,
            mixed_precision: MixedPrecision::Fp32,
            resolution: 512,
        }
    }
}

impl Stage2Config {
    /// Checks the values, and that mixed precision is asked for on CUDA only.
    pub fn validate(&self, device: Device) -> Result<()> {
        if self.steps == 0 || self.batch_size == 0 {
            return Err(Error::InvalidInput(format!(
                "stage 2 needs at least one step and one image per batch, got {} steps of batch {}",
                self.steps, self.batch_size
            )));
        }
        if self.resolution == 0 || self.resolution % 8 != 0 {
            return Err(Error::InvalidInput(format!(
                "stage 2 resolution {} must be a positive multiple of 8",
                self.resolution
            )));
        }
        if self.mixed_precision != MixedPrecision::Fp32 && !device.is_cuda() {
            return Err(Error::InvalidInput(format!(
                "{} mixed precision needs a CUDA device; the U-Net is on {device:?}",
                self.mixed_precision
            )));
        }
        self.optimizer.validate()
    }
}

/// fp16's dynamic loss scale (torch `GradScaler` defaults: start at 2¹⁶, halve on
/// overflow, double after 2000 steps without one).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Consecutive steps without overflow since the scale last changed.
    pub growth_tracker: u32,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale {
            scale: 65536.0,
            growth_tracker: 0,
        }
    }
}

const GROWTH_INTERVAL: u32 = 2000;

impl LossScale {
    fn update(&mut self, overflowed: bool) {
        if overflowed {
            self.scale *= 0.5;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.growth_tracker = 0;
            }
        }
    }
}

/// The models stage 2 runs on. The U-Net is borrowed mutably because stage 2 trains
/// it: its variables are unfrozen, and gradient checkpointing is switched as asked.
pub struct Stage2Models<'a> {
    pub text_encoder: &'a Component<ClipTextTransformer>,
    pub unet: &'a mut Component<UNet2DConditionModel>,
    /// The U-Net's configuration, to build the half-precision working copy.
    pub unet_config: &'a UNetConfig,
    pub vae: &'a Component<AutoencoderKl>,
    pub schedule: &'a NoiseSchedule,
    pub prediction_type: PredictionType,
}

/// Where stage 2 stands (the U-Net's weights themselves live in its `VarStore`).
#[derive(Debug)]
pub struct Stage2State {
    /// AdamW over every U-Net variable, by its diffusers name.
    pub optimizer: AdamW,
    /// Steps taken so far (an fp16 step skipped for overflow counts).
    pub step: usize,
    /// fp16 only.
    pub loss_scale: Option<LossScale>,
}

/// The scalars of a stage-2 checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stage2Scalars {
    pub step: usize,
    pub optimizer_step: u64,
    pub loss_scale: Option<LossScale>,
}

/// What one stage-2 step did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stage2StepLoss {
    pub diffusion: f64,
    /// fp16 only: the scaled gradients overflowed, so the weights were not updated.
    pub update_skipped: bool,
}

const UNET_PREFIX: &str = "unet.";
const OPTIMIZER_PREFIX: &str = "optimizer.";

/// The half-precision U-Net forward and backward run on, refreshed from the master
/// weights before each step.
struct WorkingCopy {
    /// Keeps the copy's variables alive.
    _vars: VarStore,
    kind: Kind,
    model: UNet2DConditionModel,
    /// In the master parameters' order.
    params: Vec<Tensor>,
}

/// Stage 2 over loaded models for one concept.
pub struct Stage2<'a> {
    config: Stage2Config,
    unet: &'a Component<UNet2DConditionModel>,
    vae: &'a Component<AutoencoderKl>,
    schedule: &'a NoiseSchedule,
    prediction_type: PredictionType,
    /// The text encoder's output for "a photo of a S*", [1, 77, D]: both are frozen,
    /// so it is computed once.
    hidden: Tensor,
    /// S* itself `[D]`, for whoever renders with the U-Net being trained.
    embedding: Tensor,
    /// Every U-Net variable by name, sorted.
    params: Vec<(String, Tensor)>,
    working: Option<WorkingCopy>,
}

impl<'a> Stage2<'a> {
    /// `embedding` is the concept's S* from stage 1 (`[D]`); `tokenizer` must hold
    /// `placeholder`. The text encoder and VAE must be frozen. The U-Net's variables
    /// are unfrozen in fp32 mode (freeze them again after stage 2 if the U-Net is used
    /// for anything that should not train it).
    pub fn new(
        config: Stage2Config,
        models: Stage2Models<'a>,
        tokenizer: &ClipTokenizer,
        placeholder: &str,
        embedding: &Tensor,
    ) -> Result<Self> {
        config.validate(models.unet.vars.device())?;
        Self::build(config, models, tokenizer, placeholder, embedding)
    }

    /// [`Stage2::new`] without the device check, so that unit tests can exercise the
    /// mixed-precision path on the CPU.
    fn build(
        config: Stage2Config,
        models: Stage2Models<'a>,
        tokenizer: &ClipTokenizer,
        placeholder: &str,
        embedding: &Tensor,
    ) -> Result<Self> {
        check_frozen("text encoder", &models.text_encoder.vars)?;
        check_frozen("VAE", &models.vae.vars)?;
        let placeholder_id = tokenizer.token_id(placeholder).ok_or_else(|| {
            Error::InvalidInput(format!(
                "the placeholder token {placeholder:?} has not been added to the tokenizer"
            ))
        })?;
        let text_encoder = &models.text_encoder.model;
        let device = models.text_encoder.vars.device();
        let ids = training_prompt_ids(tokenizer, placeholder)?.to_device(device);
        let hidden = tch::no_grad(|| -> Result<Tensor> {
            let embeds = text_encoder.embed_tokens_with(&ids, &[(placeholder_id, embedding)])?;
            Ok(text_encoder.forward_embeds(&embeds))
        })?;

        let unet = models.unet;
        if unet.vars.kind() != Kind::Float {
            return Err(Error::InvalidInput(format!(
                "stage 2 trains the U-Net's weights in fp32, they are {:?}: load the U-Net in \
                 fp32 (mixed precision then runs its passes in bf16 or fp16)",
                unet.vars.kind()
            )));
        }
        let mut params: Vec<(String, Tensor)> = unet.vars.variables().into_iter().collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let working = match config.mixed_precision.working_kind() {
            None => {
                unet.vars.unfreeze();
                unet.model
                    .set_gradient_checkpointing(config.gradient_checkpointing);
                None
            }
            Some(kind) => {
                unet.vars.freeze();
                let mut vars = VarStore::new(unet.vars.device());
                let mut model = UNet2DConditionModel::new(vars.root(), models.unet_config);
                model.set_gradient_checkpointing(config.gradient_checkpointing);
                vars.set_kind(kind);
                let by_name = vars.variables();
                let copies = params
                    .iter()
                    .map(|(name, master)| match by_name.get(name) {
                        Some(copy) if copy.size() == master.size() => Ok(copy.shallow_clone()),
                        _ => Err(Error::InvalidInput(format!(
                            "the U-Net configuration does not match its weights at {name:?}"
                        ))),
                    })
                    .collect::<Result<Vec<_>>>()?;
                if by_name.len() != params.len() {
                    return Err(Error::InvalidInput(
                        "the U-Net configuration declares other variables than its weights".into(),
                    ));
                }
                Some(WorkingCopy {
                    _vars: vars,
                    kind,
                    model,
                    params: copies,
                })
            }
        };
        Ok(Stage2 {
            config,
            unet,
            vae: models.vae,
            schedule: models.schedule,
            prediction_type: models.prediction_type,
            hidden,
            embedding: embedding.detach().copy(),
            params,
            working,
        })
    }

    pub fn config(&self) -> &Stage2Config {
        &self.config
    }

    /// The training noise schedule the timesteps are drawn from.
    pub fn schedule(&self) -> &NoiseSchedule {
        self.schedule
    }

    /// The U-Net being trained, holding the current fp32 weights (with mixed precision
    /// too: the low-precision working copy is refreshed from them every step).
    pub fn unet(&self) -> &Component<UNet2DConditionModel> {
        self.unet
    }

    /// The concept's embedding S* `[D]` this stage trains with.
    pub fn concept_embedding(&self) -> &Tensor {
        &self.embedding
    }

    /// The state before the first step.
    pub fn init_state(&self) -> Result<Stage2State> {
        Ok(Stage2State {
            optimizer: AdamW::new(self.shallow_params(), self.config.optimizer)?,
            step: 0,
            loss_scale: (self.config.mixed_precision == MixedPrecision::Fp16)
                .then(LossScale::default),
        })
    }

    fn shallow_params(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    /// Named tensors and scalars that [`Stage2::restore_state`] turns back into this
    /// state and these U-Net weights. The weights are stored whole (`unet.<name>`),
    /// not as a difference from the base model: base + (tuned − base) need not give
    /// back the tuned fp32 values bit for bit, and a resumed run must continue exactly.
    pub fn checkpoint(&self, state: &Stage2State) -> (Vec<(String, Tensor)>, Stage2Scalars) {
        let optimizer = state.optimizer.state();
        let mut tensors: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(name, t)| (format!("{UNET_PREFIX}{name}"), t.detach().copy()))
            .collect();
        tensors.extend(
            optimizer
                .named_tensors()
                .into_iter()
                .map(|(name, t)| (format!("{OPTIMIZER_PREFIX}{name}"), t)),
        );
        let scalars = Stage2Scalars {
            step: state.step,
            optimizer_step: optimizer.step,
            loss_scale: state.loss_scale,
        };
        (tensors, scalars)
    }

    /// Restores the U-Net's weights and the optimizer from a [`Stage2::checkpoint`].
    pub fn restore_state(
        &self,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        scalars: &Stage2Scalars,
    ) -> Result<Stage2State> {
        let mut weights = std::collections::HashMap::new();
        let mut moments = Vec::new();
        for (name, tensor) in tensors {
            if let Some(param) = name.strip_prefix(UNET_PREFIX) {
                weights.insert(param.to_string(), tensor);
            } else if let Some(moment) = name.strip_prefix(OPTIMIZER_PREFIX) {
                moments.push((moment.to_string(), tensor));
            } else {
                return Err(Error::InvalidInput(format!(
                    "stage-2 checkpoint: unexpected tensor {name:?}"
                )));
            }
        }
        if weights.len() != self.params.len() {
            return Err(Error::InvalidInput(format!(
                "stage-2 checkpoint holds {} U-Net tensors, the U-Net has {}",
                weights.len(),
                self.params.len()
            )));
        }
        for (name, param) in &self.params {
            match weights.get(name) {
                Some(saved) if saved.size() == param.size() => {}
                _ => {
                    return Err(Error::InvalidInput(format!(
                        "stage-2 checkpoint lacks U-Net tensor {name:?} of shape {:?}",
                        param.size()
                    )))
                }
            }
        }
        let mut optimizer = AdamW::new(self.shallow_params(), self.config.optimizer)?;
        optimizer.load_state(&AdamWState::from_named_tensors(
            scalars.optimizer_step,
            moments,
        )?)?;
        tch::no_grad(|| {
            for (name, param) in &self.params {
                param.shallow_clone().copy_(&weights[name]);
            }
        });
        Ok(Stage2State {
            optimizer,
            step: scalars.step,
            loss_scale: scalars.loss_scale,
        })
    }

    /// One step: diffusion loss on the batch, backward into every U-Net parameter,
    /// one AdamW update. On error — a malformed batch, a NaN/Inf loss or (fp32, bf16)
    /// a non-finite gradient — the weights and the state are left as they were.
    pub fn step(&self, state: &mut Stage2State, batch: &Stage2Batch) -> Result<Stage2StepLoss> {
        let number = state.step + 1;
        check_batch(
            &batch.pixels,
            &batch.posterior_noise,
            &batch.noise,
            &batch.timesteps,
            self.schedule.num_train_timesteps(),
        )?;
        let (unet, kind) = match &self.working {
            Some(working) => {
                tch::no_grad(|| {
                    for ((_, master), copy) in self.params.iter().zip(&working.params) {
                        copy.shallow_clone().copy_(master);
                    }
                });
                (&working.model, working.kind)
            }
            None => (&self.unet.model, self.unet.vars.kind()),
        };
        let latents = encode_latents(self.vae, &batch.pixels, &batch.posterior_noise, kind);
        let (loss, _) = diffusion_loss(
            unet,
            self.schedule,
            self.prediction_type,
            &latents,
            &batch.noise,
            &batch.timesteps,
            &self.hidden.to_kind(kind),
        )?;
        let diffusion = finite_value("the stage-2 diffusion loss", number, &loss)?;
        let scale = state.loss_scale.map_or(1.0, |s| s.scale);
        (loss * scale).backward();

        let grads: Vec<Tensor> = match &self.working {
            Some(working) => working
                .params
                .iter()
                .map(|p| p.grad().to_kind(Kind::Float) * (1.0 / scale))
                .collect(),
            None => self.params.iter().map(|(_, p)| p.grad()).collect(),
        };
        let overflowed = tch::no_grad(|| -> Result<bool> {
            let non_finite: Vec<Tensor> = grads
                .iter()
                .map(|g| g.isfinite().logical_not().any())
                .collect();
            Ok(Tensor::stack(&non_finite, 0).any().f_int64_value(&[])? == 1)
        })?;
        self.zero_working_grads();
        if overflowed {
            state.optimizer.zero_grad();
            return match &mut state.loss_scale {
                Some(loss_scale) => {
                    loss_scale.update(true);
                    state.step = number;
                    Ok(Stage2StepLoss {
                        diffusion,
                        update_skipped: true,
                    })
                }
                None => Err(Error::InvalidInput(format!(
                    "the U-Net's gradients at stage-2 step {number} are not finite"
                ))),
            };
        }
        if self.working.is_some() {
            state.optimizer.step_with_gradients(&grads)?;
        } else {
            state.optimizer.step()?;
            state.optimizer.zero_grad();
        }
        if let Some(loss_scale) = &mut state.loss_scale {
            loss_scale.update(false);
        }
        state.step = number;
        Ok(Stage2StepLoss {
            diffusion,
            update_skipped: false,
        })
    }

    fn zero_working_grads(&self) {
        if let Some(working) = &self.working {
            for p in &working.params {
                let mut grad = p.grad();
                if grad.defined() {
                    let _ = grad.detach_().zero_();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::test_support::{normal, snapshot, Loaded};

    fn batch(seed: u64) -> Stage2Batch {
        Stage2Batch {
            pixels: normal(seed, &[2, 3, 64, 64]).tanh(),
            posterior_noise: normal(seed + 1000, &[2, 4, 8, 8]),
            noise: normal(seed + 2000, &[2, 4, 8, 8]),
            timesteps: Tensor::from_slice(&[250i64, 900]),
        }
    }

    fn config() -> Stage2Config {
        Stage2Config {
            batch_size: 2,
            resolution: 64,
            optimizer: AdamWConfig::with_lr(1e-4),
            ..Default::default()
        }
    }

    fn embedding(m: &Loaded) -> Tensor {
        m.text_encoder
            .model
            .token_embedding(&Tensor::from(1929i64))
            .detach()
    }

    fn max_change(before: &[(String, Tensor)], vars: &VarStore) -> f64 {
        let after = snapshot(vars);
        before
            .iter()
            .zip(&after)
            .map(|((_, a), (_, b))| (a - b).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    }

    #[test]
    fn trains_every_unet_parameter_and_nothing_else() {
        let mut m = Loaded::new();
        let base = snapshot(&m.unet.vars);
        let text_before = snapshot(&m.text_encoder.vars);
        let s_star = embedding(&m);
        let models = Stage2Models {
            text_encoder: &m.text_encoder,
            unet: &mut m.unet,
            unet_config: &m.folder.unet,
            vae: &m.vae,
            schedule: &m.schedule,
            prediction_type: m.folder.scheduler.prediction_type,
        };
        let stage = Stage2::new(config(), models, &m.tokenizer, "<concept>", &s_star).unwrap();
        let mut state = stage.init_state().unwrap();
        let loss = stage.step(&mut state, &batch(1)).unwrap();
        assert!(loss.diffusion > 0.0 && !loss.update_skipped);
        assert_eq!((state.step, state.optimizer.step_count()), (1, 1));
        let (tensors, scalars) = stage.checkpoint(&state);
        drop(stage);
        // Adam's first update moves every parameter, each by at most about lr.
        let after = snapshot(&m.unet.vars);
        for ((name, a), (_, b)) in base.iter().zip(&after) {
            let moved = (a - b).abs().max().double_value(&[]);
            assert!(moved > 0.0 && moved < 1.1e-4, "{name} moved by {moved}");
        }
        assert_eq!(max_change(&text_before, &m.text_encoder.vars), 0.0);
        assert!(s_star.equal(&embedding(&m)));
        assert_eq!(tensors.len(), 3 * base.len());
        assert_eq!(scalars.optimizer_step, 1);
    }

    #[test]
    fn a_checkpoint_resumes_exactly_and_nan_is_refused() {
        let mut m = Loaded::new();
        let s_star = embedding(&m);
        let unet_config = m.folder.unet.clone();
        let prediction_type = m.folder.scheduler.prediction_type;
        let models = Stage2Models {
            text_encoder: &m.text_encoder,
            unet: &mut m.unet,
            unet_config: &unet_config,
            vae: &m.vae,
            schedule: &m.schedule,
            prediction_type,
        };
        let stage = Stage2::new(config(), models, &m.tokenizer, "<concept>", &s_star).unwrap();
        let mut state = stage.init_state().unwrap();
        stage.step(&mut state, &batch(2)).unwrap();
        let (tensors, scalars) = stage.checkpoint(&state);

        let bad = batch(3);
        let _ = bad.noise.narrow(0, 0, 1).fill_(f64::INFINITY);
        let err = stage.step(&mut state, &bad).unwrap_err().to_string();
        assert!(err.contains("step 2"), "{err}");
        assert_eq!(state.step, 1);

        stage.step(&mut state, &batch(4)).unwrap();
        let (continued, _) = stage.checkpoint(&state);
        let mut resumed = stage.restore_state(tensors, &scalars).unwrap();
        stage.step(&mut resumed, &batch(4)).unwrap();
        let (again, again_scalars) = stage.checkpoint(&resumed);
        assert_eq!(again_scalars.step, 2);
        for ((n, a), (_, b)) in continued.iter().zip(&again) {
            assert!(a.equal(b), "{n} differs after resuming");
        }
    }

    #[test]
    fn a_half_precision_unet_is_refused() {
        let m = Loaded::new();
        let mut half = m
            .folder
            .load_unet(&crate::model::LoadOptions {
                kind: Kind::Half,
                ..Default::default()
            })
            .unwrap();
        let models = Stage2Models {
            text_encoder: &m.text_encoder,
            unet: &mut half,
            unet_config: &m.folder.unet,
            vae: &m.vae,
            schedule: &m.schedule,
            prediction_type: m.folder.scheduler.prediction_type,
        };
        let err = Stage2::new(config(), models, &m.tokenizer, "<concept>", &embedding(&m))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("weights in fp32, they are Half"), "{err}");
    }

    #[test]
    fn mixed_precision_is_cuda_only_and_keeps_fp32_master_weights() {
        let mut m = Loaded::new();
        let s_star = embedding(&m);
        let unet_config = m.folder.unet.clone();
        let prediction_type = m.folder.scheduler.prediction_type;
        let mut bf16 = config();
        bf16.mixed_precision = "bf16".parse().unwrap();
        let err = bf16.validate(Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("bf16 mixed precision needs a CUDA device"),
            "{err}"
        );
        assert!("fp8".parse::<MixedPrecision>().is_err());

        // The mechanism itself is device-independent: exercise it on the CPU.
        let base = snapshot(&m.unet.vars);
        let models = Stage2Models {
            text_encoder: &m.text_encoder,
            unet: &mut m.unet,
            unet_config: &unet_config,
            vae: &m.vae,
            schedule: &m.schedule,
            prediction_type,
        };
        let stage = Stage2::build(bf16, models, &m.tokenizer, "<concept>", &s_star).unwrap();
        let mut state = stage.init_state().unwrap();
        let loss = stage.step(&mut state, &batch(5)).unwrap();
        assert!(!loss.update_skipped && loss.diffusion.is_finite());
        drop(stage);
        let after = snapshot(&m.unet.vars);
        let mut moved = 0;
        for ((name, a), (_, b)) in base.iter().zip(&after) {
            assert_eq!(b.kind(), Kind::Float, "{name}");
            assert!(!b.requires_grad());
            moved += usize::from((a - b).abs().max().double_value(&[]) > 0.0);
        }
        assert_eq!(moved, base.len());

        // fp16's loss scale backs off on overflow and grows after 2000 clean steps.
        let mut scale = LossScale::default();
        scale.update(true);
        assert_eq!(scale.scale, 32768.0);
        for _ in 0..GROWTH_INTERVAL {
            scale.update(false);
        }
        assert_eq!((scale.scale, scale.growth_tracker), (65536.0, 0));
    }
}
