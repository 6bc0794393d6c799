//! Stage 1 of CoRe: learning the concept's token vector S* with context
//! regularization (docs/method.md, "Stage 1"; paper Sec. 3).
//!
//! Each step is a pure function of the state and a [`Stage1Batch`] (the step's images
//! and random draws): the diffusion loss on "a photo of a S*", the two context losses
//! on one template of the prompt set with the same noisy latents and timesteps, one
//! AdamW update of S* alone, then the embedding rescaling rule. The text encoder,
//! U-Net and VAE stay frozen; the VAE runs without autograd.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::dataset::Stage1Batch;
use crate::method::checks::{check_batch, check_frozen, check_weights, finite_value};
use crate::method::context::ContextPair;
use crate::method::diffusion::{diffusion_loss, encode_latents, training_prompt_ids};
use crate::method::losses::LossVariant;
use crate::method::prompts::PromptSet;
use crate::method::regularization::{
    ContextLosses, ContextRegularizer, RegularizationTerms, RegularizationWeights,
};
use crate::method::rescale::{RescaleState, RescaleWindow};
use crate::model::clip::ClipTextTransformer;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKl;
use crate::model::Component;
use crate::optim::{AdamW, AdamWConfig, AdamWState};
use crate::schedule::{NoiseSchedule, PredictionType};
use crate::{Error, Result};

/// Stage 1's hyper-parameters; [`Stage1Config::new`] gives the paper's defaults.
/// `steps`, `batch_size` and `resolution` tell the caller what to draw;
/// [`Stage1::step`] takes whatever batch it is given.
///
/// Serialized flat, as a concept's manifest records it: `steps`, `batch_size`,
/// `learning_rate` and AdamW's other values, `lambda_embedding`, `lambda_attention`,
/// `embedding_loss`, `attention_loss`, `loss_variant`, `rescale`, `prompt_set`,
/// `prompt_templates`, `resolution`.
#[derive(Debug, Clone, Serialize)]
pub struct Stage1Config {
    pub steps: usize,
    pub batch_size: usize,
    #[serde(flatten)]
    pub optimizer: AdamWConfig,
    /// λ_emb and λ_attn.
    #[serde(flatten)]
    pub weights: RegularizationWeights,
    /// Which context losses run (the "w/o CER" / "w/o CAR" ablations switch one off).
    #[serde(flatten)]
    pub terms: RegularizationTerms,
    #[serde(rename = "loss_variant")]
    pub variant: LossVariant,
    /// `None` is the "w/o rescaling" ablation.
    pub rescale: Option<RescaleWindow>,
    /// The regularization templates; [`PromptSet::single_photo`] is the "w/o prompt
    /// set" ablation.
    #[serde(flatten)]
    pub prompt_set: PromptSet,
    /// Side of the square training images in pixels.
    pub resolution: usize,
}

impl Stage1Config {
    /// 300 steps, batch 6, AdamW lr 5e-3 (β 0.9/0.999, ε 1e-8, decay 1e-2),
    /// λ_emb 1.5e-4, λ_attn 0.05, reference-implementation losses, rescaling between
    /// steps 120 and 180, 512 px.
    pub fn new(prompt_set: PromptSet) -> Self {
        Stage1Config {
            steps: 300,
            batch_size: 6,
            optimizer: AdamWConfig::with_lr(5e-3),
            weights: RegularizationWeights::default(),
            terms: RegularizationTerms::default(),
            variant: LossVariant::Reference,
            rescale: Some(RescaleWindow::default()),
            prompt_set,
            resolution: 512,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.batch_size == 0 {
            return Err(Error::InvalidInput(format!(
                "stage 1 needs at least one step and one image per batch, got {} steps of batch {}",
                self.steps, self.batch_size
            )));
        }
        if self.resolution == 0 || self.resolution % 8 != 0 {
            return Err(Error::InvalidInput(format!(
                "stage 1 resolution {} must be a positive multiple of 8 (the VAE's downsampling)",
                self.resolution
            )));
        }
        check_weights(&self.weights)?;
        self.optimizer.validate()?;
        if let Some(window) = &self.rescale {
            window.validate()?;
        }
        Ok(())
    }
}

/// The frozen models a stage runs on, with the training noise schedule and the
/// prediction type from the model folder's scheduler configuration.
#[derive(Clone, Copy)]
pub struct FrozenModels<'a> {
    pub text_encoder: &'a Component<ClipTextTransformer>,
    pub unet: &'a Component<UNet2DConditionModel>,
    pub vae: &'a Component<AutoencoderKl>,
    pub schedule: &'a NoiseSchedule,
    pub prediction_type: PredictionType,
}

