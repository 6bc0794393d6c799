//! Randomly initialized models with Stable Diffusion 2.1's architecture, written as a
//! diffusers-layout folder that diffusers and transformers load as they would a real
//! checkpoint. No weights can be downloaded where this project is tested: tests and
//! benchmarks make their own with this.

use std::path::Path;

use serde_json::{json, Value};
use tch::nn::VarStore;
use tch::Device;

use crate::model::clip::ClipTextTransformer;
use crate::model::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::model::tokenizer::write_tokenizer_files;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKl;
use crate::schedule::PredictionType;
use crate::{Error, Result};

/// How big a model to make. All keep SD 2.1's block structure (16 cross-attention
/// layers, linear projections, GELU text encoder, 49408-token vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelSize {
    /// Fast enough for every test on a CPU (a few MB).
    Tiny,
    /// For CPU benchmarks: real SD 2.1 proportions at about a tenth of the width.
    Small,
    /// The real SD 2.1 shapes (866 M U-Net parameters, about 5 GB in fp32).
    Full,
}

struct Shapes {
    text_hidden: usize,
    text_intermediate: usize,
    text_layers: usize,
    text_heads: usize,
    unet_channels: [usize; 4],
    unet_heads: [usize; 4],
    vae_channels: [usize; 4],
    norm_groups: usize,
    latent_size: usize,
}

impl ModelSize {
    fn shapes(self) -> Shapes {
        match self {
            ModelSize::Tiny => Shapes {
                text_hidden: 32,
                text_intermediate: 64,
                text_layers: 2,
                text_heads: 4,
                unet_channels: [32, 32, 64, 64],
                unet_heads: [2, 2, 4, 4],
                vae_channels: [32, 32, 64, 64],
                norm_groups: 8,
                latent_size: 8,
            },
            ModelSize::Small => Shapes {
                text_hidden: 256,
                text_intermediate: 1024,
                text_layers: 4,
                text_heads: 4,
                unet_channels: [64, 128, 256, 256],
                unet_heads: [1, 2, 4, 4],
                vae_channels: [32, 64, 128, 128],
                norm_groups: 32,
                latent_size: 32,
            },
            // stabilityai/stable-diffusion-2-1-base: unet/config.json, vae/config.json,
            // text_encoder/config.json.
            ModelSize::Full => Shapes {
                text_hidden: 1024,
                text_intermediate: 4096,
                text_layers: 23,
                text_heads: 16,
                unet_channels: [320, 640, 1280, 1280],
                unet_heads: [5, 10, 20, 20],
                vae_channels: [128, 256, 512, 512],
                norm_groups: 32,
                latent_size: 64,
            },
        }
    }
}

/// The configuration files of a random model of `size`.
pub struct RandomModelConfigs {
    pub model_index: Value,
    pub text_encoder: Value,
    pub unet: Value,
    pub vae: Value,
    pub scheduler: Value,
}

pub fn configs(size: ModelSize, prediction: PredictionType) -> RandomModelConfigs {
    let s = size.shapes();
    let version = env!("CARGO_PKG_VERSION");
    let text_encoder = json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": s.text_hidden,
        "intermediate_size": s.text_intermediate,
        "num_hidden_layers": s.text_layers,
        "num_attention_heads": s.text_heads,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 512,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    });
    let unet = json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "sample_size": s.latent_size,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": false,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": s.unet_channels,
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": s.norm_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": s.text_hidden,
        "attention_head_dim": s.unet_heads,
        "use_linear_projection": true,
        "upcast_attention": false,
        "dual_cross_attention": false,
        "only_cross_attention": false,
    });
    let vae = json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": vec!["DownEncoderBlock2D"; 4],
        "up_block_types": vec!["UpDecoderBlock2D"; 4],
        "block_out_channels": s.vae_channels,
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": s.norm_groups,
        "sample_size": s.latent_size * 8,
        "scaling_factor": 0.18215,
    });
    // SD 2.1 base ships this PNDM configuration; samplers are built from it.
    let scheduler = json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.42.1",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type_name(prediction),
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null,
    });
    let model_index = json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "_coreg_version": version,
        "feature_extractor": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    RandomModelConfigs {
        model_index,
        text_encoder,
        unet,
        vae,
        scheduler,
    }
}

/// The `prediction_type` value diffusers writes for `prediction`.
fn prediction_type_name(prediction: PredictionType) -> &'static str {
    match prediction {
        PredictionType::Epsilon => "epsilon",
        PredictionType::VPrediction => "v_prediction",
        PredictionType::Sample => "sample",
    }
}

/// Writes a randomly initialized model of `size` to `out` (which must not exist or be
/// empty), seeded so the same seed gives the same weights.
pub fn write_random_model(
    out: &Path,
    size: ModelSize,
    prediction: PredictionType,
    seed: i64,
) -> Result<()> {
    if out.exists()
        && out
            .read_dir()
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_some()
    {
        return Err(Error::InvalidInput(format!(
            "{} is not empty; refusing to overwrite a model folder",
            out.display()
        )));
    }
    let cfg = configs(size, prediction);
    tch::manual_seed(seed);

    let text_config: ClipTextConfig = parse(&cfg.text_encoder)?;
    write_component(out, "text_encoder", "model", &cfg.text_encoder, |p| {
        ClipTextTransformer::new(p, &text_config);
    })?;
    let unet_config: UNetConfig = parse(&cfg.unet)?;
    write_component(out, "unet", "diffusion_pytorch_model", &cfg.unet, |p| {
        UNet2DConditionModel::new(p, &unet_config);
    })?;
    let vae_config: VaeConfig = parse(&cfg.vae)?;
    write_component(out, "vae", "diffusion_pytorch_model", &cfg.vae, |p| {
        AutoencoderKl::new(p, &vae_config);
    })?;
    write_json(&out.join("scheduler/scheduler_config.json"), &cfg.scheduler)?;
    write_tokenizer_files(&out.join("tokenizer"))?;
    write_json(&out.join("model_index.json"), &cfg.model_index)
}

fn parse<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T> {
    serde_json::from_value(value.clone())
        .map_err(|e| Error::InvalidInput(format!("built-in configuration is invalid: {e}")))
}

fn write_component(
    out: &Path,
    folder: &str,
    stem: &str,
    config: &Value,
    build: impl FnOnce(tch::nn::Path),
) -> Result<()> {
    let vars = VarStore::new(Device::Cpu);
    build(vars.root());
    let dir = out.join(folder);
    write_json(&dir.join("config.json"), config)?;
    let path = dir.join(format!("{stem}.safetensors"));
    vars.save(&path)
        .map_err(|e| Error::weights(&path, format!("writing weights: {e}")))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let dir = path.parent().expect("component files live in a folder");
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}
