//! Test-time optimization (docs/method.md, "Test-time optimization"): before generating
//! one prompt, a few AdamW steps adapt a copy of the concept's S* so that the
//! prompt's context around it matches the context around the super-category word,
//! using only λ_emb·L_emb + λ_attn·L_attn (no diffusion loss), with the prompt as the
//! only template, on the fine-tuned U-Net and the concept's training latents noised at
//! random timesteps. The concept's stored S* is never changed.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::dataset::tto_batch;
use crate::dataset::TtoBatch;
use crate::method::checks::{check_frozen, check_weights, finite_value};
use crate::method::context::ContextPair;
use crate::method::losses::LossVariant;
use crate::method::prompts::SLOT;
use crate::method::regularization::{
    ContextRegularizer, RegularizationTerms, RegularizationWeights,
};
use crate::model::clip::ClipTextTransformer;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::Component;
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::NoiseSchedule;
use crate::{Error, Result};

/// Test-time optimization's hyper-parameters; the defaults are the paper's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TtoConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub optimizer: AdamWConfig,
    pub weights: RegularizationWeights,
    pub variant: LossVariant,
}

impl Default for TtoConfig {
    /// 10 steps of batch 6, AdamW lr 5e-4 (β 0.9/0.999, ε 1e-8, decay 1e-2),
    /// λ_emb 1.5e-4, λ_attn 0.05, the reference implementation's losses.
    fn default() -> Self {
        TtoConfig {
            steps: 10,
            batch_size: 6,
            optimizer: AdamWConfig::with_lr(5e-4),
            weights: RegularizationWeights::default(),
            variant: LossVariant::Reference,
        }
    }
}

impl TtoConfig {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.batch_size == 0 {
            return Err(Error::InvalidInput(format!(
                "test-time optimization needs at least one step and one latent per batch, \
                 got {} steps of batch {}",
                self.steps, self.batch_size
            )));
        }
        check_weights(&self.weights)?;
        self.optimizer.validate()
    }
}

/// The frozen models test-time optimization runs on: the base text encoder and the
/// concept's fine-tuned U-Net.
#[derive(Clone, Copy)]
pub struct TtoModels<'a> {
    pub text_encoder: &'a Component<ClipTextTransformer>,
    pub unet: &'a Component<UNet2DConditionModel>,
    pub schedule: &'a NoiseSchedule,
}

/// The losses of one test-time step (unweighted context losses).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TtoStepLosses {
    pub embedding: f64,
    pub attention: f64,
    /// λ_emb·L_emb + λ_attn·L_attn.
    pub total: f64,
}

/// The per-prompt embedding and how the losses went.
#[derive(Debug)]
pub struct TtoResult {
    /// The adapted vector `[D]`, fp32, detached.
    pub embedding: Tensor,
    pub losses: Vec<TtoStepLosses>,
}

/// The generation prompt as a template: it holds the concept either as `{}` or as the
/// placeholder token, exactly once.
pub fn prompt_template(prompt: &str, placeholder: &str) -> Result<String> {
    let slots = prompt.matches(SLOT).count();
    let tokens = prompt.matches(placeholder).count();
    match (slots, tokens) {
        (1, 0) => Ok(prompt.to_string()),
        (0, 1) => Ok(prompt.replacen(placeholder, SLOT, 1)),
        _ => Err(Error::InvalidInput(format!(
            "test-time optimization needs the concept exactly once in the prompt, as {SLOT} \
             or {placeholder:?}: {prompt:?} holds {slots} {SLOT} and {tokens} {placeholder:?}"
        ))),
    }
}

/// Test-time optimization for one prompt and one concept.
pub struct TestTimeOptimizer<'a> {
    config: TtoConfig,
    models: TtoModels<'a>,
    placeholder_id: i64,
    pair: ContextPair,
}