/// The losses of one stage-1 step (unweighted context losses; `None` when off).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stage1StepLosses {
    pub diffusion: f64,
    pub embedding: Option<f64>,
    pub attention: Option<f64>,
    /// diffusion + λ_emb·L_emb + λ_attn·L_attn.
    pub total: f64,
}

/// Where stage 1 stands: S*, AdamW's moments, the number of updates made and the
/// rescaling rule's memory.
#[derive(Debug)]
pub struct Stage1State {
    /// S*, fp32 `[D]`, a leaf that requires grad (kept in fp32 whatever the models'
    /// precision; the text encoder casts it where it splices it in).
    pub embedding: Tensor,
    pub optimizer: AdamW,
    /// Updates made so far; the next step is number `step + 1`.
    pub step: usize,
    pub rescale: RescaleState,
}

/// The scalars of a stage-1 checkpoint (its tensors travel in a safetensors file).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stage1Scalars {
    pub step: usize,
    pub optimizer_step: u64,
    pub rescale: RescaleState,
}

/// The optimizer's name for S*.
const EMBEDDING: &str = "embedding";
const OPTIMIZER_PREFIX: &str = "optimizer.";

impl Stage1State {
    /// Named tensors (`embedding`, `optimizer.exp_avg.embedding`,
    /// `optimizer.exp_avg_sq.embedding`) and scalars that
    /// [`Stage1::restore_state`] turns back into this state.
    pub fn checkpoint(&self) -> (Vec<(String, Tensor)>, Stage1Scalars) {
        let optimizer = self.optimizer.state();
        let mut tensors = vec![(EMBEDDING.to_string(), self.embedding.detach().copy())];
        tensors.extend(
            optimizer
                .named_tensors()
                .into_iter()
                .map(|(name, t)| (format!("{OPTIMIZER_PREFIX}{name}"), t)),
        );
        let scalars = Stage1Scalars {
            step: self.step,
            optimizer_step: optimizer.step,
            rescale: self.rescale,
        };
        (tensors, scalars)
    }
}

/// Stage 1 over loaded models for one concept.
pub struct Stage1<'a> {
    config: Stage1Config,
    models: FrozenModels<'a>,
    placeholder_id: i64,
    category_id: i64,
    training_ids: Tensor,
    /// One pair per template of the prompt set, built up front so that a template
    /// that cannot be used is reported before training starts.
    pairs: Vec<ContextPair>,
}

