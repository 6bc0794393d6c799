//! The base Stable Diffusion 2.1 model a service holds: loaded once, with an untouched
//! copy of the U-Net's weights, so that neither one trainer job's stage-2 fine-tuning
//! nor one sampler concept's U-Net delta ever leaks into the next.

use std::path::Path;

use crate::artifact::unet_delta::{self, Parameters};
use crate::artifact::UNetDelta;
use crate::model::clip::ClipTextTransformer;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKl;
use crate::model::{Component, LoadOptions, ModelFolder};
use crate::schedule::NoiseSchedule;
use crate::Result;
use tch::{Device, Kind, Tensor};

pub struct BaseModel {
    pub folder: ModelFolder,
    /// The base vocabulary; each job clones it and adds its own placeholder.
    pub tokenizer: ClipTokenizer,
    pub text_encoder: Component<ClipTextTransformer>,
    pub unet: Component<UNet2DConditionModel>,
    pub vae: Component<AutoencoderKl>,
    pub schedule: NoiseSchedule,
    pub device: Device,
    /// The U-Net's base weights on the CPU: the reference every concept's delta is
    /// taken against, and what [`BaseModel::restore_unet`] puts back.
    base_unet: Parameters,
    unet_modified: bool,
}

/// `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> std::result::Result<Device, String> {
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => Err(format!("{other:?} is not auto, cpu, cuda or cuda:N")),
        },
    }
}

impl BaseModel {
    /// Loads every component in fp32 (stage 2 trains fp32 master weights; mixed
    /// precision casts per pass) and freezes them.
    pub fn load(path: &Path, device: Device, variant: Option<String>) -> Result<Self> {
        if let Device::Cuda(n) = device {
            if !tch::Cuda::is_available() || n >= tch::Cuda::device_count() as usize {
                return Err(crate::Error::InvalidInput(format!(
                    "CUDA device {n} is not available on this machine"
                )));
            }
        }
        let folder = ModelFolder::open(path)?;
        let opts = LoadOptions {
            device,
            kind: Kind::Float,
            variant,
        };
        let tokenizer = folder.tokenizer()?;
        let text_encoder = folder.load_text_encoder(&opts)?;
        let unet = folder.load_unet(&opts)?;
        let vae = folder.load_vae(&opts)?;
        let schedule = NoiseSchedule::new(&folder.scheduler)?;
        let base_unet = unet_delta::snapshot(&unet.vars, Device::Cpu)?;
        Ok(BaseModel {
            folder,
            tokenizer,
            text_encoder,
            unet,
            vae,
            schedule,
            device,
            base_unet,
            unet_modified: false,
        })
    }

    /// One denoising pass at the smallest size, so that the first job (and, for the
    /// service, readiness) does not pay for libtorch's lazy initialization.
    pub fn warm_up(&self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let channels = self.unet.model.in_channels();
        let latents = Tensor::zeros([1, channels, 8, 8], (Kind::Float, self.device));
        let context = self
            .text_encoder
            .model
            .forward(&Tensor::zeros([1, 77], (Kind::Int64, self.device)));
        let t = Tensor::from(1i64);
        self.unet.model.check_inputs(&latents, &t, &context)?;
        let out = self.unet.model.forward(&latents, &t, &context);
        if out.isfinite().all().int64_value(&[]) == 0 {
            return Err(crate::Error::InvalidInput(
                "the base U-Net's warm-up output is not finite".into(),
            ));
        }
        Ok(())
    }

    pub fn base_unet(&self) -> &Parameters {
        &self.base_unet
    }

    /// Says that a job is about to train `unet`; [`BaseModel::restore_unet`] then
    /// puts the base weights back.
    pub fn mark_unet_trained(&mut self) {
        self.unet_modified = true;
    }

    /// Sets the U-Net to the base weights plus a concept's `delta` (frozen). Every
    /// weight is rewritten from the untouched base copy, so any number of switches
    /// between concepts leaves no drift; [`BaseModel::restore_unet`] undoes it.
    pub fn use_unet_delta(&mut self, delta: &UNetDelta) -> Result<()> {
        self.unet_modified = true;
        delta.apply(&self.base_unet, &mut self.unet.vars)?;
        self.unet.vars.freeze();
        Ok(())
    }

    /// Puts the base weights back (frozen) if a job trained them.
    pub fn restore_unet(&mut self) -> Result<()> {
        if self.unet_modified {
            UNetDelta::empty().apply(&self.base_unet, &mut self.unet.vars)?;
            self.unet.vars.freeze();
            self.unet.model.set_gradient_checkpointing(false);
            self.unet_modified = false;
        }
        Ok(())
    }
}
