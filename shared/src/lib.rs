//! `coreg`: the library shared by the trainer and the sampler.
//!
//! - [`model`]: the Stable Diffusion 2.1 stack (tokenizer, CLIP text encoder, U-Net,
//!   VAE) read from a diffusers-layout folder.
//! - [`schedule`]: the training noise schedule and the samplers.

pub mod error;
pub mod model;
pub mod schedule;

pub use error::{Error, Result};