impl<'a> TestTimeOptimizer<'a> {
    /// `prompt` holds the concept as `{}` or as `placeholder` (already added to
    /// `tokenizer`); `category` is the concept's single-token super-category word.
    pub fn new(
        config: TtoConfig,
        models: TtoModels<'a>,
        tokenizer: &ClipTokenizer,
        prompt: &str,
        placeholder: &str,
        category: &str,
    ) -> Result<Self> {
        config.validate()?;
        check_frozen("text encoder", &models.text_encoder.vars)?;
        check_frozen("U-Net", &models.unet.vars)?;
        let template = prompt_template(prompt, placeholder)?;
        let pair = ContextPair::new(tokenizer, &template, placeholder, category)?;
        let placeholder_id = tokenizer.token_id(placeholder).ok_or_else(|| {
            Error::InvalidInput(format!(
                "the placeholder token {placeholder:?} has not been added to the tokenizer"
            ))
        })?;
        Ok(TestTimeOptimizer {
            config,
            models,
            placeholder_id,
            pair,
        })
    }

    /// Optimizes a copy of `concept` (S* `[D]`) with the given batches, one step each,
    /// on `latents` [L, 4, h, w] (the concept's training latents, already scaled by
    /// the VAE's scaling factor).
    pub fn run(
        &self,
        concept: &Tensor,
        latents: &Tensor,
        batches: &[TtoBatch],
    ) -> Result<TtoResult> {
        let count = self.check_latents(latents)?;
        let device = self.models.unet.vars.device();
        let hidden = self.models.text_encoder.model.hidden_size();
        if concept.size() != [hidden] {
            return Err(Error::InvalidInput(format!(
                "the concept's embedding has shape {:?}, the text encoder takes [{hidden}]",
                concept.size()
            )));
        }
        // A fresh leaf: the caller's tensor never enters the graph or the optimizer.
        let embedding = concept
            .detach()
            .to_device(device)
            .to_kind(Kind::Float)
            .copy()
            .set_requires_grad(true);
        let mut optimizer = AdamW::new(
            vec![("embedding".to_string(), embedding.shallow_clone())],
            self.config.optimizer,
        )?;
        let regularizer = ContextRegularizer {
            text_encoder: &self.models.text_encoder.model,
            unet: &self.models.unet.model,
            placeholder_id: self.placeholder_id,
            variant: self.config.variant,
            terms: RegularizationTerms::default(),
        };
        let latents = latents.to_device(device);
        let mut losses = Vec::with_capacity(batches.len());
        for (i, batch) in batches.iter().enumerate() {
            let number = i + 1;
            let (indices, noise, timesteps) = self.check_batch(batch, count, &latents.size())?;
            let x0 = latents.index_select(0, &indices.to_device(device));
            let noisy = self.models.schedule.add_noise(
                &x0,
                &noise.to_device(device).to_kind(x0.kind()),
                &timesteps.to_device(device),
            );
            let context =
                regularizer.losses(&self.pair, &embedding, &noisy, &timesteps.to_device(device))?;
            let (Some(l_emb), Some(l_attn)) = (&context.embedding, &context.attention) else {
                return Err(Error::InvalidInput(
                    "test-time optimization needs both context losses".into(),
                ));
            };
            let total =
                l_emb * self.config.weights.embedding + l_attn * self.config.weights.attention;
            let step_losses = TtoStepLosses {
                embedding: finite_value("the context embedding loss", number, l_emb)?,
                attention: finite_value("the context attention loss", number, l_attn)?,
                total: finite_value("the test-time loss", number, &total)?,
            };
            total.backward();
            if embedding.grad().isfinite().all().f_int64_value(&[])? != 1 {
                return Err(Error::InvalidInput(format!(
                    "the gradient of the embedding at test-time step {number} is not finite"
                )));
            }
            optimizer.step()?;
            optimizer.zero_grad();
            losses.push(step_losses);
        }
        Ok(TtoResult {
            embedding: embedding.detach(),
            losses,
        })
    }

    /// [`Self::run`] with `config.steps` batches drawn from `seed` by
    /// [`Self::draw_batches`].
    pub fn run_seeded(&self, concept: &Tensor, latents: &Tensor, seed: u64) -> Result<TtoResult> {
        self.check_latents(latents)?;
        let batches = self.draw_batches(&latents.size(), seed)?;
        self.run(concept, latents, &batches)
    }