impl<'a> Stage1<'a> {
    /// `tokenizer` must already hold `placeholder` (`ClipTokenizer::add_placeholder`);
    /// `category` (the super-category word, e.g. "dog") must be a single CLIP token.
    /// The models must be frozen.
    pub fn new(
        config: Stage1Config,
        models: FrozenModels<'a>,
        tokenizer: &ClipTokenizer,
        placeholder: &str,
        category: &str,
    ) -> Result<Self> {
        config.validate()?;
        check_frozen("text encoder", &models.text_encoder.vars)?;
        check_frozen("U-Net", &models.unet.vars)?;
        check_frozen("VAE", &models.vae.vars)?;
        let placeholder_id = tokenizer.token_id(placeholder).ok_or_else(|| {
            Error::InvalidInput(format!(
                "the placeholder token {placeholder:?} has not been added to the tokenizer"
            ))
        })?;
        let category_id = tokenizer.single_token_id(category.trim()).map_err(|e| {
            Error::InvalidInput(format!(
                "the super-category {category:?} must be a single CLIP token: {e}"
            ))
        })?;
        if category_id >= models.text_encoder.model.vocab_rows() {
            return Err(Error::InvalidInput(format!(
                "the super-category {category:?} (id {category_id}) is not a word of the \
                 text encoder's vocabulary"
            )));
        }
        let pairs =
            ContextPair::for_prompt_set(tokenizer, &config.prompt_set, placeholder, category)?;
        Ok(Stage1 {
            training_ids: training_prompt_ids(tokenizer, placeholder)?,
            config,
            models,
            placeholder_id,
            category_id,
            pairs,
        })
    }

    pub fn config(&self) -> &Stage1Config {
        &self.config
    }

    pub fn placeholder_id(&self) -> i64 {
        self.placeholder_id
    }

    /// The state before the first step: S* is the super-category word's **input**
    /// token embedding (docs/method.md, "The new token").
    pub fn init_state(&self) -> Result<Stage1State> {
        let embedding = tch::no_grad(|| {
            self.models
                .text_encoder
                .model
                .token_embedding(&Tensor::from(self.category_id).to_device(self.device()))
                .to_kind(Kind::Float)
                .copy()
        })
        .set_requires_grad(true);
        self.state_with(embedding, None, 0, RescaleState::default())
    }

    /// The state a [`Stage1State::checkpoint`] describes.
    pub fn restore_state(
        &self,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        scalars: &Stage1Scalars,
    ) -> Result<Stage1State> {
        let mut embedding = None;
        let mut moments = Vec::new();
        for (name, tensor) in tensors {
            if name == EMBEDDING {
                embedding = Some(tensor);
            } else if let Some(moment) = name.strip_prefix(OPTIMIZER_PREFIX) {
                moments.push((moment.to_string(), tensor));
            } else {
                return Err(Error::InvalidInput(format!(
                    "stage-1 checkpoint: unexpected tensor {name:?}"
                )));
            }
        }
        let embedding = embedding
            .ok_or_else(|| Error::InvalidInput("stage-1 checkpoint lacks the embedding".into()))?;
        let hidden = self.models.text_encoder.model.hidden_size();
        if embedding.size() != [hidden] {
            return Err(Error::InvalidInput(format!(
                "stage-1 checkpoint: the embedding has shape {:?}, the text encoder takes [{hidden}]",
                embedding.size()
            )));
        }
        let embedding = embedding
            .to_device(self.device())
            .to_kind(Kind::Float)
            .detach()
            .copy()
            .set_requires_grad(true);
        let optimizer = AdamWState::from_named_tensors(scalars.optimizer_step, moments)?;
        self.state_with(embedding, Some(&optimizer), scalars.step, scalars.rescale)
    }

    fn state_with(
        &self,
        embedding: Tensor,
        optimizer_state: Option<&AdamWState>,
        step: usize,
        rescale: RescaleState,
    ) -> Result<Stage1State> {
        let mut optimizer = AdamW::new(
            vec![(EMBEDDING.to_string(), embedding.shallow_clone())],
            self.config.optimizer,
        )?;
        if let Some(state) = optimizer_state {
            optimizer.load_state(state)?;
        }
        Ok(Stage1State {
            embedding,
            optimizer,
            step,
            rescale,
        })
    }

    fn device(&self) -> tch::Device {
        self.models.text_encoder.vars.device()
    }

