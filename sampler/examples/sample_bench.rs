//! Seconds per denoising step, per image and per test-time optimization, and peak
//! memory, for the sampler benchmark (`bench/sampler.sh` runs it next to
//! `tests/reference/sample_bench_reference.py`, diffusers on the same inputs).
//!
//! Loads a model folder as the sampler does (`BaseModel`, fp32, CPU) and makes a
//! concept the way the sampler receives one: written to a `memory:///` store with
//! `write_concept` and read back with `read_concept`. Its S* is the embedding of
//! "dog" plus a little Gaussian noise, its training latents are standard normal
//! `[4, 4, side/8, side/8]` and its U-Net delta is empty: a delta changes the U-Net's
//! values, not the work of a step, and with none the Python side runs the very same
//! model (diffusers' pipeline loads the base folder and the S* as a textual
//! inversion). Then, per `--mode`:
//!
//! - `images`: `--warmup` untimed then `--runs` timed calls of
//!   `coreg_sampler::personalized::render` for one prompt and one image (guidance 7.5,
//!   classifier-free guidance batched into one U-Net call per step, DPM-Solver++ 2M,
//!   `--steps` steps, no test-time optimization), image `k` from seed `seed + k`. A
//!   call's seconds cover what the sampler does for an image: encode the prompt and
//!   the empty negative prompt, every denoising step, the VAE decode and the PNG
//!   encoding. The denoising steps are timed between consecutive
//!   `Progress::Denoised` reports, so step 1 (which follows the prompt encoding) is not
//!   among them: `--steps` − 1 step times per image; the time from the last report to
//!   the end of the call is the decode's and the PNG encoding's. `--record` writes S* and each
//!   image's initial noise; `--latents-out` the final latents, for the Python side to
//!   compare against its own.
//! - `tto`: `--warmup` untimed runs of one step then `--runs` timed runs of
//!   `TestTimeOptimizer::run` (`--tto-steps` steps of batch `--tto-batch`, the
//!   paper's other settings) for the prompt, as `render` runs it before a prompt's
//!   images; run `p` uses the batches `draw_batches` draws from seed `seed + p`, drawn
//!   before the timer starts. `--record` writes S*, the training latents and every
//!   run's batches (in the layout of `replay_reference.py`'s `tto` inputs, under
//!   `run.{p}.`).
//!
//! The JSON written to `--out` holds every timed run's wall-clock and CPU seconds
//! (user + system, all threads), the step times, the time after the last step, the process's peak resident set
//! (VmHWM) and its resident set just before the first run, the thread count and, for
//! `tto`, every step's loss (a check that both sides did the same work).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use coreg::artifact::{
    base_model_identity, read_concept, write_concept, ConceptArtifacts, LearnedEmbedding,
    LoadedConcept, LossHistory, UNetDelta,
};
use coreg::base_model::BaseModel;
use coreg::generate::{seeded_noise, GenerationParams};
use coreg::method::tto::{TestTimeOptimizer, TtoConfig, TtoModels};
use coreg::schedule::SamplerKind;
use coreg::store::Store;
use coreg_sampler::personalized::{render, ActiveConcept, ImageRequest, Progress, Rendered};
use serde_json::json;
use tch::{Device, Kind, Tensor};

const TOKEN: &str = "<concept>";
const CATEGORY: &str = "dog";
/// The prompt, `{}` standing for the concept's token.
const PROMPT: &str = "a photo of a {} playing in the snow";
const GUIDANCE: f64 = 7.5;
/// How many training latents the concept holds (the batches draw from them with
/// replacement, so the count does not change the work).
const TRAINING_LATENTS: i64 = 4;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Images,
    Tto,
}

