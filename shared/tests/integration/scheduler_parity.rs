//! The noise schedule and the samplers against diffusers 0.42 on the same inputs.
//!
//! One run of the Python reference (`tests/reference/scheduler_reference.py`) drives
//! diffusers' DDIM, Euler and DPM-Solver++ schedulers through StableDiffusionPipeline's
//! loop for every case below, feeding the same initial noise and the same random
//! "U-Net outputs" step by step, and computes DDPM's `add_noise`/`get_velocity`. Here
//! the timesteps must be equal exactly, and every scaled model input and step output
//! within 1e-5 of the reference step's largest magnitude.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use coreg::schedule::{NoiseSchedule, PredictionType, SamplerKind, SchedulerConfig};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use coreg_test_support::reference::{read, relative_max_error, run_reference};

const TOLERANCE: f64 = 1e-5;
const LATENT_SHAPE: [i64; 4] = [2, 4, 8, 8];
const MAX_STEPS: i64 = 50;
const TRAIN_TIMESTEPS: [i64; 4] = [0, 250, 637, 999];

struct SamplingCase {
    name: String,
    config: Value,
    sampler: SamplerKind,
    steps: usize,
}

/// SD 2.1 base's `scheduler/scheduler_config.json`, as published: a PNDM config with no
/// `timestep_spacing`, so every sampler falls back to its own default spacing.
fn sd21_base() -> Value {
    json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.10.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null
    })
}

/// SD 2.1 (768 px): a DDIM config with v-prediction.
fn sd21_768() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.8.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null
    })
}

fn with(mut config: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    config
}

fn sampling_cases() -> Vec<SamplingCase> {
    let mut cases = Vec::new();
    let mut add = |name: String, config: &Value, steps: &[usize]| {
        for sampler in SamplerKind::ALL {
            for &steps in steps {
                cases.push(SamplingCase {
                    name: format!("{name}-{}-{steps}", sampler.name()),
                    config: config.clone(),
                    sampler,
                    steps,
                });
            }
        }
    };
    for prediction in ["epsilon", "v_prediction"] {
        for spacing in ["linspace", "leading", "trailing"] {
            let config = with(
                sd21_base(),
                json!({"prediction_type": prediction, "timestep_spacing": spacing}),
            );
            add(
                format!("grid-{prediction}-{spacing}"),
                &config,
                &[10, 25, 50],
            );
        }
    }
    add("sd21-base".into(), &sd21_base(), &[25, 50]);
    add("sd21-768".into(), &sd21_768(), &[25, 50]);
    // diffusers' own defaults: linear betas, DDIM clipping x₀ and ᾱ = 1 past t = 0.
    add("defaults".into(), &json!({}), &[30]);
    // A step count that does not divide 1000 makes "trailing" use a fractional numpy
    // arange; the cosine schedule and x₀ prediction cover the remaining options.
    add(
        "odd-trailing".into(),
        &with(sd21_base(), json!({"timestep_spacing": "trailing"})),
        &[7, 33],
    );
    add(
        "cosine-sample".into(),
        &json!({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample",
                "timestep_spacing": "linspace", "clip_sample": false}),
        &[12],
    );
    cases
}

fn training_cases() -> Vec<(&'static str, Value)> {
    vec![
        ("train-sd21-base", sd21_base()),
        ("train-sd21-768", sd21_768()),
        ("train-defaults", json!({})),
        (
            "train-cosine",
            json!({"beta_schedule": "squaredcos_cap_v2"}),
        ),
    ]
}

/// The folder holding the inputs, each case's config file and the reference outputs,
/// made once per test binary (one Python start for every test).
fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scheduler_parity");
        std::fs::create_dir_all(dir.join("configs")).unwrap();
        let sampling = sampling_cases();
        let training = training_cases();
        let mut listed = json!({"sampling": [], "training": []});
        for case in &sampling {
            write_config(&dir, &case.name, &case.config);
            listed["sampling"].as_array_mut().unwrap().push(json!({
                "name": case.name, "config": case.config,
                "sampler": case.sampler.name(), "steps": case.steps,
            }));
        }
        for (name, config) in &training {
            write_config(&dir, name, config);
            listed["training"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": name, "config": config}));
        }
        std::fs::write(dir.join("cases.json"), listed.to_string()).unwrap();

        tch::manual_seed(20240829);
        let cpu = (Kind::Float, Device::Cpu);
        let mut output_shape = vec![MAX_STEPS];
        output_shape.extend(LATENT_SHAPE);
        let inputs = [
            ("noise", Tensor::randn(LATENT_SHAPE, cpu)),
            ("model_outputs", Tensor::randn(output_shape.as_slice(), cpu)),
            ("x0", Tensor::randn([4, 4, 8, 8], cpu)),
            ("train_noise", Tensor::randn([4, 4, 8, 8], cpu)),
            ("train_timesteps", Tensor::from_slice(&TRAIN_TIMESTEPS)),
        ];
        Tensor::write_safetensors(&inputs, dir.join("inputs.safetensors")).unwrap();

        let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
        run_reference(
            "scheduler_reference",
            &[
                "--cases",
                &path("cases.json"),
                "--inputs",
                &path("inputs.safetensors"),
                "--out",
                &path("expected.safetensors"),
            ],
        );
        dir
    })
}

