//! CoRe's context regularization losses against an independent Python reference.
//!
//! `tests/reference/core_reference.py` builds the same inputs (prompt pair tokenized by
//! transformers, a concept embedding near the category's, noised latents, per-sample
//! timesteps) for the tiny random model `model_reference.py` makes, and computes both
//! losses and the embedding's gradient with transformers/diffusers (textual-inversion
//! style: an extra row in the embedding table). `coreg core losses` must agree:
//! scalars within |rust − ref| ≤ 1e-4·|ref|, the gradient within
//! max|rust − ref| / max|ref| ≤ 1e-4.
//!
//! The random model's cross-attention keys are scaled up first ([`sharpen_cross_attention`]):
//! freshly initialized, it attends almost uniformly, so the two prompts' attention
//! differs by about 1e-4 of its value and the paper's layer-averaged attention loss is a
//! difference of nearly equal numbers that fp32 resolves to only a few parts in 1e5 in
//! *either* implementation (checked against an fp64 run of the reference). A real SD
//! model's attention is peaked; a sharper random one keeps the comparison about the
//! method, not about rounding.

use std::path::Path;
use std::process::Command;

use coreg_test_support::reference::{assert_close, read, relative_max_error, run_reference};
use tch::Tensor;

const TOLERANCE: f64 = 1e-4;

/// One from the animate set (concept near the start) and one with the concept in the
/// middle of a longer prompt.
const TEMPLATES: [&str; 2] = [
    "a {} on a busy city street with neon lights flashing in the background",
    "a watercolor painting in which a small {} sleeps beside the fire at night",
];

fn coreg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_coreg"))
        .args(args)
        .output()
        .expect("running coreg")
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn rust_losses(model: &Path, inputs: &Path, out: &Path, variant: &str, extra: &[&str]) {
    let mut args = vec![
        "core",
        "losses",
        "--model",
        path(model),
        "--inputs",
        path(inputs),
        "--out",
        path(out),
        "--variant",
        variant,
    ];
    args.extend_from_slice(extra);
    let result = coreg(&args);
    assert!(
        result.status.success(),
        "coreg {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&result.stderr)
    );
}

fn python_losses(model: &Path, inputs: &Path, out: &Path, variant: &str, extra: &[&str]) {
    let mut args = vec![
        "losses",
        "--model",
        path(model),
        "--inputs",
        path(inputs),
        "--out",
        path(out),
        "--variant",
        variant,
    ];
    args.extend_from_slice(extra);
    run_reference("core_reference", &args);
}

/// Multiplies every cross-attention key projection (`attn2.to_k`) of the U-Net in
/// `model` by 4, so attention scores spread four times wider.
fn sharpen_cross_attention(model: &Path) {
    let file = model.join("unet/diffusion_pytorch_model.safetensors");
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(&file)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let t = if name.ends_with("attn2.to_k.weight") {
                t * 4.0
            } else {
                t
            };
            (name, t)
        })
        .collect();
    let keys = tensors
        .iter()
        .filter(|(name, _)| name.ends_with("attn2.to_k.weight"))
        .count();
    assert_eq!(keys, 16, "SD 2.1's U-Net has 16 cross-attention layers");
    Tensor::write_safetensors(&tensors, &file).unwrap();
}

fn scalar(t: &Tensor) -> f64 {
    assert_eq!(t.numel(), 1, "a loss is one number");
    t.double_value(&[])
}

/// Runs both implementations on `inputs` and compares what `compare` names.
fn compare(
    dir: &Path,
    model: &Path,
    inputs: &Path,
    case: &str,
    variant: &str,
    extra: &[&str],
    scalars: bool,
) {
    let got = dir.join(format!("{case}-{variant}-rust.safetensors"));
    let want = dir.join(format!("{case}-{variant}-python.safetensors"));
    rust_losses(model, inputs, &got, variant, extra);
    python_losses(model, inputs, &want, variant, extra);
    let (got, want) = (read(&got), read(&want));
    if scalars {
        for name in ["loss_emb", "loss_attn"] {
            let (g, w) = (scalar(&got[name]), scalar(&want[name]));
            assert!(
                w > 0.0,
                "{case} {variant}: reference {name} is {w}: nothing compared"
            );
            eprintln!(
                "{case} {variant} {name}: reference {w:.6e}, relative error {:.2e}",
                (g - w).abs() / w.abs()
            );
            assert!(
                (g - w).abs() <= TOLERANCE * w.abs(),
                "{case} {variant}: {name} rust {g:e} vs reference {w:e} (relative {:.2e})",
                (g - w).abs() / w.abs()
            );
        }
    }
    assert_eq!(got["grad_emb"].size(), want["grad_emb"].size());
    eprintln!(
        "{case} {variant} grad_emb {extra:?}: max-abs / max-ref {:.2e}",
        relative_max_error(&got["grad_emb"], &want["grad_emb"])
    );
    assert_close(
        &format!("{case} {variant} grad_emb {extra:?}"),
        &got["grad_emb"],
        &want["grad_emb"],
        TOLERANCE,
    );
}