#[derive(Parser)]
#[command(about = "Seconds per denoising step, image and test-time optimization")]
struct Args {
    /// A diffusers model folder (e.g. from `coreg model init --size small`).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Side of the square images in pixels (the training latents are side/8).
    #[arg(long, default_value_t = 512)]
    resolution: u32,
    /// Denoising steps per image (at least 2: step times are taken between steps).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Test-time optimization steps per prompt.
    #[arg(long, default_value_t = 10)]
    tto_steps: usize,
    /// Latents per test-time optimization step.
    #[arg(long, default_value_t = 6)]
    tto_batch: usize,
    /// Untimed runs first (images; test-time runs of one step).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs (images or test-time optimizations).
    #[arg(long, default_value_t = 2)]
    runs: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Intra-op threads; libtorch's default (the core count) when absent.
    #[arg(long)]
    threads: Option<i32>,
    /// Writes the inputs here for the Python side.
    #[arg(long)]
    record: Option<PathBuf>,
    /// `images`: writes each image's final latents here (`image.{k}`).
    #[arg(long)]
    latents_out: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

/// The benchmark's concept on `model`, through the store as the sampler gets one.
fn make_concept(model: &BaseModel, resolution: u32, seed: u64) -> Result<LoadedConcept> {
    tch::manual_seed(seed as i64);
    let category = model.tokenizer.single_token_id(CATEGORY)?;
    let word = tch::no_grad(|| {
        model
            .text_encoder
            .model
            .token_embedding(&Tensor::from_slice(&[category]))
            .get(0)
    });
    let side = i64::from(resolution / 8);
    let channels = model.unet.model.in_channels();
    let artifacts = ConceptArtifacts {
        embedding: LearnedEmbedding::new(TOKEN, &(&word + Tensor::randn_like(&word) * 0.05))?,
        unet_delta: UNetDelta::empty(),
        training_latents: Tensor::randn(
            [TRAINING_LATENTS, channels, side, side],
            (Kind::Float, Device::Cpu),
        ),
        super_category: CATEGORY.into(),
        base_model: base_model_identity(&model.folder)?,
        hyper_parameters: json!({}),
        seed,
        losses: LossHistory::default(),
    };
    let store = Store::open("memory:///", Vec::<(String, String)>::new())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(write_concept(&store, "bench", "v1", artifacts))?;
    Ok(runtime.block_on(read_concept(&store, "bench", "v1"))?)
}

/// A `/proc/self/status` field in bytes (VmHWM: peak resident set; VmRSS: current).
fn status_bytes(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    let kib: u64 = line
        .trim()
        .strip_suffix("kB")
        .with_context(|| format!("{field} is not in kB: {line}"))?
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// User plus system CPU seconds of this process so far, all threads together, from
/// `/proc/self/stat` (utime and stime, in USER_HZ = 100 ticks a second).
fn cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let rest = stat
        .rsplit_once(')')
        .context("unexpected /proc/self/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/self/stat")?
            .parse::<u64>()? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// What one run (an image or a test-time optimization) took.
struct Run {
    seconds: f64,
    cpu_seconds: f64,
    /// `images`: the step times; `tto`: none.
    step_seconds: Vec<f64>,
    /// `images`: from the last step's report to the end (VAE decode, PNG); `tto`: 0.
    tail_seconds: f64,
    /// `tto`: every step's total loss; `images`: none.
    losses: Vec<f64>,
}

/// Renders image `index` (seed `seed + index`) and times it; its final latents go to
/// `latents`.
fn time_image(
    model: &BaseModel,
    concept: &ActiveConcept,
    params: &GenerationParams,
    seed: u64,
    latents: &mut Vec<Tensor>,
) -> Result<Run> {
    let request = ImageRequest {
        prompts: vec![PROMPT.into()],
        negative_prompt: String::new(),
        images_per_prompt: 1,
        seeds: vec![seed],
        params: params.clone(),
        tto: None,
    };
    let mut marks = Vec::with_capacity(params.steps);
    let (start, cpu_start) = (Instant::now(), cpu_seconds()?);
    let rendered = render(model, Some(concept), &request, |progress| {
        if let Progress::Denoised { .. } = progress {
            marks.push(Instant::now());
        }
        ControlFlow::Continue(())
    })?;
    let end = Instant::now();
    let seconds = (end - start).as_secs_f64();
    let cpu = cpu_seconds()? - cpu_start;
    let Rendered::Completed { mut images, .. } = rendered else {
        bail!("nothing cancelled the image, yet it was cancelled");
    };
    if images.len() != 1 || marks.len() != params.steps {
        bail!(
            "{} images and {} step reports for 1 image of {} steps",
            images.len(),
            marks.len(),
            params.steps
        );
    }
    latents.push(images.remove(0).latents);
    let tail_seconds = marks.last().map_or(0.0, |&last| (end - last).as_secs_f64());
    Ok(Run {
        seconds,
        cpu_seconds: cpu,
        step_seconds: marks
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect(),
        tail_seconds,
        losses: Vec::new(),
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.is_empty() {
        f64::NAN
    } else if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.mode == Mode::Images && args.steps < 2 {
        bail!("--steps must be at least 2: step times are taken between steps");
    }
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    let mut model = BaseModel::load(&args.model, Device::Cpu, None)?;
    let loaded = make_concept(&model, args.resolution, args.seed)?;
    let concept = ActiveConcept::activate(&mut model, &loaded)?;
    let embedding = loaded.embedding.vector();
    let total = args.warmup + args.runs;
    let mut runs = Vec::with_capacity(total);
    let baseline;

    match args.mode {
        Mode::Images => {
            let params = GenerationParams {
                steps: args.steps,
                guidance_scale: GUIDANCE,
                height: args.resolution,
                width: args.resolution,
                sampler: SamplerKind::DpmSolverPlusPlus,
            };
            let seed = |k: usize| args.seed + k as u64;
            if let Some(record) = &args.record {
                // The noise `render` draws from each image's seed.
                let channels = model.unet.model.in_channels();
                let mut named = vec![("embedding".to_string(), embedding.shallow_clone())];
                named.extend((0..total).map(|k| {
                    (
                        format!("image.{k}.noise"),
                        seeded_noise(&[seed(k)], channels, &params),
                    )
                }));
                Tensor::write_safetensors(&named, record)?;
            }
            let mut latents = Vec::with_capacity(total);
            baseline = status_bytes("VmRSS")?;
            for k in 0..total {
                let run = time_image(&model, &concept, &params, seed(k), &mut latents)?;
                eprintln!(
                    "image {}: {:.3} s, median step {:.3} s",
                    k + 1,
                    run.seconds,
                    median(&run.step_seconds)
                );
                runs.push(run);
            }
            if let Some(path) = &args.latents_out {
                let named: Vec<(String, Tensor)> = latents
                    .into_iter()
                    .enumerate()
                    .map(|(k, t)| (format!("image.{k}"), t))
                    .collect();
                Tensor::write_safetensors(&named, path)?;
            }
        }
        Mode::Tto => {
            // The concept's copy of the tokenizer, as `ActiveConcept` holds it.
            let mut tokenizer = model.tokenizer.clone();
            tokenizer.add_placeholder(TOKEN)?;
            let prompt = concept.resolve_prompt(PROMPT)?;
            let models = TtoModels {
                text_encoder: &model.text_encoder,
                unet: &model.unet,
                schedule: &model.schedule,
            };
            let latents = &loaded.training_latents;
            let optimizer = |p: usize| {
                let config = TtoConfig {
                    steps: if p < args.warmup { 1 } else { args.tto_steps },
                    batch_size: args.tto_batch,
                    ..TtoConfig::default()
                };
                TestTimeOptimizer::new(config, models, &tokenizer, &prompt, TOKEN, CATEGORY)
            };
            let seed = |p: usize| args.seed + p as u64;
            if let Some(record) = &args.record {
                let mut named = vec![
                    ("embedding".to_string(), embedding.shallow_clone()),
                    ("latents".to_string(), latents.shallow_clone()),
                ];
                for p in 0..total {
                    let batches = optimizer(p)?.draw_batches(&latents.size(), seed(p))?;
                    for (i, batch) in batches.into_iter().enumerate() {
                        let indices: Vec<i64> =
                            batch.latent_indices.iter().map(|&i| i as i64).collect();
                        let prefix = format!("run.{p}.step.{i}");
                        named.push((
                            format!("{prefix}.latent_indices"),
                            Tensor::from_slice(&indices),
                        ));
                        named.push((format!("{prefix}.noise"), batch.noise));
                        named.push((format!("{prefix}.timesteps"), batch.timesteps));
                    }
                }
                Tensor::write_safetensors(&named, record)?;
            }
            baseline = status_bytes("VmRSS")?;
            for p in 0..total {
                let optimizer = optimizer(p)?;
                let batches = optimizer.draw_batches(&latents.size(), seed(p))?;
                let (start, cpu_start) = (Instant::now(), cpu_seconds()?);
                let result = optimizer.run(&embedding, latents, &batches)?;
                let seconds = start.elapsed().as_secs_f64();
                let cpu = cpu_seconds()? - cpu_start;
                eprintln!(
                    "test-time optimization {} ({} steps): {seconds:.3} s",
                    p + 1,
                    batches.len()
                );
                runs.push(Run {
                    seconds,
                    cpu_seconds: cpu,
                    step_seconds: Vec::new(),
                    tail_seconds: 0.0,
                    losses: result.losses.iter().map(|l| l.total).collect(),
                });
            }
        }
    }

    let peak = status_bytes("VmHWM")?;
    let timed = &runs[args.warmup..];
    let seconds: Vec<f64> = timed.iter().map(|r| r.seconds).collect();
    let cpu: Vec<f64> = timed.iter().map(|r| r.cpu_seconds).collect();
    let steps: Vec<f64> = timed
        .iter()
        .flat_map(|r| r.step_seconds.iter().copied())
        .collect();
    let tails: Vec<f64> = timed.iter().map(|r| r.tail_seconds).collect();
    let losses: Vec<&Vec<f64>> = runs.iter().map(|r| &r.losses).collect();
    let report = json!({
        "impl": "rust",
        "mode": match args.mode { Mode::Images => "images", Mode::Tto => "tto" },
        "resolution": args.resolution,
        "steps": args.steps,
        "guidance_scale": GUIDANCE,
        "tto_steps": args.tto_steps,
        "tto_batch": args.tto_batch,
        "warmup": args.warmup,
        "runs": args.runs,
        "threads": tch::get_num_threads(),
        "prompt": PROMPT.replace("{}", TOKEN),
        "placeholder": TOKEN,
        "category": CATEGORY,
        "seconds_per_run": median(&seconds),
        "all_seconds": seconds,
        "warmup_seconds": runs[..args.warmup].iter().map(|r| r.seconds).collect::<Vec<_>>(),
        "all_cpu_seconds": cpu,
        "all_step_seconds": steps,
        "all_tail_seconds": tails,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "losses": losses,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "rust {}: {:.3} s per run (median of {}), peak RSS {:.0} MiB",
        report["mode"].as_str().unwrap_or_default(),
        median(&seconds),
        args.runs,
        peak as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
