//! The model stack against diffusers/transformers on the same random weights.
//!
//! The Python reference (`tests/reference/model_reference.py`) builds each model with
//! diffusers, saves it in diffusers layout with inputs and its own outputs; `coreg model
//! forward` loads the same folder and must agree within 1e-4 of the reference's largest
//! magnitude (fp32) for the text encoder, the U-Net output, the 16 cross-attention
//! layers' per-token means, and the VAE's posterior mean and decoder.

use std::path::Path;
use std::process::Command;

use coreg_test_support::reference::{assert_close, read, run_reference};

const TOLERANCE: f64 = 1e-4;
const OUTPUTS: [&str; 5] = [
    "text_hidden",
    "unet_out",
    "cross_attn_token_means",
    "vae_mean",
    "vae_decoded",
];

fn coreg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_coreg"))
        .args(args)
        .output()
        .expect("running coreg")
}

fn coreg_ok(args: &[&str]) {
    let out = coreg(args);
    assert!(
        out.status.success(),
        "coreg {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn forward(model: &Path, inputs: &Path, out: &Path) {
    coreg_ok(&[
        "model",
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
}

fn compare(dir: &Path, got: &Path, expected: &Path, names: &[&str]) {
    let got = read(got);
    let want = read(expected);
    for name in names {
        let w = want
            .get(*name)
            .unwrap_or_else(|| panic!("reference wrote no `{name}` in {}", dir.display()));
        let g = got
            .get(*name)
            .unwrap_or_else(|| panic!("coreg wrote no `{name}`"));
        assert_close(name, g, w, TOLERANCE);
    }
}

fn reference_case(config: &str) {
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path();
    run_reference(
        "model_reference",
        &[
            "make-model",
            "--config",
            config,
            "--seed",
            "7",
            "--out",
            case.to_str().unwrap(),
        ],
    );
    let got = case.join("got.safetensors");
    forward(&case.join("model"), &case.join("inputs.safetensors"), &got);
    compare(case, &got, &case.join("expected.safetensors"), &OUTPUTS);
}

/// SD 2.1 base options: epsilon prediction, no attention upcast, linear projections.
#[test]
fn tiny_base_matches_diffusers() {
    reference_case("tiny");
}

/// SD 2.1 (768) options: v-prediction, upcast attention, given encoder states.
#[test]
fn tiny_v_prediction_upcast_matches_diffusers() {
    reference_case("tiny-v-upcast");
}

/// Older checkpoints: conv projections, legacy VAE attention names, fp16-only U-Net.
#[test]
fn tiny_legacy_layout_matches_diffusers() {
    reference_case("tiny-legacy");
}

/// What `coreg model init` writes loads in diffusers (as a whole pipeline too), and
/// `coreg model forward` on it agrees with diffusers.
#[test]
fn model_init_loads_in_diffusers_and_matches() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    coreg_ok(&[
        "model",
        "init",
        "--size",
        "tiny",
        "--seed",
        "3",
        "--out",
        model.to_str().unwrap(),
    ]);

    // Reuse the reference's input recipe, conditioned through the text encoder.
    let case = dir.path().join("case");
    run_reference(
        "model_reference",
        &[
            "make-model",
            "--config",
            "tiny",
            "--seed",
            "1",
            "--out",
            case.to_str().unwrap(),
        ],
    );
    let inputs = case.join("inputs.safetensors");
    let expected = dir.path().join("expected.safetensors");
    run_reference(
        "model_reference",
        &[
            "forward",
            "--check-pipeline",
            "--model",
            model.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            expected.to_str().unwrap(),
        ],
    );
    let got = dir.path().join("got.safetensors");
    forward(&model, &inputs, &got);
    compare(dir.path(), &got, &expected, &OUTPUTS);
}

#[test]
fn model_init_is_seeded_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    coreg_ok(&["model", "init", "--seed", "5", "--out", a.to_str().unwrap()]);
    coreg_ok(&["model", "init", "--seed", "5", "--out", b.to_str().unwrap()]);
    let file = "unet/diffusion_pytorch_model.safetensors";
    assert_eq!(
        std::fs::read(a.join(file)).unwrap(),
        std::fs::read(b.join(file)).unwrap(),
        "the same seed must give the same weights"
    );
    let out = coreg(&["model", "init", "--seed", "6", "--out", a.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
}
