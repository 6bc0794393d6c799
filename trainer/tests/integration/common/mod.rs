//! What only the trainer's tests share: running this crate's `coreg-trainer` (`run`
//! and `serve`) and its job files. The fixtures themselves (the tiny model, the
//! photos, the store) are `coreg_test_support`'s.

pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use coreg::store::Store;
use coreg_test_support::fixture::Fixture;

/// Job files in the fixture's directory.
pub trait JobFile {
    /// Writes a job file with a short schedule; `extra` is appended TOML.
    fn job(&self, name: &str, store: &str, extra: &str) -> PathBuf;
}

impl JobFile for Fixture {
    fn job(&self, name: &str, store: &str, extra: &str) -> PathBuf {
        let text = format!(
            r#"
[concept]
name = "toy"
category = "dog"
version = "{name}"

[images]
folder = "photos"

[model]
path = "model"
device = "cpu"

[store]
url = "{store}"

[training]
resolution = 64
seed = 3

[stage1]
steps = 12
batch_size = 2
rescale_record_at = 4
rescale_until = 8

[stage2]
steps = 4
batch_size = 2
learning_rate = 1e-4

[checkpoints]
every = 3
{extra}
"#
        );
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }
}

pub fn trainer(job: &Path, job_id: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_coreg-trainer"));
    command.args(["run", "--job", job.to_str().unwrap(), "--job-id", job_id]);
    command
}

pub fn run(job: &Path, job_id: &str) -> Output {
    trainer(job, job_id).output().unwrap()
}

pub fn read_concept(store: &str, version: &str) -> coreg::artifact::LoadedConcept {
    let store = Store::open(store, Vec::<(String, String)>::new()).unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(coreg::artifact::read_concept(&store, "toy", version))
        .unwrap()
}

pub fn list(store: &str, prefix: &str) -> Vec<String> {
    let store = Store::open(store, Vec::<(String, String)>::new()).unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(store.list(prefix))
        .unwrap()
        .into_iter()
        .map(|o| o.path)
        .collect()
}
