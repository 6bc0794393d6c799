//! `coreg`: the library shared by the trainer and the sampler.
//!
//! - [`model`]: the Stable Diffusion 2.1 stack (tokenizer, CLIP text encoder, U-Net,
//!   VAE) read from a diffusers-layout folder.
//! - [`schedule`]: the training noise schedule and the samplers.

pub mod artifact;
pub mod base_model;
pub mod dataset;
pub mod error;
pub mod generate;
pub mod images;
pub mod method;
pub mod model;
pub mod optim;
pub mod schedule;
pub mod store;

pub use error::{Error, Result};
