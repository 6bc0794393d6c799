//! `coreg-sampler`: images of a learned concept in any scene, optionally with CoRe's
//! test-time optimization per prompt. `serve` is the gRPC service
//! (`coreg.v1.SamplerService`); `generate` is the one-shot mode for scripts.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use coreg::artifact::{list_versions, read_concept};
use coreg::base_model::{parse_device, BaseModel};
use coreg::generate::GenerationParams;
use coreg::method::tto::TtoConfig;
use coreg::optim::AdamWConfig;
use coreg::schedule::SamplerKind;
use coreg::store::Store;

use coreg_sampler::personalized::{self, render, ActiveConcept, ImageRequest, Progress, Rendered};

#[derive(Parser)]
#[command(name = "coreg-sampler", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images once and write them as PNG files.
    ///
    /// Exit codes: 0 done; 64 bad arguments; 65 a prompt or setting cannot be used;
    /// 66 the concept or model is not there; 70 generation failed (e.g. NaN);
    /// 73 the output cannot be written; 74 a concept blob is corrupt (its digest does
    /// not match); 75 the store is unavailable (a retry may succeed).
    Generate(Box<GenerateArgs>),
    /// Serve the gRPC generation API (`coreg.v1.SamplerService`) until SIGTERM.
    ///
    /// Configuration: built-in defaults < `--config FILE` (TOML) < `COREG_…`
    /// environment variables (nested keys joined by `__`, e.g. `COREG_STORE__URL`).
    /// Exit codes: 0 after SIGTERM; 64 the configuration is invalid; 70 the service
    /// could not start (model, store, address, certificate).
    Serve {
        #[arg(long, env = "COREG_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers-layout SD 2.1 folder.
    #[arg(long)]
    model: PathBuf,
    /// `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// The object store holding the concept (`file:///…`, `s3://bucket`, …).
    #[arg(long, requires = "concept")]
    store: Option<String>,
    /// A store option KEY=VALUE (object_store's keys, e.g. aws_region=eu-west-1).
    #[arg(long = "store-option", value_parser = key_value)]
    store_options: Vec<(String, String)>,
    /// The concept to generate; without one, the base model alone.
    #[arg(long, requires = "store")]
    concept: Option<String>,
    /// The concept's version; default: the last of its versions in sort order.
    #[arg(long, requires = "concept")]
    version: Option<String>,
    /// A prompt (repeatable); `{}` or the concept's token marks where the concept goes.
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 1)]
    images_per_prompt: usize,
    /// Image k (prompt-major) uses seed + k.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    #[arg(long, default_value_t = 512)]
    width: u32,
    #[arg(long, default_value_t = 512)]
    height: u32,
    #[arg(long, value_enum, default_value_t = Scheduler::DpmSolver)]
    scheduler: Scheduler,
    /// Run test-time optimization for each prompt first.
    #[arg(long)]
    tto: bool,
    #[arg(long, default_value_t = 10, requires = "tto")]
    tto_steps: usize,
    #[arg(long, default_value_t = 5e-4, requires = "tto")]
    tto_learning_rate: f64,
    /// Where the PNG files go (created if missing).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Scheduler {
    /// DPM-Solver++ (2M), diffusers' `DPMSolverMultistepScheduler`.
    DpmSolver,
    Ddim,
    Euler,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

/// An exit code and its message.
struct Failure(u8, String);

fn exit_code(error: &coreg::Error) -> u8 {
    match error {
        coreg::Error::InvalidInput(_) | coreg::Error::Tokenizer(_) => 65,
        coreg::Error::NotFound { .. } | coreg::Error::Io { .. } => 66,
        coreg::Error::CorruptArtifact { .. } => 74,
        coreg::Error::Store { .. } => 75,
        _ => 70,
    }
}

