//! The tests that start both services, in one test binary: one module per client,
//! named as the test files were, so `cargo test -p coreg-e2e --test integration
//! go_client` runs one.

mod common;

mod go_client;
mod python_client;
mod serve_python;
