//! `coreg-trainer`'s integration tests, in one test binary (each links libtorch once):
//! one module per area, named as the test files were, so `cargo test -p coreg-trainer
//! --test integration serve_input` runs one area. The full default schedule
//! ([`default_schedule`]) is ignored here: the slow lane (`make test-slow`) runs it.

// As in the trainer itself: a function over ~80 lines (clippy.toml) mixes ideas.
#![warn(clippy::too_many_lines)]

mod chaos;
mod common;

mod default_schedule;
mod durability;
mod run;
mod serve;
mod serve_input;
mod store_faults;