    /// `config.steps` batches for latents of shape `latent_shape` [L, 4, h, w], drawn
    /// by [`crate::dataset::tto_batch`] for steps 0, 1, …: per step, `batch_size`
    /// latent indices (uniform, with replacement), standard normal noise and timesteps
    /// (uniform over the training timesteps). Each draw comes from its own ChaCha20
    /// stream keyed by (seed, step, kind of draw), on the CPU, so the same seed gives
    /// the same batches on every machine, device and thread, whatever libtorch's
    /// global generator holds.
    pub fn draw_batches(&self, latent_shape: &[i64], seed: u64) -> Result<Vec<TtoBatch>> {
        let (count, shape) = match latent_shape {
            &[count, c, h, w] if count > 0 => (count as usize, [c, h, w]),
            _ => {
                return Err(Error::InvalidInput(format!(
                    "the concept's training latents must be [count, 4, height, width], got \
                     {latent_shape:?}"
                )))
            }
        };
        let device = self.models.unet.vars.device();
        let timesteps = self.models.schedule.num_train_timesteps();
        (0..self.config.steps)
            .map(|step| {
                tto_batch(
                    seed,
                    step,
                    self.config.batch_size,
                    count,
                    shape,
                    timesteps,
                    device,
                )
            })
            .collect()
    }

    /// The number of latents, if `latents` is [L ≥ 1, 4, h, w] floating point.
    fn check_latents(&self, latents: &Tensor) -> Result<usize> {
        match latents.size()[..] {
            [count, 4, h, w] if count > 0 && h > 0 && w > 0 && latents.is_floating_point() => {
                Ok(count as usize)
            }
            ref size => Err(Error::InvalidInput(format!(
                "the concept's training latents must be floating point [count, 4, height, \
                 width], got {:?} {size:?}",
                latents.kind()
            ))),
        }
    }

