//! `coreg model …`: make, run and tokenize with a model folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use clap::Subcommand;
use coreg::model::random::{write_random_model, ModelSize};
use coreg::model::{LoadOptions, ModelFolder};
use coreg::schedule::PredictionType;
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Write a randomly initialized SD 2.1-architecture model in diffusers layout.
    Init {
        #[arg(long, value_enum, default_value = "tiny")]
        size: SizeArg,
        #[arg(long, default_value_t = 0)]
        seed: i64,
        /// What the U-Net is said to predict (the scheduler config's `prediction_type`).
        #[arg(long, value_enum, default_value = "epsilon")]
        prediction_type: PredictionArg,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the components whose inputs IN holds and write their outputs to OUT.
    ///
    /// input_ids i64 [B,77] -> text_hidden; latents f32 [B,4,h,w] + timesteps i64 [B]
    /// (+ encoder_hidden_states, else text_hidden) -> unet_out and
    /// cross_attn_token_means [16,B,77]; pixels [B,3,H,W] in [-1,1] -> vae_mean;
    /// latents -> vae_decoded = decode(latents / scaling_factor).
    Forward {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// `cpu` or `cuda[:N]`.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Tokenize each line of a file into `input_ids` i64 [N,77].
    Tokenize {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompts: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

/// `--size`: the command line's names for [`ModelSize`].
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SizeArg {
    /// Fast enough for every test on a CPU (a few MB).
    Tiny,
    /// For CPU benchmarks: real SD 2.1 proportions at about a tenth of the width.
    Small,
    /// The real SD 2.1 shapes (866 M U-Net parameters, about 5 GB in fp32).
    Full,
}

impl From<SizeArg> for ModelSize {
    fn from(arg: SizeArg) -> Self {
        match arg {
            SizeArg::Tiny => ModelSize::Tiny,
            SizeArg::Small => ModelSize::Small,
            SizeArg::Full => ModelSize::Full,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum PredictionArg {
    Epsilon,
    VPrediction,
}

impl From<PredictionArg> for PredictionType {
    fn from(arg: PredictionArg) -> Self {
        match arg {
            PredictionArg::Epsilon => PredictionType::Epsilon,
            PredictionArg::VPrediction => PredictionType::VPrediction,
        }
    }
}

pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Init {
            size,
            seed,
            prediction_type,
            out,
        } => {
            write_random_model(&out, size.into(), prediction_type.into(), seed)?;
            println!("{}", out.display());
            Ok(())
        }
        ModelCommand::Forward {
            model,
            inputs,
            out,
            device,
        } => forward(&model, &inputs, &out, parse_device(&device)?),
        ModelCommand::Tokenize {
            model,
            prompts,
            out,
        } => tokenize(&model, &prompts, &out),
    }
}

fn parse_device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match name.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => bail!("unknown device {name:?} (expected cpu, cuda or cuda:N)"),
        },
    }
}

fn forward(model: &Path, inputs: &Path, out: &Path, device: Device) -> anyhow::Result<()> {
    let folder = ModelFolder::open(model)?;
    let inputs: HashMap<String, Tensor> = Tensor::read_safetensors(inputs)
        .with_context(|| format!("reading inputs {}", inputs.display()))?
        .into_iter()
        .collect();
    ensure!(
        ["input_ids", "latents", "pixels"]
            .iter()
            .any(|k| inputs.contains_key(*k)),
        "{} holds none of input_ids, latents, pixels",
        model.display()
    );
    let opts = LoadOptions {
        device,
        ..LoadOptions::default()
    };
    let float = |name: &str| -> anyhow::Result<Option<Tensor>> {
        inputs
            .get(name)
            .map(|t| {
                ensure!(
                    t.is_floating_point(),
                    "`{name}` must be a float tensor, got {:?}",
                    t.kind()
                );
                Ok(t.to_device(device).to_kind(Kind::Float))
            })
            .transpose()
    };
    let _guard = tch::no_grad_guard();
    let mut outputs: Vec<(String, Tensor)> = Vec::new();

    let text_hidden = match inputs.get("input_ids") {
        Some(ids) => {
            let size = ids.size();
            ensure!(
                ids.kind() == Kind::Int64 && size.len() == 2,
                "`input_ids` must be i64 [B,77], got {:?} {size:?}",
                ids.kind()
            );
            let vocab = folder.text_encoder.vocab_size as i64;
            let max = ids.max().int64_value(&[]);
            let min = ids.min().int64_value(&[]);
            ensure!(
                min >= 0 && max < vocab,
                "`input_ids` hold ids outside [0, {vocab})"
            );
            let encoder = folder.load_text_encoder(&opts)?;
            let hidden = encoder.model.forward(&ids.to_device(device));
            outputs.push(("text_hidden".into(), hidden.shallow_clone()));
            Some(hidden)
        }
        None => None,
    };

    if let Some(latents) = float("latents")? {
        let size = latents.size();
        ensure!(
            size.len() == 4 && size[1] == folder.unet.in_channels as i64,
            "`latents` must be [B,{},h,w], got {size:?}",
            folder.unet.in_channels
        );
        if let Some(timesteps) = inputs.get("timesteps") {
            ensure!(
                timesteps.size() == [size[0]],
                "`timesteps` must be [B] = [{}], got {:?}",
                size[0],
                timesteps.size()
            );
            let context = match (float("encoder_hidden_states")?, &text_hidden) {
                (Some(c), _) => c,
                (None, Some(h)) => h.shallow_clone(),
                (None, None) => {
                    bail!("`latents` with `timesteps` need `encoder_hidden_states` or `input_ids`")
                }
            };
            let unet = folder.load_unet(&opts)?;
            let (prediction, token_means) = unet.model.forward_with_cross_attention(
                &latents,
                &timesteps.to_device(device),
                &context,
            );
            outputs.push(("unet_out".into(), prediction));
            outputs.push((
                "cross_attn_token_means".into(),
                Tensor::stack(&token_means, 0),
            ));
        }
        let vae = folder.load_vae(&opts)?;
        let decoded = vae.model.decode(&(&latents / folder.vae.scaling_factor));
        outputs.push(("vae_decoded".into(), decoded));
        if let Some(pixels) = float("pixels")? {
            outputs.push(("vae_mean".into(), encode_mean(&vae.model, &pixels)?));
        }
    } else if let Some(pixels) = float("pixels")? {
        let vae = folder.load_vae(&opts)?;
        outputs.push(("vae_mean".into(), encode_mean(&vae.model, &pixels)?));
    }

    let outputs: Vec<(String, Tensor)> = outputs
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                v.to_device(Device::Cpu).to_kind(Kind::Float).contiguous(),
            )
        })
        .collect();
    Tensor::write_safetensors(&outputs, out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

fn encode_mean(vae: &coreg::model::vae::AutoencoderKl, pixels: &Tensor) -> anyhow::Result<Tensor> {
    let size = pixels.size();
    ensure!(
        size.len() == 4 && size[1] == 3 && size[2] % 8 == 0 && size[3] % 8 == 0,
        "`pixels` must be [B,3,H,W] with H and W multiples of 8, got {size:?}"
    );
    Ok(vae.encode(pixels).mean().shallow_clone())
}

fn tokenize(model: &Path, prompts: &Path, out: &Path) -> anyhow::Result<()> {
    let folder = ModelFolder::open(model)?;
    let tokenizer = folder.tokenizer()?;
    let text = std::fs::read_to_string(prompts)
        .with_context(|| format!("reading {}", prompts.display()))?;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let tokens = tokenizer.encode(line)?;
        if tokens.truncated {
            eprintln!(
                "warning: line {} is longer than 77 tokens and was truncated",
                n + 1
            );
        }
        rows.push(Tensor::from_slice(&tokens.ids));
    }
    ensure!(!rows.is_empty(), "{} holds no prompts", prompts.display());
    Tensor::write_safetensors(&[("input_ids", Tensor::stack(&rows, 0))], out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