    /// One step (docs/method.md, "Stage 1" steps 1–7). On error — a malformed batch, or a
    /// NaN/Inf loss or gradient — the state is left as it was.
    pub fn step(&self, state: &mut Stage1State, batch: &Stage1Batch) -> Result<Stage1StepLosses> {
        let number = state.step + 1;
        check_batch(
            &batch.pixels,
            &batch.posterior_noise,
            &batch.noise,
            &batch.timesteps,
            self.models.schedule.num_train_timesteps(),
        )?;
        let pair = self.pairs.get(batch.template_index).ok_or_else(|| {
            Error::InvalidInput(format!(
                "template index {} is outside the prompt set of {} templates",
                batch.template_index,
                self.pairs.len()
            ))
        })?;
        let (diffusion, context) = self.losses(&state.embedding, batch, pair)?;
        let total = match context.weighted_sum(&self.config.weights) {
            Some(regularization) => &diffusion + regularization,
            None => diffusion.shallow_clone(),
        };
        let finite = |what: &str, loss: &Tensor| finite_value(what, number, loss);
        let finite_term =
            |what: &str, loss: &Option<Tensor>| loss.as_ref().map(|l| finite(what, l)).transpose();
        let losses = Stage1StepLosses {
            diffusion: finite("the stage-1 diffusion loss", &diffusion)?,
            embedding: finite_term("the context embedding loss", &context.embedding)?,
            attention: finite_term("the context attention loss", &context.attention)?,
            total: finite("the stage-1 loss", &total)?,
        };
        self.update(state, &total, number)?;
        Ok(losses)
    }

    /// Steps 1–5: the diffusion loss on "a photo of a S*" and the context losses on
    /// `pair`, on the same noisy latents and timesteps.
    fn losses(
        &self,
        embedding: &Tensor,
        batch: &Stage1Batch,
        pair: &ContextPair,
    ) -> Result<(Tensor, ContextLosses)> {
        let models = &self.models;
        let unet = &models.unet.model;
        let latents = encode_latents(
            models.vae,
            &batch.pixels,
            &batch.posterior_noise,
            models.unet.vars.kind(),
        );
        let text_encoder = &models.text_encoder.model;
        let embeds = text_encoder.embed_tokens_with(
            &self.training_ids.to_device(self.device()),
            &[(self.placeholder_id, embedding)],
        )?;
        let hidden = text_encoder.forward_embeds(&embeds);
        let (diffusion, noisy) = diffusion_loss(
            unet,
            models.schedule,
            models.prediction_type,
            &latents,
            &batch.noise,
            &batch.timesteps,
            &hidden.to_kind(latents.kind()),
        )?;
        let regularizer = ContextRegularizer {
            text_encoder,
            unet,
            placeholder_id: self.placeholder_id,
            variant: self.config.variant,
            terms: self.config.terms,
        };
        let timesteps = batch.timesteps.to_device(noisy.device());
        let context = regularizer.losses(pair, embedding, &noisy, &timesteps)?;
        Ok((diffusion, context))
    }