fn failure(error: coreg::Error) -> Failure {
    Failure(exit_code(&error), error.to_string())
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Generate(args) => {
            coreg_serving::init_logging(false, "warn");
            generate(&args)
        }
        Command::Serve { config } => serve(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

fn serve(config: Option<PathBuf>) -> Result<(), Failure> {
    let config = coreg_sampler::service::load_config(config.as_deref())
        .map_err(|e| Failure(64, e.to_string()))?;
    coreg_serving::init_logging(config.log_format == "json", "info");
    coreg_sampler::service::serve(config).map_err(|e| Failure(70, format!("{e:#}")))
}

fn generate(args: &GenerateArgs) -> Result<(), Failure> {
    let device = parse_device(&args.device).map_err(|e| Failure(64, format!("--device: {e}")))?;
    let params = GenerationParams {
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        height: args.height,
        width: args.width,
        sampler: match args.scheduler {
            Scheduler::DpmSolver => SamplerKind::DpmSolverPlusPlus,
            Scheduler::Ddim => SamplerKind::Ddim,
            Scheduler::Euler => SamplerKind::EulerDiscrete,
        },
    };
    let images = args.prompts.len() * args.images_per_prompt;
    let request = ImageRequest {
        prompts: args.prompts.clone(),
        negative_prompt: args.negative_prompt.clone(),
        images_per_prompt: args.images_per_prompt,
        seeds: (0..images as u64)
            .map(|k| args.seed.wrapping_add(k))
            .collect(),
        params,
        tto: args.tto.then(|| TtoConfig {
            steps: args.tto_steps,
            optimizer: AdamWConfig {
                lr: args.tto_learning_rate,
                ..TtoConfig::default().optimizer
            },
            ..TtoConfig::default()
        }),
    };
    // Refuse a bad request before the minutes of loading a real model.
    request.validate().map_err(failure)?;

    let concept = match (&args.store, &args.concept) {
        (Some(url), Some(name)) => Some(load_concept(url, &args.store_options, name, args)?),
        _ => None,
    };
    let mut model = BaseModel::load(&args.model, device, None).map_err(failure)?;
    let active = concept
        .as_ref()
        .map(|concept| ActiveConcept::activate(&mut model, concept))
        .transpose()
        .map_err(failure)?;
    if let Some(active) = &active {
        eprintln!(
            "concept {}/{} ({}, a {})",
            active.name, active.version, active.token, active.category
        );
    }

    let rendered = render(&model, active.as_ref(), &request, |progress| {
        match progress {
            Progress::Optimized { prompt } => {
                eprintln!("prompt {}: test-time optimization done", prompt + 1)
            }
            Progress::Denoised {
                prompt,
                step,
                total,
            } if step == total || step % 10 == 0 => {
                eprintln!("prompt {}: step {step}/{total}", prompt + 1)
            }
            Progress::Denoised { .. } => {}
        }
        ControlFlow::Continue(())
    })
    .map_err(failure)?;
    let (images, tto_losses) = match rendered {
        Rendered::Completed { images, tto_losses } => (images, tto_losses),
        Rendered::Cancelled { images } => {
            return Err(Failure(
                70,
                format!("generation stopped after {} images", images.len()),
            ))
        }
    };
    for (prompt, losses) in tto_losses.iter().enumerate() {
        if let (Some(first), Some(last)) = (losses.first(), losses.last()) {
            eprintln!(
                "prompt {}: test-time loss {:.6} -> {:.6}",
                prompt + 1,
                first.total,
                last.total
            );
        }
    }
    if let Some(bad) = images.iter().find(|image| !image.is_finite()) {
        return Err(Failure(
            70,
            format!(
                "image {} (prompt {:?}, seed {}) diverged to NaN/Inf",
                bad.index, bad.prompt, bad.seed
            ),
        ));
    }
    write_images(&args.out, &images)
}

fn load_concept(
    url: &str,
    options: &[(String, String)],
    name: &str,
    args: &GenerateArgs,
) -> Result<coreg::artifact::LoadedConcept, Failure> {
    let store =
        Store::open(url, options.to_vec()).map_err(|e| Failure(64, format!("--store: {e}")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(70, format!("starting the I/O runtime: {e}")))?;
    runtime.block_on(async {
        let version = match &args.version {
            Some(version) => version.clone(),
            None => list_versions(&store, name)
                .await
                .map_err(failure)?
                .pop()
                .ok_or_else(|| Failure(66, format!("the store holds no concept {name:?}")))?,
        };
        // Every blob's digest is checked: a corrupt concept is an error, never an image.
        read_concept(&store, name, &version).await.map_err(failure)
    })
}

/// Writes `NNN-seedS.png` per image and `images.json` (file, prompt, seed of each),
/// and prints each PNG's path.
fn write_images(out: &Path, images: &[personalized::RenderedImage]) -> Result<(), Failure> {
    let cannot = |path: &Path, e: std::io::Error| Failure(73, format!("{}: {e}", path.display()));
    std::fs::create_dir_all(out).map_err(|e| cannot(out, e))?;
    let mut index = Vec::with_capacity(images.len());
    for image in images {
        let name = format!("{:03}-seed{}.png", image.index, image.seed);
        let path = out.join(&name);
        std::fs::write(&path, &image.png).map_err(|e| cannot(&path, e))?;
        println!("{}", path.display());
        index.push(serde_json::json!({
            "file": name,
            "prompt": image.prompt,
            "seed": image.seed,
        }));
    }
    let path = out.join("images.json");
    let text = serde_json::to_string_pretty(&index).expect("JSON");
    std::fs::write(&path, text).map_err(|e| cannot(&path, e))
}
