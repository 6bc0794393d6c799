//! Text → latents → image: the denoising loop of diffusers' `StableDiffusionPipeline`,
//! shared by the trainer's validation previews and the sampler.
//!
//! ```text
//! latents = noise · init_noise_sigma
//! for each timestep t (step i):
//!     x   = scale_model_input([latents; latents], i)          one U-Net call for both
//!     ε   = unet(x, t, [negative; prompt])
//!     ε   = ε_uncond + g · (ε_text − ε_uncond)                 classifier-free guidance
//!     latents = step(ε, i, latents)
//! images = vae.decode(latents / scaling_factor)
//! ```
//!
//! With guidance g ≤ 1 the unconditional half is skipped, as diffusers does. The caller
//! provides the initial noise (or draws it from per-image seeds with
//! [`seeded_noise`]), so a given seed gives the same image on any device and in any
//! batch. A learned concept enters through the prompt's hidden states: encode token ids
//! with the concept's vector spliced in ([`Pipeline::encode_ids`]), or pass hidden
//! states computed elsewhere (test-time optimization does).

use std::ops::ControlFlow;

use tch::{Device, Kind, Tensor};

use crate::draws::generation_noise;
use crate::model::clip::ClipTextTransformer;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKl;
use crate::model::vae::VAE_SCALE_FACTOR;
use crate::model::Component;
use crate::schedule::{SamplerKind, SchedulerConfig};
use crate::{Error, Result};

/// How to generate; the defaults are the paper's sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Denoising steps (50 in the paper, 25 for validation previews).
    pub steps: usize,
    /// Classifier-free guidance scale g (7.5); g ≤ 1 turns guidance off.
    pub guidance_scale: f64,
    /// Image height in pixels, a multiple of 8.
    pub height: u32,
    /// Image width in pixels, a multiple of 8.
    pub width: u32,
    pub sampler: SamplerKind,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            steps: 50,
            guidance_scale: 7.5,
            height: 512,
            width: 512,
            sampler: SamplerKind::DpmSolverPlusPlus,
        }
    }
}

impl GenerationParams {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::InvalidInput(
                "generation needs at least one denoising step".into(),
            ));
        }
        if !self.guidance_scale.is_finite() {
            return Err(Error::InvalidInput(format!(
                "guidance scale must be a finite number, got {}",
                self.guidance_scale
            )));
        }
        let side = |v: u32| v > 0 && v % VAE_SCALE_FACTOR == 0;
        if !side(self.height) || !side(self.width) {
            return Err(Error::InvalidInput(format!(
                "image size must be a positive multiple of {VAE_SCALE_FACTOR} on each side, \
                 got {}×{}",
                self.width, self.height
            )));
        }
        Ok(())
    }

    /// Whether the unconditional branch runs: diffusers' `guidance_scale > 1`.
    pub fn classifier_free_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// The latent shape [C, H/8, W/8] of one image.
    pub fn latent_shape(&self, latent_channels: i64) -> [i64; 3] {
        [
            latent_channels,
            i64::from(self.height / VAE_SCALE_FACTOR),
            i64::from(self.width / VAE_SCALE_FACTOR),
        ]
    }
}

/// The initial latents [B, C, H/8, W/8] (f32, CPU) for one image per seed, each drawn
/// from its own seed's Gaussian stream.
pub fn seeded_noise(seeds: &[u64], latent_channels: i64, params: &GenerationParams) -> Tensor {
    let shape = params.latent_shape(latent_channels);
    let images: Vec<Tensor> = seeds
        .iter()
        .map(|&seed| generation_noise(seed, shape))
        .collect();
    Tensor::stack(&images, 0)
}

/// What the U-Net is conditioned on: the text encoder's last hidden states.
#[derive(Debug)]
pub struct TextConditioning {
    /// [B, 77, D], one row per image.
    pub prompt: Tensor,
    /// [B, 77, D] or [1, 77, D] (shared by every image); needed only when guidance is
    /// on. diffusers uses the empty prompt "" when no negative prompt is given.
    pub negative: Option<Tensor>,
}

/// A generated batch.
#[derive(Debug)]
pub struct GeneratedImages {
    /// The final latents [B, C, H/8, W/8] (in the U-Net's scale).
    pub latents: Tensor,
    /// The decoded images [B, 3, H, W], f32, clamped to [−1, 1] as diffusers'
    /// post-processing clamps; see [`crate::images::tensor_to_png`].
    pub images: Tensor,
}

/// How a generation ended.
#[derive(Debug)]
pub enum Generation {
    Completed(GeneratedImages),
    /// The progress callback asked to stop after `completed_steps` steps.
    Cancelled {
        completed_steps: usize,
    },
}