    /// Steps 6–7: the AdamW update of S* from `total`'s gradient (refused when that
    /// gradient is not finite), then the rescaling rule.
    fn update(&self, state: &mut Stage1State, total: &Tensor, number: usize) -> Result<()> {
        total.backward();
        let grad_ok = state.embedding.grad().isfinite().all().f_int64_value(&[])? == 1;
        if !grad_ok {
            state.optimizer.zero_grad();
            return Err(Error::InvalidInput(format!(
                "the gradient of S* at stage-1 step {number} is not finite"
            )));
        }
        state.optimizer.step()?;
        state.optimizer.zero_grad();
        state.step = number;
        if let Some(window) = &self.config.rescale {
            window.apply(number, &state.embedding, &mut state.rescale)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::test_support::{normal, snapshot, unchanged, Loaded};
    use crate::model::{LoadOptions, ModelFolder};
    use tch::Device;

    fn batch(seed: u64, template_index: usize) -> Stage1Batch {
        Stage1Batch {
            pixels: normal(seed, &[2, 3, 64, 64]).tanh(),
            posterior_noise: normal(seed + 1000, &[2, 4, 8, 8]),
            noise: normal(seed + 2000, &[2, 4, 8, 8]),
            timesteps: Tensor::from_slice(&[100i64, 700]),
            template_index,
        }
    }

    fn config() -> Stage1Config {
        let mut config = Stage1Config::new(PromptSet::animate());
        config.batch_size = 2;
        config.resolution = 64;
        config
    }

    #[test]
    fn a_step_changes_s_star_only() {
        let m = Loaded::new();
        let stage = Stage1::new(config(), m.frozen(), &m.tokenizer, "<concept>", "dog").unwrap();
        let mut state = stage.init_state().unwrap();
        let dog = m
            .text_encoder
            .model
            .token_embedding(&Tensor::from(1929i64))
            .detach();
        assert!(state.embedding.equal(&dog));
        let before = [&m.text_encoder.vars, &m.unet.vars, &m.vae.vars].map(snapshot);

        let losses = stage.step(&mut state, &batch(1, 3)).unwrap();
        assert_eq!(state.step, 1);
        assert_eq!(state.optimizer.step_count(), 1);
        let (emb, attn) = (losses.embedding.unwrap(), losses.attention.unwrap());
        assert!(losses.diffusion > 0.0 && emb >= 0.0 && attn >= 0.0);
        let total = losses.diffusion + 1.5e-4 * emb + 0.05 * attn;
        assert!((losses.total - total).abs() <= 1e-6 * total);
        // Adam's first step moves every coordinate by about lr (here 5e-3).
        let moved = (&state.embedding - &dog).abs();
        assert!(moved.max().double_value(&[]) < 5.5e-3);
        assert!(moved.min().double_value(&[]) > 1e-4);
        for (vars, before) in [&m.text_encoder.vars, &m.unet.vars, &m.vae.vars]
            .into_iter()
            .zip(&before)
        {
            assert!(unchanged(vars, before));
        }
    }

    #[test]
    fn ablation_switches_remove_their_terms() {
        let m = Loaded::new();
        let run = |terms: RegularizationTerms| {
            let mut config = config();
            config.terms = terms;
            let stage = Stage1::new(config, m.frozen(), &m.tokenizer, "<concept>", "dog").unwrap();
            let mut state = stage.init_state().unwrap();
            stage.step(&mut state, &batch(2, 0)).unwrap()
        };
        let full = run(RegularizationTerms::default());
        let no_emb = run(RegularizationTerms {
            embedding: false,
            attention: true,
        });
        let no_attn = run(RegularizationTerms {
            embedding: true,
            attention: false,
        });
        let neither = run(RegularizationTerms {
            embedding: false,
            attention: false,
        });
        // The step's inputs are the same, so the diffusion loss is too; each switch
        // drops exactly its own weighted term from the total.
        for l in [&no_emb, &no_attn, &neither] {
            assert_eq!(l.diffusion, full.diffusion);
        }
        assert_eq!(no_emb.embedding, None);
        assert_eq!(no_attn.attention, None);
        assert_eq!(no_emb.attention, full.attention);
        assert_eq!(no_attn.embedding, full.embedding);
        let emb = 1.5e-4 * full.embedding.unwrap();
        let attn = 0.05 * full.attention.unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs();
        assert!(close(no_emb.total, full.diffusion + attn));
        assert!(close(no_attn.total, full.diffusion + emb));
        assert_eq!(neither.total, full.diffusion);
    }

    #[test]
    fn the_rescaling_switch_removes_rescaling() {
        let m = Loaded::new();
        let norms = |rescale: Option<RescaleWindow>| {
            let mut config = config();
            config.rescale = rescale;
            let stage = Stage1::new(config, m.frozen(), &m.tokenizer, "<concept>", "dog").unwrap();
            let mut state = stage.init_state().unwrap();
            [batch(7, 0), batch(8, 1)].map(|b| {
                stage.step(&mut state, &b).unwrap();
                state.embedding.norm().double_value(&[])
            })
        };
        let window = RescaleWindow {
            record_at: 1,
            until: 2,
        };
        let on = norms(Some(window));
        let off = norms(None);
        // The first update is the same; only with rescaling is the second one pulled
        // back to the first one's norm.
        assert_eq!(on[0], off[0]);
        assert!((on[1] - on[0]).abs() <= 1e-6 * on[0], "{on:?}");
        assert!((off[1] - off[0]).abs() > 1e-6 * off[0], "{off:?}");
    }

    #[test]
    fn a_nan_batch_is_an_error_and_leaves_the_state_alone() {
        let m = Loaded::new();
        let stage = Stage1::new(config(), m.frozen(), &m.tokenizer, "<concept>", "dog").unwrap();
        let mut state = stage.init_state().unwrap();
        stage.step(&mut state, &batch(3, 1)).unwrap();
        let (tensors, scalars) = state.checkpoint();

        let bad = batch(4, 1);
        let _ = bad.pixels.narrow(0, 1, 1).fill_(f64::NAN);
        let err = stage.step(&mut state, &bad).unwrap_err().to_string();
        assert!(err.contains("step 2") && err.contains("NaN"), "{err}");
        let (after, after_scalars) = state.checkpoint();
        assert_eq!(after_scalars, scalars);
        for ((n, a), (m, b)) in after.iter().zip(&tensors) {
            assert_eq!(n, m);
            assert!(a.equal(b), "{n} changed");
        }

        // The same next step from the untouched state and from a fresh restore agree.
        let mut restored = stage.restore_state(tensors, &scalars).unwrap();
        let a = stage.step(&mut state, &batch(5, 2)).unwrap();
        let b = stage.step(&mut restored, &batch(5, 2)).unwrap();
        assert_eq!(a, b);
        assert!(state.embedding.equal(&restored.embedding));
    }

    #[test]
    fn bad_inputs_are_refused() {
        let m = Loaded::new();
        let new = |category: &str| {
            Stage1::new(config(), m.frozen(), &m.tokenizer, "<concept>", category).err()
        };
        let err = new("teapots").unwrap().to_string();
        assert!(
            err.contains("\"teapots\"") && err.contains("single CLIP token"),
            "{err}"
        );
        let err = Stage1::new(config(), m.frozen(), &m.tokenizer, "<other>", "dog")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("\"<other>\""), "{err}");

        let stage = Stage1::new(config(), m.frozen(), &m.tokenizer, "<concept>", "dog").unwrap();
        let mut state = stage.init_state().unwrap();
        let mut b = batch(6, 500);
        assert!(stage
            .step(&mut state, &b)
            .unwrap_err()
            .to_string()
            .contains("template index 500"));
        b.template_index = 0;
        b.timesteps = Tensor::from_slice(&[0i64, 1000]);
        assert!(stage
            .step(&mut state, &b)
            .unwrap_err()
            .to_string()
            .contains("[0, 1000)"));
        b.timesteps = Tensor::from_slice(&[0i64, 1]);
        b.noise = Tensor::zeros([2, 4, 4, 4], (Kind::Float, Device::Cpu));
        assert!(stage
            .step(&mut state, &b)
            .unwrap_err()
            .to_string()
            .contains("noise must be"));
        assert_eq!(state.step, 0);

        let mut unet = ModelFolder::open(m.dir.path().join("model"))
            .unwrap()
            .load_unet(&LoadOptions::default())
            .unwrap();
        unet.vars.unfreeze();
        let models = FrozenModels {
            unet: &unet,
            ..m.frozen()
        };
        let err = Stage1::new(config(), models, &m.tokenizer, "<concept>", "dog")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("U-Net's weights require gradients"), "{err}");
    }
}
