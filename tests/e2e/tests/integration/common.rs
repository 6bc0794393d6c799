//! Both services from the workspace's binaries (built by
//! `coreg_test_support::binaries` if needed) on the tiny model.

use std::path::Path;

use coreg_test_support::process::Server;
use coreg_test_support::{binaries, sampler, trainer};

/// `coreg-trainer serve` on the model in `model` and the store at `store`, with
/// `extra` settings; it polls for jobs every 200 ms.
pub fn start_trainer(model: &Path, store: &str, log: &Path, extra: &[(&str, &str)]) -> Server {
    trainer::serve(binaries::trainer(), model, store, log, extra)
}

/// `coreg-sampler serve` on the model in `model` and the store at `store`, with
/// `extra` settings.
pub fn start_sampler(model: &Path, store: &str, log: &Path, extra: &[(&str, &str)]) -> Server {
    sampler::serve(binaries::sampler(), model, store, log, extra)
}
