//! Seconds per CoRe training step and peak memory, for the benchmark of issue 3
//! (`bench/steps.sh` runs it next to `tests/reference/bench_reference.py`).
//!
//! Loads a model folder in fp32 on the CPU, builds stage 1 (the animate prompt set,
//! the paper's defaults) or stage 2 (fp32, no gradient checkpointing, the paper's
//! defaults) for the placeholder `<concept>` of category "dog", and runs `--warmup`
//! untimed then `--steps` timed steps. Each step's inputs are drawn from
//! `tch::manual_seed(seed + step index)`; `--record FILE` writes them all, in the
//! replay layout (`stage{1,2}.{i}.{pixels,posterior_noise,noise,timesteps,
//! template_index}`), so that the Python reference runs the very same steps.
//!
//! The JSON written to `--out` holds the median and every timed step's wall-clock
//! seconds and CPU seconds (user + system, all threads: less sensitive than wall time
//! to other work on a shared machine), the process's peak resident set (VmHWM) and its resident set just before the first
//! step (so that the step's own share can be told from the loaded models'), the
//! thread count and every step's loss (a check that both sides did the same work).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use coreg::dataset::{Stage1Batch, Stage2Batch};
use coreg::method::prompts::PromptSet;
use coreg::method::stage1::{FrozenModels, Stage1, Stage1Config};
use coreg::method::stage2::{Stage2, Stage2Config, Stage2Models};
use coreg::model::{LoadOptions, ModelFolder};
use coreg::schedule::NoiseSchedule;
use serde_json::json;
use tch::{Device, Kind, Tensor};

const PLACEHOLDER: &str = "<concept>";
const CATEGORY: &str = "dog";

#[derive(Parser)]
#[command(about = "Seconds per CoRe stage-1 or stage-2 step on the CPU")]
struct Args {
    /// A diffusers model folder (e.g. from `coreg model init --size small`).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    stage: u8,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed steps first (allocator and kernel warm-up).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Images per step; the paper's 6 (stage 1) or 4 (stage 2) when absent.
    #[arg(long)]
    batch: Option<usize>,
    /// Side of the square training images in pixels.
    #[arg(long, default_value_t = 512)]
    resolution: usize,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Intra-op threads; libtorch's default (the core count) when absent.
    #[arg(long)]
    threads: Option<i32>,
    /// Writes every step's inputs here for the Python reference.
    #[arg(long)]
    record: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

/// One step's inputs; stage 2 ignores `template_index`.
struct Draw {
    pixels: Tensor,
    posterior_noise: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    template_index: i64,
}

impl Draw {
    /// Step `index`'s inputs, the same on every call for the same arguments.
    fn new(args: &Args, batch: i64, index: usize, train_timesteps: i64, templates: i64) -> Self {
        tch::manual_seed(args.seed + index as i64);
        let side = args.resolution as i64;
        let latent = [batch, 4, side / 8, side / 8];
        let cpu = (Kind::Float, Device::Cpu);
        Draw {
            pixels: Tensor::rand([batch, 3, side, side], cpu) * 2.0 - 1.0,
            posterior_noise: Tensor::randn(latent, cpu),
            noise: Tensor::randn(latent, cpu),
            timesteps: Tensor::randint(train_timesteps, [batch], (Kind::Int64, Device::Cpu)),
            template_index: Tensor::randint(templates, [1], (Kind::Int64, Device::Cpu))
                .int64_value(&[0]),
        }
    }

    fn named(&self, stage: u8, index: usize) -> Vec<(String, Tensor)> {
        let mut named = vec![
            ("pixels", self.pixels.shallow_clone()),
            ("posterior_noise", self.posterior_noise.shallow_clone()),
            ("noise", self.noise.shallow_clone()),
            ("timesteps", self.timesteps.shallow_clone()),
        ];
        if stage == 1 {
            named.push(("template_index", Tensor::from_slice(&[self.template_index])));
        }
        named
            .into_iter()
            .map(|(name, t)| (format!("stage{stage}.{index}.{name}"), t))
            .collect()
    }

    fn stage1(self) -> Stage1Batch {
        Stage1Batch {
            pixels: self.pixels,
            posterior_noise: self.posterior_noise,
            noise: self.noise,
            timesteps: self.timesteps,
            template_index: self.template_index as usize,
        }
    }

