//! The Stable Diffusion 2.1 model stack, read from a diffusers-layout folder.
//!
//! Each layer is a plain struct built by `new(path: nn::Path, config)` whose variable
//! names reproduce diffusers' and transformers' weight names, so checkpoints load with
//! no remapping table.

pub mod attention;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod folder;
pub mod random;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use folder::{Component, LoadOptions, ModelFolder};
