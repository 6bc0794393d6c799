//! The tiny random model: SD 2.1's architecture at a few MB, randomly initialized
//! from a seed, ε-prediction; fast enough on a CPU for every test that needs a real
//! model folder (the parity tests' reference cases write their own configurations).
//!
//! Exists so that every crate's tests write the same model the same way.

use std::path::Path;

use coreg::model::random::{write_random_model, ModelSize};
use coreg::schedule::PredictionType;

/// Writes the tiny model, seeded with `seed`, to `dir` (which must not exist or be
/// empty).
pub fn write_tiny(dir: &Path, seed: i64) {
    write_random_model(dir, ModelSize::Tiny, PredictionType::Epsilon, seed)
        .unwrap_or_else(|e| panic!("writing the tiny model to {}: {e}", dir.display()));
}
