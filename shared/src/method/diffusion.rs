//! The denoising objective both training stages optimize (paper Sec. 3, the
//! diffusion loss; docs/method.md, "Stage 1" step 1 and "Stage 2"): latents from the
//! VAE posterior, noised at the step's timesteps, and the U-Net's prediction against
//! the target the model's prediction type names.

use tch::{Kind, Reduction, Tensor};

use crate::method::prompts::{fill_template, TRAINING_TEMPLATE};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKl;
use crate::model::Component;
use crate::schedule::{NoiseSchedule, PredictionType};
use crate::Result;

/// z = (mean + std·ε)·scaling_factor from the VAE posterior, with the step's ε, in
/// `kind` on the VAE's device; no autograd graph.
pub(crate) fn encode_latents(
    vae: &Component<AutoencoderKl>,
    pixels: &Tensor,
    posterior_noise: &Tensor,
    kind: Kind,
) -> Tensor {
    tch::no_grad(|| {
        let device = vae.vars.device();
        let posterior = vae
            .model
            .encode(&pixels.to_device(device).to_kind(vae.vars.kind()));
        let latents = posterior.sample(&posterior_noise.to_device(device));
        (latents * vae.model.scaling_factor()).to_kind(kind)
    })
}

/// The diffusion loss: the U-Net's prediction for the noised `latents`, conditioned on
/// `hidden` [1, 77, D] repeated over the batch, against the target the prediction type
/// names (ε or v); an fp32 mean squared error. Also returns the noisy latents.
pub(crate) fn diffusion_loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    prediction_type: PredictionType,
    latents: &Tensor,
    noise: &Tensor,
    timesteps: &Tensor,
    hidden: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let noise = noise.to_device(latents.device()).to_kind(latents.kind());
    let timesteps = timesteps.to_device(latents.device());
    let noisy = schedule.add_noise(latents, &noise, &timesteps);
    let target = schedule.target(prediction_type, latents, &noise, &timesteps);
    let context = hidden.repeat([latents.size()[0], 1, 1]);
    unet.check_inputs(&noisy, &timesteps, &context)?;
    let prediction = unet.forward(&noisy, &timesteps, &context);
    let loss = prediction
        .to_kind(Kind::Float)
        .mse_loss(&target.to_kind(Kind::Float), Reduction::Mean);
    Ok((loss, noisy))
}

/// The token ids [1, 77] of the training prompt "a photo of a S*".
pub(crate) fn training_prompt_ids(tokenizer: &ClipTokenizer, placeholder: &str) -> Result<Tensor> {
    let tokens = tokenizer.encode(&fill_template(TRAINING_TEMPLATE, placeholder))?;
    Ok(Tensor::from_slice(&tokens.ids).view([1, -1]))
}
