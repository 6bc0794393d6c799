//! `coreg`'s integration tests, in one test binary (each links libtorch once): one
//! module per area, named as the test files were, so `cargo test -p coreg --test
//! integration model_parity` runs one area.
//!
//! The binary's global allocator is the one [`images`] installs: it notes each
//! thread's largest allocation and otherwise is the system allocator.

mod artifact_store;
mod bad_model_folders;
mod core_losses_parity;
mod generate_parity;
mod images;
mod linking;
mod model_parity;
mod replay_parity;
mod scheduler_parity;
mod tokenizer_parity;