/// The loaded models a generation runs on. Each component may sit on its own device
/// and in its own precision; tensors are moved and cast between them.
pub struct Pipeline<'a> {
    pub tokenizer: &'a ClipTokenizer,
    pub text_encoder: &'a Component<ClipTextTransformer>,
    pub unet: &'a Component<UNet2DConditionModel>,
    pub vae: &'a Component<AutoencoderKl>,
    pub scheduler: &'a SchedulerConfig,
}

/// Where a component's weights are and in what kind.
fn placement<M>(component: &Component<M>) -> (Device, Kind) {
    let kind = component
        .vars
        .variables()
        .values()
        .next()
        .map_or(Kind::Float, Tensor::kind);
    (component.vars.device(), kind)
}

impl Pipeline<'_> {
    /// Tokenizes and encodes `prompts` (one image each) and the shared negative prompt.
    /// `placeholders` gives the vectors of learned tokens the tokenizer knows (its
    /// placeholder id and the `[D]` vector). A prompt longer than CLIP's 77 tokens is
    /// refused with its length, rather than silently truncated as diffusers does.
    pub fn encode_prompts(
        &self,
        prompts: &[&str],
        negative_prompt: &str,
        placeholders: &[(i64, &Tensor)],
    ) -> Result<TextConditioning> {
        if prompts.is_empty() {
            return Err(Error::InvalidInput("no prompt to generate from".into()));
        }
        let ids = |text: &str| -> Result<Vec<i64>> {
            let tokens = self.tokenizer.encode(text)?;
            if tokens.truncated {
                return Err(Error::InvalidInput(format!(
                    "prompt {text:?} is {} CLIP tokens long (with start and end); the limit is {}",
                    tokens.untruncated_len,
                    tokens.ids.len()
                )));
            }
            Ok(tokens.ids)
        };
        let rows = prompts
            .iter()
            .map(|p| ids(p).map(|row| Tensor::from_slice(&row)))
            .collect::<Result<Vec<_>>>()?;
        let negative = Tensor::from_slice(&ids(negative_prompt)?).unsqueeze(0);
        self.encode_ids(&Tensor::stack(&rows, 0), Some(&negative), placeholders)
    }

    /// Encodes token ids [B, 77] (and the negative prompt's, [B or 1, 77]) with the
    /// `placeholders`' vectors spliced in at their ids.
    pub fn encode_ids(
        &self,
        prompt_ids: &Tensor,
        negative_ids: Option<&Tensor>,
        placeholders: &[(i64, &Tensor)],
    ) -> Result<TextConditioning> {
        let _no_grad = tch::no_grad_guard();
        let (device, _) = placement(self.text_encoder);
        let encoder = &self.text_encoder.model;
        let encode = |ids: &Tensor| -> Result<Tensor> {
            if ids.dim() != 2 || ids.kind() != Kind::Int64 {
                return Err(Error::InvalidInput(format!(
                    "token ids must be i64 [batch, tokens], got {:?} {:?}",
                    ids.kind(),
                    ids.size()
                )));
            }
            let embeds = encoder.embed_tokens_with(&ids.to_device(device), placeholders)?;
            Ok(encoder.forward_embeds(&embeds))
        };
        Ok(TextConditioning {
            prompt: encode(prompt_ids)?,
            negative: negative_ids.map(encode).transpose()?,
        })
    }

    /// Runs the denoising loop from `initial_noise` [B, C, H/8, W/8] (any device and
    /// kind; unscaled standard normal) and decodes the result.
    ///
    /// `progress(completed, total)` is called after every step; returning
    /// `ControlFlow::Break(())` stops before the next step (and before decoding).
    pub fn generate(
        &self,
        conditioning: &TextConditioning,
        params: &GenerationParams,
        initial_noise: &Tensor,
        mut progress: impl FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<Generation> {
        params.validate()?;
        let _no_grad = tch::no_grad_guard();
        let (device, kind) = placement(self.unet);
        let unet = &self.unet.model;

        let batch = conditioning.prompt.size().first().copied().unwrap_or(0);
        let noise_size = initial_noise.size();
        let [_, h, w] = params.latent_shape(0);
        if noise_size.len() != 4 || noise_size[0] != batch || noise_size[2..] != [h, w] {
            return Err(Error::InvalidInput(format!(
                "initial noise must be [{batch}, channels, {h}, {w}] for {batch} prompts at \
                 {}×{}, got {noise_size:?}",
                params.width, params.height
            )));
        }
        let guided = params.classifier_free_guidance();
        let context = self.unet_context(conditioning, guided, batch, device, kind)?;

        let mut sampler = params.sampler.build(self.scheduler, params.steps)?;
        let timesteps = sampler.timesteps().to_vec();
        let total = timesteps.len();
        let mut latents =
            initial_noise.to_device(device).to_kind(kind) * sampler.init_noise_sigma();
        for (i, &t) in timesteps.iter().enumerate() {
            let doubled;
            let input = if guided {
                doubled = Tensor::cat(&[&latents, &latents], 0);
                &doubled
            } else {
                &latents
            };
            let input = sampler.scale_model_input(input, i);
            let t = Tensor::from(t);
            if i == 0 {
                unet.check_inputs(&input, &t, &context)?;
            }
            let prediction = unet.forward(&input, &t, &context);
            let prediction = if guided {
                let halves = prediction.chunk(2, 0);
                let (uncond, text) = (&halves[0], &halves[1]);
                uncond + (text - uncond) * params.guidance_scale
            } else {
                prediction
            };
            latents = sampler.step(&prediction, i, &latents);
            if progress(i + 1, total).is_break() {
                return Ok(Generation::Cancelled {
                    completed_steps: i + 1,
                });
            }
        }
        let images = decode_latents(self.vae, &latents).clamp(-1.0, 1.0);
        Ok(Generation::Completed(GeneratedImages { latents, images }))
    }

    /// The U-Net's encoder states: `[negative; prompt]` under guidance, else the prompt.
    fn unet_context(
        &self,
        conditioning: &TextConditioning,
        guided: bool,
        batch: i64,
        device: Device,
        kind: Kind,
    ) -> Result<Tensor> {
        let prompt = &conditioning.prompt;
        let size = prompt.size();
        if size.len() != 3 || batch == 0 {
            return Err(Error::InvalidInput(format!(
                "prompt hidden states must be [batch ≥ 1, tokens, width], got {size:?}"
            )));
        }
        let prompt = prompt.to_device(device).to_kind(kind);
        if !guided {
            return Ok(prompt);
        }
        let negative = conditioning.negative.as_ref().ok_or_else(|| {
            Error::InvalidInput(
                "classifier-free guidance needs the negative prompt's hidden states \
                 (encode \"\" for none)"
                    .into(),
            )
        })?;
        let negative_size = negative.size();
        let fits = negative_size.len() == 3
            && (negative_size[0] == batch || negative_size[0] == 1)
            && negative_size[1..] == size[1..];
        if !fits {
            return Err(Error::InvalidInput(format!(
                "negative prompt hidden states {negative_size:?} do not match the prompt's {size:?}"
            )));
        }
        let negative = negative
            .to_device(device)
            .to_kind(kind)
            .expand([batch, size[1], size[2]], false);
        Ok(Tensor::cat(&[negative, prompt], 0))
    }
}