    fn check_batch(
        &self,
        batch: &TtoBatch,
        count: usize,
        latent_shape: &[i64],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let invalid =
            |message: String| Err(Error::InvalidInput(format!("test-time batch: {message}")));
        let b = batch.latent_indices.len();
        if b == 0 {
            return invalid("no latent indices".into());
        }
        if let Some(&i) = batch.latent_indices.iter().find(|&&i| i >= count) {
            return invalid(format!("latent index {i} but only {count} latents"));
        }
        let mut noise_shape = latent_shape.to_vec();
        noise_shape[0] = b as i64;
        if batch.noise.size() != noise_shape {
            return invalid(format!(
                "noise must be {noise_shape:?}, got {:?}",
                batch.noise.size()
            ));
        }
        let t = &batch.timesteps;
        if t.size() != [b as i64] || t.kind() != Kind::Int64 {
            return invalid(format!(
                "timesteps must be i64 [{b}], got {:?} {:?}",
                t.kind(),
                t.size()
            ));
        }
        let train = self.models.schedule.num_train_timesteps() as i64;
        if t.min().int64_value(&[]) < 0 || t.max().int64_value(&[]) >= train {
            return invalid(format!("timesteps must lie in [0, {train})"));
        }
        let indices: Vec<i64> = batch.latent_indices.iter().map(|&i| i as i64).collect();
        Ok((
            Tensor::from_slice(&indices),
            batch.noise.shallow_clone(),
            t.shallow_clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::test_support::{normal, snapshot, unchanged, Loaded};
    use tch::Device;

    fn optimizer<'a>(m: &'a Loaded, config: TtoConfig, prompt: &str) -> TestTimeOptimizer<'a> {
        let models = TtoModels {
            text_encoder: &m.text_encoder,
            unet: &m.unet,
            schedule: &m.schedule,
        };
        TestTimeOptimizer::new(config, models, &m.tokenizer, prompt, "<concept>", "dog").unwrap()
    }

    fn concept(m: &Loaded) -> Tensor {
        m.text_encoder
            .model
            .token_embedding(&Tensor::from(1929i64))
            .detach()
            + normal(9, &[32]) * 0.3
    }

    fn latents() -> Tensor {
        normal(10, &[3, 4, 8, 8])
    }

    #[test]
    fn prompts_become_templates() {
        assert_eq!(
            prompt_template("a {} in the snow", "<c>").unwrap(),
            "a {} in the snow"
        );
        assert_eq!(
            prompt_template("a <c> in the snow", "<c>").unwrap(),
            "a {} in the snow"
        );
        for bad in ["a dog", "a {} and a <c>", "{} {}", "<c> and <c>"] {
            let err = prompt_template(bad, "<c>").unwrap_err().to_string();
            assert!(err.contains("exactly once"), "{bad}: {err}");
        }
    }

    #[test]
    fn leaves_the_concept_untouched_and_lowers_the_loss() {
        let m = Loaded::new();
        let config = TtoConfig {
            steps: 4,
            batch_size: 2,
            optimizer: AdamWConfig::with_lr(5e-3),
            ..Default::default()
        };
        let tto = optimizer(&m, config, "a <concept> in the snow");
        let s_star = concept(&m);
        let stored = s_star.copy();
        let unet_before = snapshot(&m.unet.vars);
        let result = tto.run_seeded(&s_star, &latents(), 7).unwrap();
        assert!(s_star.equal(&stored) && !s_star.grad().defined());
        assert!(unchanged(&m.unet.vars, &unet_before));
        assert_eq!(result.losses.len(), 4);
        assert!(!result.embedding.requires_grad());
        let moved = (&result.embedding - &stored).abs().max().double_value(&[]);
        assert!(moved > 1e-3 && moved < 4.0 * 5e-3 * 1.1, "{moved}");
        // L_emb depends on the embedding alone (not on the batch): it must fall.
        let (first, last) = (&result.losses[0], &result.losses[3]);
        assert!(last.embedding < first.embedding, "{first:?} → {last:?}");
        // Seeded runs repeat exactly; another seed draws other batches.
        let again = tto.run_seeded(&s_star, &latents(), 7).unwrap();
        assert!(again.embedding.equal(&result.embedding));
        assert_eq!(again.losses, result.losses);
        let other = tto.run_seeded(&s_star, &latents(), 8).unwrap();
        assert!(!other.embedding.equal(&result.embedding));
    }

    #[test]
    fn seeded_draws_are_in_range_and_repeat() {
        let m = Loaded::new();
        let config = TtoConfig {
            steps: 5,
            ..Default::default()
        };
        let tto = optimizer(&m, config, "a photo of a {}");
        let batches = tto.draw_batches(&[3, 4, 8, 8], 1).unwrap();
        assert_eq!(batches.len(), 5);
        for b in &batches {
            assert_eq!(b.latent_indices.len(), 6);
            assert!(b.latent_indices.iter().all(|&i| i < 3));
            assert_eq!(b.noise.size(), [6, 4, 8, 8]);
            let t = Vec::<i64>::try_from(&b.timesteps).unwrap();
            assert!(t.iter().all(|&t| (0..1000).contains(&t)));
        }
        // Steps draw differently from each other, identically from the same seed.
        assert!(!batches[0].noise.equal(&batches[1].noise));
        let same = tto.draw_batches(&[3, 4, 8, 8], 1).unwrap();
        for (a, b) in batches.iter().zip(&same) {
            assert_eq!(a.latent_indices, b.latent_indices);
            assert!(a.noise.equal(&b.noise) && a.timesteps.equal(&b.timesteps));
        }
        assert!(tto.draw_batches(&[0, 4, 8, 8], 1).is_err());
    }

    #[test]
    fn bad_batches_are_refused() {
        let m = Loaded::new();
        let tto = optimizer(&m, TtoConfig::default(), "a {}");
        let s_star = concept(&m);
        let batch = |indices: Vec<usize>, t: &[i64]| TtoBatch {
            noise: Tensor::zeros([indices.len() as i64, 4, 8, 8], (Kind::Float, Device::Cpu)),
            latent_indices: indices,
            timesteps: Tensor::from_slice(t),
        };
        let err = |b: TtoBatch| tto.run(&s_star, &latents(), &[b]).unwrap_err().to_string();
        assert!(err(batch(vec![0, 3], &[1, 2])).contains("latent index 3"));
        assert!(err(batch(vec![0, 1], &[1, 1000])).contains("[0, 1000)"));
        assert!(err(batch(vec![0, 1], &[1])).contains("i64 [2]"));
        let flat = Tensor::zeros([3, 4, 8], (Kind::Float, Device::Cpu));
        assert!(tto.run(&s_star, &flat, &[]).is_err());
    }
}
