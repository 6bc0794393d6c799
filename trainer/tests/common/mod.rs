//! What the trainer's tests share: a tiny random model with three photos, job files,
//! and running `coreg-trainer` on them.
#![allow(dead_code)]

pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use coreg::model::random::{write_random_model, ModelSize};
use coreg::schedule::PredictionType;
use coreg::store::Store;

/// A tiny model, three photos and a job file in a temp dir.
pub struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        write_random_model(
            &dir.path().join("model"),
            ModelSize::Tiny,
            PredictionType::Epsilon,
            0,
        )
        .unwrap();
        let photos = dir.path().join("photos");
        std::fs::create_dir(&photos).unwrap();
        for i in 0..3u32 {
            let image = image::RgbImage::from_fn(80 + 8 * i, 72, |x, y| {
                image::Rgb([(x * 3 + i * 40) as u8, (y * 3) as u8, ((x + y) % 256) as u8])
            });
            image.save(photos.join(format!("{i}.png"))).unwrap();
        }
        Fixture { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn store_url(&self) -> String {
        format!("file://{}", self.path("store").display())
    }

    /// Writes a job file with a short schedule; `extra` is appended TOML.
    pub fn job(&self, name: &str, store: &str, extra: &str) -> PathBuf {
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

pub fn assert_exit(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr:\n{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in:\n{stderr}");
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

/// An 8×8 PNG whose header claims 100000×100000 pixels, its checksum fixed up so the
/// header is otherwise valid and only the size limit, not a checksum error, can
/// refuse it.
pub fn gigantic_png() -> Vec<u8> {
    let mut png = Vec::new();
    image::RgbImage::new(8, 8)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// PNG's chunk checksum (CRC-32, polynomial 0xEDB88320).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