/// The VAE's images [B, 3, H, W] (f32, unclamped) of U-Net latents: diffusers'
/// `vae.decode(latents / scaling_factor)`, on the VAE's device and in its kind.
pub fn decode_latents(vae: &Component<AutoencoderKl>, latents: &Tensor) -> Tensor {
    let _no_grad = tch::no_grad_guard();
    let (device, kind) = placement(vae);
    let model = &vae.model;
    let latents = latents.to_device(device).to_kind(kind);
    model
        .decode(&(latents / model.scaling_factor()))
        .to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_validated() {
        assert!(GenerationParams::default().validate().is_ok());
        let bad = [
            GenerationParams {
                steps: 0,
                ..Default::default()
            },
            GenerationParams {
                guidance_scale: f64::NAN,
                ..Default::default()
            },
            GenerationParams {
                height: 500,
                ..Default::default()
            },
            GenerationParams {
                width: 0,
                ..Default::default()
            },
        ];
        for params in bad {
            assert!(params.validate().is_err(), "{params:?}");
        }
    }

    #[test]
    fn guidance_follows_diffusers_threshold() {
        let with = |g| GenerationParams {
            guidance_scale: g,
            ..Default::default()
        };
        assert!(with(7.5).classifier_free_guidance());
        assert!(with(1.01).classifier_free_guidance());
        assert!(!with(1.0).classifier_free_guidance());
        assert!(!with(0.0).classifier_free_guidance());
    }

    #[test]
    fn seeded_noise_is_per_image() {
        let params = GenerationParams {
            height: 64,
            width: 48,
            ..Default::default()
        };
        let noise = seeded_noise(&[5, 6], 4, &params);
        assert_eq!(noise.size(), [2, 4, 8, 6]);
        let alone = seeded_noise(&[6], 4, &params);
        assert!(noise.get(1).equal(&alone.get(0)));
        assert!(!noise.get(0).equal(&noise.get(1)));
    }
}
