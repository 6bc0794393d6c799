//! A Stable Diffusion model folder in diffusers layout: its configuration files, read
//! and validated up front, and its weights loaded component by component onto the
//! device and precision the caller asks for.

use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Kind};

use crate::config_json::read_json;
use crate::model::clip::ClipTextTransformer;
use crate::model::config::{ClipTextConfig, ModelIndex, UNetConfig, VaeConfig};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKl;
use crate::model::weights;
use crate::schedule::SchedulerConfig;
use crate::{Error, Result};

/// Where and how to put a component's weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// The precision the weights are converted to, whatever the file holds.
    pub kind: Kind,
    /// A weights variant such as `fp16` (`*.fp16.safetensors`); `None` takes the plain
    /// file, or the fp16 one when it is the only one present.
    pub variant: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            variant: None,
        }
    }
}

/// A module together with the variables it was built on. Keeping the `VarStore` lets
/// a caller train the weights (stage 2) or copy them out (artifacts).
pub struct Component<M> {
    pub vars: VarStore,
    pub model: M,
}

/// The configuration of every component of a model folder.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    pub root: PathBuf,
    pub index: ModelIndex,
    pub text_encoder: ClipTextConfig,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
}

impl ModelFolder {
    /// Reads and validates every configuration file; no weights are touched yet.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(Error::io(
                &root,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
            ));
        }
        let index_path = root.join("model_index.json");
        let index: ModelIndex = read_json(&index_path)?;
        let expect = |key: &str, (_, class): &(String, String), want: &str| {
            if class == want {
                Ok(())
            } else {
                Err(Error::config(
                    &index_path,
                    key,
                    format!("expected {want}, found {class:?}"),
                ))
            }
        };
        expect("unet", &index.unet, "UNet2DConditionModel")?;
        expect("vae", &index.vae, "AutoencoderKL")?;
        expect("text_encoder", &index.text_encoder, "CLIPTextModel")?;

        let text_path = root.join("text_encoder/config.json");
        let text_encoder: ClipTextConfig = read_json(&text_path)?;
        text_encoder.validate(&text_path)?;
        let unet_path = root.join("unet/config.json");
        let unet: UNetConfig = read_json(&unet_path)?;
        unet.validate(&unet_path)?;
        let vae_path = root.join("vae/config.json");
        let vae: VaeConfig = read_json(&vae_path)?;
        vae.validate(&vae_path)?;
        if unet.cross_attention_dim != text_encoder.hidden_size {
            return Err(Error::config(
                unet_path,
                "cross_attention_dim",
                format!(
                    "{} does not match the text encoder's hidden_size {}",
                    unet.cross_attention_dim, text_encoder.hidden_size
                ),
            ));
        }
        if unet.in_channels != vae.latent_channels {
            return Err(Error::config(
                unet_path,
                "in_channels",
                format!(
                    "{} does not match the VAE's latent_channels {}",
                    unet.in_channels, vae.latent_channels
                ),
            ));
        }
        let scheduler = SchedulerConfig::read(&root.join("scheduler/scheduler_config.json"))?;
        Ok(ModelFolder {
            root,
            index,
            text_encoder,
            unet,
            vae,
            scheduler,
        })
    }

    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        ClipTokenizer::from_model_dir(&self.root)
    }

    pub fn load_text_encoder(&self, opts: &LoadOptions) -> Result<Component<ClipTextTransformer>> {
        load(
            &self.root.join("text_encoder"),
            "model",
            opts,
            |p| ClipTextTransformer::new(p, &self.text_encoder),
            crate::model::clip::weight_aliases,
        )
    }

    pub fn load_unet(&self, opts: &LoadOptions) -> Result<Component<UNet2DConditionModel>> {
        load(
            &self.root.join("unet"),
            "diffusion_pytorch_model",
            opts,
            |p| UNet2DConditionModel::new(p, &self.unet),
            |_| vec![],
        )
    }

    pub fn load_vae(&self, opts: &LoadOptions) -> Result<Component<AutoencoderKl>> {
        load(
            &self.root.join("vae"),
            "diffusion_pytorch_model",
            opts,
            |p| AutoencoderKl::new(p, &self.vae),
            weights::legacy_attention_names,
        )
    }
}

fn load<M>(
    dir: &Path,
    stem: &str,
    opts: &LoadOptions,
    build: impl FnOnce(tch::nn::Path) -> M,
    aliases: fn(&str) -> Vec<String>,
) -> Result<Component<M>> {
    let file = weights::component_file(dir, stem, opts.variant.as_deref())?;
    let mut vars = VarStore::new(opts.device);
    let model = build(vars.root());
    weights::load_into(&mut vars, &file, aliases)?;
    vars.set_kind(opts.kind);
    vars.freeze();
    Ok(Component { vars, model })
}
