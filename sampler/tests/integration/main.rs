//! `coreg-sampler`'s integration tests, in one test binary (each links libtorch once):
//! one module per area, named as the test files were, so `cargo test -p coreg-sampler
//! --test integration serve` runs one area. The tests that run the trainer too are
//! the `coreg-e2e` crate's.

mod common;

mod concept_parity;
mod generate;
mod serve;