#[test]
fn losses_and_gradient_match_the_python_reference() {
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path();
    run_reference(
        "model_reference",
        &[
            "make-model",
            "--config",
            "tiny",
            "--seed",
            "5",
            "--out",
            path(case),
        ],
    );
    let model = case.join("model");
    sharpen_cross_attention(&model);
    for (n, template) in TEMPLATES.iter().enumerate() {
        let inputs = case.join(format!("template{n}.safetensors"));
        let seed = (10 + n).to_string();
        run_reference(
            "core_reference",
            &[
                "make-inputs",
                "--model",
                path(&model),
                "--template",
                template,
                "--category",
                if n == 0 { "dog" } else { "cat" },
                "--seed",
                &seed,
                "--batch",
                "3",
                "--out",
                path(&inputs),
            ],
        );
        let name = format!("template{n}");
        for variant in ["reference", "paper"] {
            compare(case, &model, &inputs, &name, variant, &[], true);
        }
        // With the default weights the embedding loss dominates the gradient (the tiny
        // model's attention differs little between the prompts): compare the attention
        // loss's gradient on its own too.
        if n == 1 {
            let attention_only = ["--lambda-emb", "0", "--lambda-attn", "1"];
            for variant in ["reference", "paper"] {
                compare(
                    case,
                    &model,
                    &inputs,
                    "attention-only",
                    variant,
                    &attention_only,
                    false,
                );
            }
        }
    }
}

#[test]
fn bad_inputs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let status = coreg(&["model", "init", "--out", path(&model)]);
    assert!(status.status.success());
    let ids = |values: &[i64]| {
        let mut row = values.to_vec();
        row.resize(77, 0);
        Tensor::from_slice(&row).view([1, 77])
    };
    let concept = ids(&[49406, 320, 49408, 49407]);
    let reference = ids(&[49406, 320, 1929, 49407]);
    let good = || {
        vec![
            ("concept_ids", concept.copy()),
            ("reference_ids", reference.copy()),
            (
                "concept_embedding",
                Tensor::zeros([32], (tch::Kind::Float, tch::Device::Cpu)),
            ),
            (
                "latents",
                Tensor::zeros([2, 4, 8, 8], (tch::Kind::Float, tch::Device::Cpu)),
            ),
            ("timesteps", Tensor::from_slice(&[1i64, 999])),
        ]
    };
    let run = |inputs: Vec<(&str, Tensor)>| -> String {
        let file = dir.path().join("in.safetensors");
        Tensor::write_safetensors(&inputs, &file).unwrap();
        let out = dir.path().join("out.safetensors");
        let _ = std::fs::remove_file(&out);
        let result = coreg(&[
            "core",
            "losses",
            "--model",
            path(&model),
            "--inputs",
            path(&file),
            "--out",
            path(&out),
        ]);
        if result.status.success() {
            assert!(out.exists());
            return String::new();
        }
        assert!(!out.exists(), "a refused run wrote its output");
        String::from_utf8_lossy(&result.stderr).into_owned()
    };
    assert_eq!(run(good()), "", "the well-formed inputs are accepted");

    let with = |name: &str, value: Tensor| {
        good()
            .into_iter()
            .map(|(k, v)| {
                if k == name {
                    (k, value.shallow_clone())
                } else {
                    (k, v)
                }
            })
            .collect::<Vec<_>>()
    };
    let cases: Vec<(Vec<(&str, Tensor)>, &str)> = vec![
        (
            good()
                .into_iter()
                .filter(|(k, _)| *k != "latents")
                .collect(),
            "no `latents`",
        ),
        (
            with("concept_ids", concept.narrow(1, 0, 10)),
            "`concept_ids` must be i64 [1,77]",
        ),
        (
            with("reference_ids", concept.copy()),
            "not an aligned prompt pair",
        ),
        (
            with("concept_ids", ids(&[49406, 320, 49409, 49407])),
            "placeholder id 49408",
        ),
        (
            with(
                "concept_embedding",
                Tensor::zeros([31], (tch::Kind::Float, tch::Device::Cpu)),
            ),
            "`concept_embedding` must be [32]",
        ),
        (
            with(
                "concept_embedding",
                Tensor::full([32], f64::NAN, (tch::Kind::Float, tch::Device::Cpu)),
            ),
            "NaN",
        ),
        (
            with(
                "latents",
                Tensor::zeros([2, 3, 8, 8], (tch::Kind::Float, tch::Device::Cpu)),
            ),
            "`latents` must be [B,4,h,w]",
        ),
        (
            with("timesteps", Tensor::from_slice(&[1i64])),
            "`timesteps` must be i64 [B] = [2]",
        ),
        (
            with("timesteps", Tensor::from_slice(&[1i64, 1000])),
            "[0, 1000)",
        ),
    ];
    for (inputs, expected) in cases {
        let err = run(inputs);
        assert!(err.contains(expected), "expected {expected:?} in {err:?}");
    }
}