    fn stage2(self) -> Stage2Batch {
        Stage2Batch {
            pixels: self.pixels,
            posterior_noise: self.posterior_noise,
            noise: self.noise,
            timesteps: self.timesteps,
        }
    }
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
/// `/proc/self/stat` (in clock ticks of USER_HZ, 100 per second in Linux's ABI).
fn cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The fields after the command name, which is in parentheses and may hold spaces:
    // utime and stime are the 14th and 15th fields of the line.
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

/// Each step's wall-clock and CPU seconds and loss.
#[derive(Default)]
struct Timings {
    wall: Vec<f64>,
    cpu: Vec<f64>,
    losses: Vec<f64>,
}

/// Runs `step` on each step's inputs from `draw` (`warmup + steps` of them); only
/// `step` is timed.
fn time_steps<B>(
    total: usize,
    draw: impl Fn(usize) -> B,
    mut step: impl FnMut(&B) -> Result<f64>,
) -> Result<Timings> {
    let mut timings = Timings::default();
    for index in 0..total {
        let batch = draw(index);
        let (start, cpu_start) = (Instant::now(), cpu_seconds()?);
        timings.losses.push(step(&batch)?);
        let seconds = start.elapsed().as_secs_f64();
        timings.wall.push(seconds);
        timings.cpu.push(cpu_seconds()? - cpu_start);
        eprintln!("step {}: {seconds:.3} s", index + 1);
    }
    Ok(timings)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads);
    }
    let folder = ModelFolder::open(&args.model)?;
    let mut tokenizer = folder.tokenizer()?;
    tokenizer.add_placeholder(PLACEHOLDER)?;
    let opts = LoadOptions::default();
    let text_encoder = folder.load_text_encoder(&opts)?;
    let mut unet = folder.load_unet(&opts)?;
    let vae = folder.load_vae(&opts)?;
    let schedule = NoiseSchedule::new(&folder.scheduler)?;
    let prediction_type = folder.scheduler.prediction_type;
    let train_timesteps = schedule.num_train_timesteps() as i64;
    let prompt_set = PromptSet::animate();
    let templates = prompt_set.len() as i64;
    let batch = args.batch.unwrap_or(if args.stage == 1 { 6 } else { 4 });
    let total = args.warmup + args.steps;
    let draw = |index| Draw::new(&args, batch as i64, index, train_timesteps, templates);

    if let Some(record) = &args.record {
        // Drawn once for the file and again per step (same seeds), so that only one
        // step's inputs are resident while timing.
        let named: Vec<(String, Tensor)> = (0..total)
            .flat_map(|i| draw(i).named(args.stage, i))
            .collect();
        Tensor::write_safetensors(&named, record)?;
    }

    let frozen = FrozenModels {
        text_encoder: &text_encoder,
        unet: &unet,
        vae: &vae,
        schedule: &schedule,
        prediction_type,
    };
    let mut config = Stage1Config::new(prompt_set);
    config.batch_size = batch;
    config.resolution = args.resolution;
    let stage1 = Stage1::new(config, frozen, &tokenizer, PLACEHOLDER, CATEGORY)?;
    let mut state1 = stage1.init_state()?;

    let baseline;
    let timings = if args.stage == 1 {
        baseline = status_bytes("VmRSS")?;
        time_steps(
            total,
            |i| draw(i).stage1(),
            |b| Ok(stage1.step(&mut state1, b)?.total),
        )?
    } else {
        // Stage 2 starts from S* at its initial value, the super-category's
        // embedding, as the Python side does.
        let embedding = state1.embedding.detach();
        drop(stage1);
        let config = Stage2Config {
            batch_size: batch,
            resolution: args.resolution,
            ..Default::default()
        };
        let models = Stage2Models {
            text_encoder: &text_encoder,
            unet: &mut unet,
            unet_config: &folder.unet,
            vae: &vae,
            schedule: &schedule,
            prediction_type,
        };
        let stage2 = Stage2::new(config, models, &tokenizer, PLACEHOLDER, &embedding)?;
        let mut state2 = stage2.init_state()?;
        baseline = status_bytes("VmRSS")?;
        time_steps(
            total,
            |i| draw(i).stage2(),
            |b| Ok(stage2.step(&mut state2, b)?.diffusion),
        )?
    };
    let peak = status_bytes("VmHWM")?;
    let (warm, timed) = timings.wall.split_at(args.warmup);
    let timed_cpu = &timings.cpu[args.warmup..];

    let report = json!({
        "impl": "rust",
        "stage": args.stage,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch": batch,
        "resolution": args.resolution,
        "threads": tch::get_num_threads(),
        "seconds_per_step": median(timed),
        "all_seconds": timed,
        "warmup_seconds": warm,
        "cpu_seconds_per_step": median(timed_cpu),
        "all_cpu_seconds": timed_cpu,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "losses": timings.losses,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "rust stage {}: {:.3} s/step (median of {}), peak RSS {:.0} MiB",
        args.stage,
        median(timed),
        args.steps,
        peak as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