fn write_config(dir: &Path, name: &str, config: &Value) {
    let text = serde_json::to_string_pretty(config).unwrap();
    std::fs::write(dir.join("configs").join(format!("{name}.json")), text).unwrap();
}

fn read_config(dir: &Path, name: &str) -> SchedulerConfig {
    SchedulerConfig::read(&dir.join("configs").join(format!("{name}.json")))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Runs every sampling case whose name starts with `prefix` and returns the largest
/// relative error seen; panics on the first mismatch.
fn check_sampling(prefix: &str) -> f64 {
    let dir = reference();
    let inputs = read(&dir.join("inputs.safetensors"));
    let want = read(&dir.join("expected.safetensors"));
    let (noise, model_outputs) = (&inputs["noise"], &inputs["model_outputs"]);
    let mut worst = 0.0f64;
    let cases: Vec<_> = sampling_cases()
        .into_iter()
        .filter(|c| c.name.starts_with(prefix))
        .collect();
    assert!(!cases.is_empty(), "no case named {prefix}*");
    for case in cases {
        let name = &case.name;
        let config = read_config(dir, name);
        let mut sampler = case.sampler.build(&config, case.steps).unwrap();
        let want_timesteps = Vec::<f64>::try_from(&want[&format!("{name}.timesteps")]).unwrap();
        assert_eq!(
            sampler.timesteps(),
            want_timesteps.as_slice(),
            "{name}: timesteps"
        );
        let want_sigma = want[&format!("{name}.init_noise_sigma")].double_value(&[0]);
        assert_eq!(
            sampler.init_noise_sigma(),
            want_sigma,
            "{name}: init_noise_sigma"
        );

        let want_scaled = &want[&format!("{name}.scaled")];
        let want_prev = &want[&format!("{name}.prev")];
        let mut latents = noise * sampler.init_noise_sigma();
        for i in 0..sampler.num_steps() {
            let scaled = sampler.scale_model_input(&latents, i);
            latents = sampler.step(&model_outputs.get(i as i64), i, &latents);
            for (what, got, want) in [
                ("scaled input", &scaled, want_scaled),
                ("step output", &latents, want_prev),
            ] {
                let err = relative_max_error(got, &want.get(i as i64));
                assert!(
                    err <= TOLERANCE,
                    "{name}: {what} of step {i}: max |rust − ref| / max |ref| = {err:.3e}"
                );
                worst = worst.max(err);
            }
        }
    }
    eprintln!("{prefix}*: largest relative error {worst:.3e}");
    worst
}

#[test]
fn ddim_matches_diffusers() {
    for prefix in ["grid-epsilon", "grid-v_prediction"] {
        for spacing in ["linspace", "leading", "trailing"] {
            check_sampling(&format!("{prefix}-{spacing}-ddim-"));
        }
    }
}

#[test]
fn euler_matches_diffusers() {
    for prefix in ["grid-epsilon", "grid-v_prediction"] {
        for spacing in ["linspace", "leading", "trailing"] {
            check_sampling(&format!("{prefix}-{spacing}-euler-"));
        }
    }
}

#[test]
fn dpm_solver_matches_diffusers() {
    for prefix in ["grid-epsilon", "grid-v_prediction"] {
        for spacing in ["linspace", "leading", "trailing"] {
            check_sampling(&format!("{prefix}-{spacing}-dpm++2m-"));
        }
    }
}

#[test]
fn sd21_configs_match_diffusers() {
    check_sampling("sd21-base-");
    check_sampling("sd21-768-");
}

#[test]
fn other_schedules_and_step_counts_match_diffusers() {
    check_sampling("defaults-");
    check_sampling("odd-trailing-");
    check_sampling("cosine-sample-");
}

#[test]
fn training_noise_matches_diffusers() {
    let dir = reference();
    let inputs = read(&dir.join("inputs.safetensors"));
    let want = read(&dir.join("expected.safetensors"));
    let (x0, noise, t) = (
        &inputs["x0"],
        &inputs["train_noise"],
        &inputs["train_timesteps"],
    );
    for (name, _) in training_cases() {
        let config = read_config(dir, name);
        let schedule = NoiseSchedule::new(&config).unwrap();
        let want_ac = Vec::<f32>::try_from(&want[&format!("{name}.alphas_cumprod")]).unwrap();
        assert_eq!(
            schedule.alphas_cumprod(),
            want_ac.as_slice(),
            "{name}: alphas_cumprod"
        );
        let noisy = schedule.add_noise(x0, noise, t);
        let velocity = schedule.velocity(x0, noise, t);
        let want_velocity = &want[&format!("{name}.velocity")];
        for (what, got, want) in [
            ("add_noise", &noisy, &want[&format!("{name}.noisy")]),
            ("velocity", &velocity, want_velocity),
        ] {
            let err = relative_max_error(got, want);
            assert!(err <= TOLERANCE, "{name}: {what}: relative error {err:.3e}");
            eprintln!("{name}: {what}: relative error {err:.3e}");
        }
        let target = schedule.target(config.prediction_type, x0, noise, t);
        let want_target = match config.prediction_type {
            PredictionType::Epsilon => noise,
            PredictionType::VPrediction => want_velocity,
            PredictionType::Sample => x0,
        };
        assert!(
            relative_max_error(&target, want_target) <= TOLERANCE,
            "{name}: target"
        );
    }
}
