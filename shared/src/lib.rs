//! `coreg`: the library shared by the trainer and the sampler. The method it
//! implements is specified in `docs/method.md`.
//!
//! - [`model`]: the Stable Diffusion 2.1 stack (tokenizer, CLIP text encoder, U-Net,
//!   VAE) read from a diffusers-layout folder.
//! - [`config_json`]: diffusers' JSON configuration files, read as leniently as Python
//!   reads them and strictly where a wrong value would change the model.
//! - [`schedule`]: the training noise schedule and the samplers (DPM-Solver++ (2M),
//!   DDIM, Euler), as diffusers computes them.
//! - [`base_model`]: the base model a service holds, with an untouched copy of the
//!   U-Net's weights so no job's fine-tuning or concept's delta leaks into the next.
//! - [`method`]: CoRe itself: prompt sets, the context losses, stage 1, stage 2 and
//!   test-time optimization.
//! - [`optim`]: AdamW, step for step as `torch.optim.AdamW`, with restorable state.
//! - [`images`]: untrusted photo bytes to upright RGB within limits, the reference
//!   implementation's augmentation, and PNG output.
//! - [`dataset`]: the concept's photos and each optimization step's batch drawn from
//!   them.
//! - [`draws`]: the seeded random streams every draw comes from, reproducible across
//!   resumes and devices.
//! - [`generate`]: text → latents → image, the denoising loop the previews and the
//!   sampler share.
//! - [`artifact`]: what a training run stores (embedding, U-Net delta, training
//!   latents, manifest) and how a concept version is written and verified.
//! - [`store`]: the object store both services share (`file://`, S3, GCS, Azure,
//!   memory) with its create-only and compare-and-swap writes.
//! - [`error`]: the library's error type, naming the file or key at fault.

pub mod artifact;
pub mod base_model;
pub mod cadence;
pub mod config_json;
pub mod dataset;
pub mod draws;
pub mod error;
pub mod generate;
pub mod images;
pub mod method;
pub mod model;
pub mod optim;
pub mod schedule;
pub mod store;

pub use error::{Error, Result};
