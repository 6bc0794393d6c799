//! The paper's full default schedule (stage 1: 300 steps of batch 6; stage 2: 1000
//! steps of batch 4) through `coreg-trainer run` on the tiny model, once into a
//! `file://` store from a photo folder and once into a real S3 API (`moto_server`)
//! from photos uploaded there, with validation previews on. Both runs must write a
//! concept that verifies, and the same one: neither the backend nor the previews may
//! change what is trained.
//!
//! About six minutes on two cores: the slow lane (`make test-slow`, which runs the
//! ignored tests), not `cargo test`'s default run.

use std::process::{Child, Stdio};

use bytes::Bytes;
use coreg::artifact::{read_concept, LoadedConcept};
use coreg::store::Store;
use coreg_test_support::fixture::Fixture;
use coreg_test_support::moto::MotoServer;
use coreg_test_support::process::assert_exit;
use tokio::runtime::Runtime;

use crate::common::trainer;

const STAGE1_STEPS: usize = 300;
const STAGE2_STEPS: usize = 1000;
const PREVIEW_EVERY: usize = 100;

/// A job with every training hyper-parameter at its default; only the resolution is
/// the tiny model's (64 px) rather than SD 2.1's 512.
fn default_job(fx: &Fixture, name: &str, images: &str, store: &str) -> std::path::PathBuf {
    let text = format!(
        r#"
[concept]
name = "toy"
category = "dog"
version = "v1"

[images]
{images}

[model]
path = "model"
device = "cpu"

[store]
{store}

[training]
resolution = 64
seed = 11
{extra}
"#,
        extra = if name == "s3" {
            format!("\n[previews]\nevery = {PREVIEW_EVERY}\n")
        } else {
            String::new()
        }
    );
    let path = fx.path(&format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts a run; each of the two concurrent runs gets one of the machine's threads.
fn spawn(job: &std::path::Path) -> Child {
    trainer(job, "full")
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn read(runtime: &Runtime, store: &Store) -> LoadedConcept {
    runtime
        .block_on(read_concept(store, "toy", "v1"))
        .unwrap_or_else(|e| panic!("the concept does not verify: {e}"))
}

/// Puts the fixture's photos under `uploads/` in `store`; their keys as TOML strings.
fn upload_photos(runtime: &Runtime, store: &Store, fx: &Fixture) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..3 {
        let bytes = std::fs::read(fx.path(&format!("photos/{i}.png"))).unwrap();
        let key = format!("uploads/{i}.png");
        runtime
            .block_on(store.put_overwrite(&key, Bytes::from(bytes)))
            .unwrap();
        keys.push(format!("{key:?}"));
    }
    keys
}

/// The manifest records both full stages with the paper's defaults and finite losses.
fn assert_the_default_schedule(concept: &LoadedConcept) {
    let manifest = &concept.manifest;
    assert_eq!(manifest.losses.stage1["total"].len(), STAGE1_STEPS);
    assert_eq!(manifest.losses.stage2["diffusion"].len(), STAGE2_STEPS);
    let stage1 = &manifest.hyper_parameters["stage1"];
    assert_eq!(stage1["steps"], 300);
    assert_eq!(stage1["batch_size"], 6);
    assert_eq!(stage1["learning_rate"], 5e-3);
    assert_eq!(manifest.hyper_parameters["stage2"]["steps"], 1000);
    assert_eq!(manifest.hyper_parameters["stage2"]["batch_size"], 4);
    assert!(
        manifest
            .losses
            .stage1
            .values()
            .flatten()
            .all(|l| l.is_finite()),
        "non-finite stage-1 loss recorded"
    );
}

/// The finished job keeps its previews (changing as training goes) and drops its
/// checkpoints.
fn assert_previews_kept_and_checkpoints_dropped(runtime: &Runtime, s3: &Store) {
    let job_files: Vec<String> = runtime
        .block_on(s3.list("jobs/full/"))
        .unwrap()
        .into_iter()
        .map(|o| o.path)
        .collect();
    assert!(
        !job_files.iter().any(|p| p.contains("/checkpoints/")),
        "checkpoints outlive the concept: {job_files:?}"
    );
    let previews: Vec<&String> = job_files.iter().filter(|p| p.ends_with(".png")).collect();
    let expected = (STAGE1_STEPS / PREVIEW_EVERY + STAGE2_STEPS / PREVIEW_EVERY) * 2;
    assert_eq!(previews.len(), expected, "{previews:?}");
    assert!(job_files.contains(&"jobs/full/previews/plan.json".to_string()));

    let preview = |name: &str| -> Vec<u8> {
        runtime
            .block_on(s3.get(&format!("jobs/full/previews/{name}")))
            .unwrap()
            .to_vec()
    };
    let first = preview("stage1-000100-0.png");
    let image = image::load_from_memory(&first).unwrap();
    assert_eq!((image.width(), image.height()), (64, 64));
    assert_ne!(
        first,
        preview("stage1-000300-0.png"),
        "the preview did not change while the embedding trained"
    );
    assert_ne!(
        preview("stage1-000300-0.png"),
        preview("stage2-001000-0.png"),
        "the preview did not change while the U-Net trained"
    );
}

#[test]
#[ignore = "slow lane: make test-slow"]
fn the_default_schedule_writes_the_same_verified_concept_on_file_and_s3() {
    let fx = Fixture::with_photos();
    let runtime = Runtime::new().unwrap();
    let moto = MotoServer::start();
    moto.create_bucket("coreg-jobs");
    let s3 = Store::open("s3://coreg-jobs/team-a", moto.options()).unwrap();

    // The S3 job reads its photos from the store, in the folder's (sorted) order.
    let keys = upload_photos(&runtime, &s3, &fx);
    let options: String = moto
        .options()
        .iter()
        .map(|(k, v)| format!("{k} = {v:?}\n"))
        .collect();
    let file_job = default_job(
        &fx,
        "file",
        "folder = \"photos\"",
        &format!("url = {:?}", fx.store_url()),
    );
    let s3_job = default_job(
        &fx,
        "s3",
        &format!("keys = [{}]", keys.join(", ")),
        &format!("url = \"s3://coreg-jobs/team-a\"\n\n[store.options]\n{options}"),
    );

    let runs = [spawn(&file_job), spawn(&s3_job)];
    let outputs: Vec<_> = runs
        .into_iter()
        .map(|child| child.wait_with_output().unwrap())
        .collect();
    for out in &outputs {
        assert_exit(
            out,
            0,
            &format!("stage 2 step {STAGE2_STEPS}/{STAGE2_STEPS}"),
        );
    }

    let file = Store::open(&fx.store_url(), Vec::<(String, String)>::new()).unwrap();
    let on_file = read(&runtime, &file);
    let on_s3 = read(&runtime, &s3);
    for concept in [&on_file, &on_s3] {
        assert_the_default_schedule(concept);
    }
    assert_eq!(
        on_s3.manifest.blobs, on_file.manifest.blobs,
        "the S3 run (with previews) trained something else than the file:// run"
    );
    assert_eq!(on_s3.manifest.losses, on_file.manifest.losses);

    // Stage 2 moved the U-Net (lr 2e-6 over 1000 steps) and the delta says so.
    assert!(
        !on_file.unet_delta.is_empty(),
        "stage 2 left the U-Net unchanged"
    );

    // The finished S3 job keeps its previews and drops its checkpoints.
    assert_previews_kept_and_checkpoints_dropped(&runtime, &s3);
}
