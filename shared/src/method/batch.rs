//! One optimization step's random inputs, drawn up front.
//!
//! Each stage consumes its randomness as plain tensors rather than drawing it inside
//! the step. That keeps a step a pure function of (state, batch): a resumed run that
//! redraws the same batch for the same step continues exactly, and a replay test can
//! feed the Python reference and this implementation the very same draws.

use tch::Tensor;

/// The inputs of one stage-1 step (batch 6 by default).
#[derive(Debug)]
pub struct Stage1Batch {
    /// Augmented training images, [B, 3, H, W] in [−1, 1].
    pub pixels: Tensor,
    /// Standard normal draws for sampling the VAE posterior, [B, 4, H/8, W/8]
    /// (the reference encodes with `latent_dist.sample()` every step).
    pub posterior_noise: Tensor,
    /// The diffusion noise ε, [B, 4, H/8, W/8].
    pub noise: Tensor,
    /// Training timesteps in [0, num_train_timesteps), i64 [B].
    pub timesteps: Tensor,
    /// Which regularization template this step draws from the prompt set.
    pub template_index: usize,
}

/// The inputs of one stage-2 step (batch 4 by default).
#[derive(Debug)]
pub struct Stage2Batch {
    pub pixels: Tensor,
    pub posterior_noise: Tensor,
    pub noise: Tensor,
    pub timesteps: Tensor,
}

/// The inputs of one test-time optimization step: the concept's stored training
/// latents (already scaled by the VAE's scaling factor) are noised afresh each step.
#[derive(Debug)]
pub struct TtoBatch {
    /// Indices into the concept's training latents, [B].
    pub latent_indices: Vec<usize>,
    pub noise: Tensor,
    pub timesteps: Tensor,
}
