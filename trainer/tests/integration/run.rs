//! `coreg-trainer run` end to end on the tiny random model: a concept lands in the
//! store and verifies; a stopped run resumes to the same result; bad input is refused
//! with the right exit code and nothing written.

use std::process::Command;

use coreg_test_support::fixture::Fixture;
use coreg_test_support::photos::gigantic_png;
use coreg_test_support::process::assert_exit;

use crate::common::{list, read_concept, run, trainer, JobFile};

#[test]
fn run_writes_a_verified_concept_and_resumes_exactly() {
    let fx = Fixture::with_photos();
    let store = fx.store_url();

    let whole = fx.job("whole", &store, "");
    let out = run(&whole, "whole");
    assert_exit(&out, 0, "stage 2 step 4/4");
    let reference = read_concept(&store, "whole");
    assert_eq!(reference.manifest.token, "<toy>");
    assert_eq!(reference.manifest.super_category, "dog");
    assert_eq!(reference.manifest.losses.stage1["total"].len(), 12);
    assert_eq!(reference.manifest.losses.stage2["diffusion"].len(), 4);
    assert!(
        list(&store, "jobs/whole/checkpoints/").is_empty(),
        "checkpoints outlive the concept"
    );
    // Running a finished job again changes nothing.
    let again = run(&whole, "whole");
    assert_exit(&again, 0, "");
    assert!(String::from_utf8_lossy(&again.stdout).contains("already done"));

    // The same job stopped with SIGTERM after a checkpoint, then run again, ends
    // bit-identical to the uninterrupted run.
    let resumed = fx.job("resumed", &store, "");
    let child = trainer(&resumed, "resumed")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !list(&store, "jobs/resumed/")
        .iter()
        .any(|p| p.ends_with("checkpoint.json"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopped = child.wait_with_output().unwrap();
    assert_exit(&stopped, 75, "run the job again to resume");
    let out = run(&resumed, "resumed");
    assert_exit(&out, 0, "resuming from checkpoint");
    let resumed = read_concept(&store, "resumed");
    assert_eq!(
        resumed.manifest.blobs, reference.manifest.blobs,
        "a resumed run must write the same embedding, U-Net delta and latents"
    );
    assert_eq!(resumed.manifest.losses, reference.manifest.losses);
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let fx = Fixture::with_photos();
    let store = fx.store_url();
    let concepts = |fx: &Fixture| list(&fx.store_url(), "concepts/");

    // A multi-token category.
    let job = fx.job("category", &store, "");
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("category = \"dog\"", "category = \"golden retriever\"");
    std::fs::write(&job, text).unwrap();
    assert_exit(&run(&job, "category"), 65, "golden retriever");

    // No images.
    std::fs::create_dir(fx.path("empty")).unwrap();
    let job = fx.job("empty", &store, "");
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("folder = \"photos\"", "folder = \"empty\"");
    std::fs::write(&job, text).unwrap();
    assert_exit(&run(&job, "empty"), 65, "no training images");

    // Something that is not an image.
    std::fs::write(fx.path("photos/notes.png"), b"these are not pixels").unwrap();
    assert_exit(
        &run(&fx.job("garbage", &store, ""), "garbage"),
        65,
        "image 4 of 4",
    );
    std::fs::remove_file(fx.path("photos/notes.png")).unwrap();

    // An image whose header claims gigantic dimensions.
    let png = gigantic_png();
    std::fs::write(fx.path("photos/bomb.png"), &png).unwrap();
    assert_exit(&run(&fx.job("bomb", &store, ""), "bomb"), 65, "100000");
    std::fs::remove_file(fx.path("photos/bomb.png")).unwrap();

    // Invalid hyper-parameters and unknown keys: the job file itself is wrong.
    let job = fx.job("lr", &store, "");
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("learning_rate = 1e-4", "learning_rate = -3.0");
    std::fs::write(&job, text).unwrap();
    assert_exit(&run(&job, "lr"), 64, "stage2.learning_rate");
    assert_exit(
        &run(&fx.job("typo", &store, "[previews]\nevry = 3\n"), "typo"),
        64,
        "evry",
    );
    assert_exit(
        &run(
            &fx.job(
                "slotless",
                &store,
                "[previews]\nevery = 3\nprompts = [\"a dog\"]\n",
            ),
            "slotless",
        ),
        64,
        "previews.prompts",
    );
    let long = format!(
        "[previews]\nevery = 3\nprompts = [\"{} {{}}\"]\n",
        "very ".repeat(80)
    );
    assert_exit(
        &run(&fx.job("long", &store, &long), "long"),
        64,
        "CLIP tokens long",
    );

    // An unusable store: its directory would have to live under a file.
    std::fs::write(fx.path("blocker"), b"").unwrap();
    let blocked = format!("file://{}/store", fx.path("blocker").display());
    assert_exit(
        &run(&fx.job("blocked", &blocked, ""), "blocked"),
        64,
        "Not a directory",
    );

    assert!(concepts(&fx).is_empty(), "a refused job wrote a concept");
}

#[test]
fn a_nan_loss_fails_the_job_without_writing_a_concept() {
    let fx = Fixture::with_photos();
    // Poison one U-Net weight: the first step's loss is NaN.
    let path = fx.path("model/unet/diffusion_pytorch_model.safetensors");
    let mut tensors = tch::Tensor::read_safetensors(&path).unwrap();
    for (name, tensor) in &mut tensors {
        if name == "conv_out.bias" {
            *tensor = tensor.full_like(f64::NAN);
        }
    }
    tch::Tensor::write_safetensors(&tensors, &path).unwrap();
    let store = fx.store_url();
    assert_exit(&run(&fx.job("nan", &store, ""), "nan"), 70, "NaN");
    assert!(list(&store, "concepts/").is_empty());
}
