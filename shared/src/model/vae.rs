//! The VAE: diffusers' `AutoencoderKL`, mapping images in [−1, 1] to the latent space
//! the U-Net works in and back.
//!
//! Variable names are diffusers' current ones (`…attentions.0.to_q.weight`); older
//! checkpoints with `query/key/value/proj_attn` load through
//! [`crate::model::weights::legacy_attention_names`]. Every normalization uses ε = 1e-6, which
//! diffusers hard-codes for the VAE whatever the config says.

use tch::nn::{self, Module};
use tch::Tensor;

use crate::model::config::VaeConfig;

/// Pixels per latent along each side: SD's VAE halves the resolution three times.
pub const VAE_SCALE_FACTOR: u32 = 8;

const NORM_EPS: f64 = 1e-6;

fn group_norm(p: nn::Path, groups: i64, channels: i64) -> nn::GroupNorm {
    let config = nn::GroupNormConfig {
        eps: NORM_EPS,
        ..Default::default()
    };
    nn::group_norm(p, groups, channels, config)
}

fn conv(p: nn::Path, c_in: i64, c_out: i64, kernel: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding,
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, kernel, config)
}

/// diffusers' `ResnetBlock2D` without a time embedding.
#[derive(Debug)]
struct ResnetBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock {
    fn new(p: nn::Path, c_in: i64, c_out: i64, groups: i64) -> Self {
        Self {
            norm1: group_norm(&p / "norm1", groups, c_in),
            conv1: conv(&p / "conv1", c_in, c_out, 3, 1, 1),
            norm2: group_norm(&p / "norm2", groups, c_out),
            conv2: conv(&p / "conv2", c_out, c_out, 3, 1, 1),
            conv_shortcut: (c_in != c_out)
                .then(|| conv(&p / "conv_shortcut", c_in, c_out, 1, 1, 0)),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let hs = self.conv1.forward(&self.norm1.forward(xs).silu());
        let hs = self.conv2.forward(&self.norm2.forward(&hs).silu());
        match &self.conv_shortcut {
            Some(shortcut) => shortcut.forward(xs) + hs,
            None => xs + hs,
        }
    }
}

/// The mid block's self-attention over all pixels: diffusers' `Attention` with a
/// group norm, a single head as wide as the channels, and a residual connection.
#[derive(Debug)]
struct SpatialSelfAttention {
    group_norm: nn::GroupNorm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
}

impl SpatialSelfAttention {
    fn new(p: nn::Path, channels: i64, groups: i64) -> Self {
        let linear = |p: nn::Path| nn::linear(p, channels, channels, Default::default());
        Self {
            group_norm: group_norm(&p / "group_norm", groups, channels),
            to_q: linear(&p / "to_q"),
            to_k: linear(&p / "to_k"),
            to_v: linear(&p / "to_v"),
            to_out: linear(&p / "to_out" / 0),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, c, h, w) = xs
            .size4()
            .expect("feature maps are [batch, channels, height, width]");
        let tokens = self
            .group_norm
            .forward(xs)
            .view([b, c, h * w])
            .transpose(1, 2);
        let head = |proj: &nn::Linear| proj.forward(&tokens).unsqueeze(1);
        let attended = Tensor::scaled_dot_product_attention(
            &head(&self.to_q),
            &head(&self.to_k),
            &head(&self.to_v),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        )
        .squeeze_dim(1);
        let out = self
            .to_out
            .forward(&attended)
            .transpose(1, 2)
            .reshape([b, c, h, w]);
        out + xs
    }
}

/// `UNetMidBlock2D` as the VAE uses it: resnet, (attention), resnet.
#[derive(Debug)]
struct MidBlock {
    resnets: [ResnetBlock; 2],
    attention: Option<SpatialSelfAttention>,
}

impl MidBlock {
    fn new(p: nn::Path, channels: i64, groups: i64, add_attention: bool) -> Self {
        let resnets = &p / "resnets";
        Self {
            resnets: [0, 1].map(|i| ResnetBlock::new(&resnets / i, channels, channels, groups)),
            attention: add_attention
                .then(|| SpatialSelfAttention::new(&p / "attentions" / 0, channels, groups)),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self.resnets[0].forward(xs);
        if let Some(attention) = &self.attention {
            xs = attention.forward(&xs);
        }
        self.resnets[1].forward(&xs)
    }
}

/// A `DownEncoderBlock2D` or `UpDecoderBlock2D`: resnets, then an optional resampler.
#[derive(Debug)]
struct ResnetStage {
    resnets: Vec<ResnetBlock>,
    resample: Option<Resample>,
}

#[derive(Debug)]
enum Resample {
    /// Stride-2 convolution after padding right and bottom by one: diffusers'
    /// `Downsample2D` with `padding=0`, as SD's VAE was trained.
    Down(nn::Conv2D),
    /// Nearest-neighbour ×2, then a 3×3 convolution.
    Up(nn::Conv2D),
}

impl ResnetStage {
    fn new(
        p: nn::Path,
        c_in: i64,
        c_out: i64,
        layers: usize,
        groups: i64,
        resample: Option<bool>,
    ) -> Self {
        let resnets = &p / "resnets";
        let resample = resample.map(|down| {
            if down {
                Resample::Down(conv(
                    &p / "downsamplers" / 0 / "conv",
                    c_out,
                    c_out,
                    3,
                    2,
                    0,
                ))
            } else {
                Resample::Up(conv(&p / "upsamplers" / 0 / "conv", c_out, c_out, 3, 1, 1))
            }
        });
        Self {
            resnets: (0..layers)
                .map(|i| {
                    ResnetBlock::new(
                        &resnets / i,
                        if i == 0 { c_in } else { c_out },
                        c_out,
                        groups,
                    )
                })
                .collect(),
            resample,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self.resnets[0].forward(xs);
        for resnet in &self.resnets[1..] {
            xs = resnet.forward(&xs);
        }
        match &self.resample {
            None => xs,
            Some(Resample::Down(conv)) => conv.forward(&xs.constant_pad_nd([0, 1, 0, 1])),
            Some(Resample::Up(conv)) => {
                let (_, _, h, w) = xs.size4().expect("feature maps are 4-d");
                conv.forward(&xs.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0))
            }
        }
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: nn::Conv2D,
    down_blocks: Vec<ResnetStage>,
    mid_block: MidBlock,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    fn new(p: nn::Path, cfg: &VaeConfig) -> Self {
        let channels: Vec<i64> = cfg.block_out_channels.iter().map(|&c| c as i64).collect();
        let groups = cfg.norm_num_groups as i64;
        let last = *channels.last().expect("validated: at least one block");
        let blocks = &p / "down_blocks";
        let down_blocks = channels
            .iter()
            .enumerate()
            .map(|(i, &c_out)| {
                let c_in = channels[i.saturating_sub(1)];
                let is_last = i + 1 == channels.len();
                ResnetStage::new(
                    &blocks / i,
                    c_in,
                    c_out,
                    cfg.layers_per_block,
                    groups,
                    (!is_last).then_some(true),
                )
            })
            .collect();
        Self {
            conv_in: conv(&p / "conv_in", cfg.in_channels as i64, channels[0], 3, 1, 1),
            down_blocks,
            mid_block: MidBlock::new(&p / "mid_block", last, groups, cfg.mid_block_add_attention),
            conv_norm_out: group_norm(&p / "conv_norm_out", groups, last),
            conv_out: conv(
                &p / "conv_out",
                last,
                2 * cfg.latent_channels as i64,
                3,
                1,
                1,
            ),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self.conv_in.forward(xs);
        for block in &self.down_blocks {
            xs = block.forward(&xs);
        }
        let xs = self.mid_block.forward(&xs);
        self.conv_out
            .forward(&self.conv_norm_out.forward(&xs).silu())
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: nn::Conv2D,
    mid_block: MidBlock,
    up_blocks: Vec<ResnetStage>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    fn new(p: nn::Path, cfg: &VaeConfig) -> Self {
        let reversed: Vec<i64> = cfg
            .block_out_channels
            .iter()
            .rev()
            .map(|&c| c as i64)
            .collect();
        let groups = cfg.norm_num_groups as i64;
        let blocks = &p / "up_blocks";
        let up_blocks = reversed
            .iter()
            .enumerate()
            .map(|(i, &c_out)| {
                let c_in = reversed[i.saturating_sub(1)];
                let is_last = i + 1 == reversed.len();
                // diffusers gives each decoder stage one resnet more than the encoder's.
                ResnetStage::new(
                    &blocks / i,
                    c_in,
                    c_out,
                    cfg.layers_per_block + 1,
                    groups,
                    (!is_last).then_some(false),
                )
            })
            .collect();
        let first = reversed[reversed.len() - 1];
        Self {
            conv_in: conv(
                &p / "conv_in",
                cfg.latent_channels as i64,
                reversed[0],
                3,
                1,
                1,
            ),
            mid_block: MidBlock::new(
                &p / "mid_block",
                reversed[0],
                groups,
                cfg.mid_block_add_attention,
            ),
            up_blocks,
            conv_norm_out: group_norm(&p / "conv_norm_out", groups, first),
            conv_out: conv(&p / "conv_out", first, cfg.out_channels as i64, 3, 1, 1),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut xs = self.mid_block.forward(&self.conv_in.forward(xs));
        for block in &self.up_blocks {
            xs = block.forward(&xs);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&xs).silu())
    }
}

/// The posterior q(z | x) = N(mean, exp(logvar)) the encoder predicts per latent
/// element, with diffusers' clamp of `logvar` to [−30, 20].
#[derive(Debug)]
pub struct DiagonalGaussian {
    mean: Tensor,
    logvar: Tensor,
    std: Tensor,
}

impl DiagonalGaussian {
    /// Splits moments [B, 2C, H, W] into mean and log-variance along channels.
    pub fn from_moments(moments: &Tensor) -> Self {
        let halves = moments.chunk(2, 1);
        let logvar = halves[1].clamp(-30.0, 20.0);
        Self {
            mean: halves[0].shallow_clone(),
            std: (&logvar * 0.5).exp(),
            logvar,
        }
    }

    pub fn mean(&self) -> &Tensor {
        &self.mean
    }

    /// The log-variance, after the clamp.
    pub fn logvar(&self) -> &Tensor {
        &self.logvar
    }

    pub fn std(&self) -> &Tensor {
        &self.std
    }

    /// mean + std · noise, with `noise` drawn by the caller (standard normal, the
    /// mean's shape), so that its generator decides reproducibility.
    pub fn sample(&self, noise: &Tensor) -> Tensor {
        &self.mean + &self.std * noise.to_kind(self.mean.kind())
    }

    /// A sample with noise from libtorch's global generator (`tch::manual_seed`).
    pub fn sample_randn(&self) -> Tensor {
        self.sample(&self.mean.randn_like())
    }

    /// The distribution of `factor` · z, e.g. of latents scaled for the U-Net.
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            mean: &self.mean * factor,
            logvar: &self.logvar + 2.0 * factor.abs().ln(),
            std: &self.std * factor.abs(),
        }
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug)]
pub struct AutoencoderKl {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<nn::Conv2D>,
    post_quant_conv: Option<nn::Conv2D>,
    scaling_factor: f64,
}

impl AutoencoderKl {
    /// Declares the VAE's variables under `p`; `cfg` must have passed
    /// [`VaeConfig::validate`].
    pub fn new(p: nn::Path, cfg: &VaeConfig) -> Self {
        let moments = 2 * cfg.latent_channels as i64;
        let latents = cfg.latent_channels as i64;
        Self {
            encoder: Encoder::new(&p / "encoder", cfg),
            decoder: Decoder::new(&p / "decoder", cfg),
            quant_conv: cfg
                .use_quant_conv
                .then(|| conv(&p / "quant_conv", moments, moments, 1, 1, 0)),
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| conv(&p / "post_quant_conv", latents, latents, 1, 1, 0)),
            scaling_factor: cfg.scaling_factor,
        }
    }

    /// The factor (0.18215 for SD) between raw latents and the U-Net's latents.
    pub fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    /// The posterior of images [B, C, H, W] in [−1, 1] (raw, unscaled latents).
    pub fn encode(&self, pixels: &Tensor) -> DiagonalGaussian {
        let moments = self.encoder.forward(pixels);
        let moments = match &self.quant_conv {
            Some(quant_conv) => quant_conv.forward(&moments),
            None => moments,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// The posterior of the U-Net's latents: [`AutoencoderKl::encode`] times
    /// `scaling_factor`.
    pub fn encode_scaled(&self, pixels: &Tensor) -> DiagonalGaussian {
        self.encode(pixels).scaled(self.scaling_factor)
    }

    /// Images (about [−1, 1]) of raw latents [B, latent_channels, h, w].
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let latents = match &self.post_quant_conv {
            Some(post_quant_conv) => post_quant_conv.forward(latents),
            None => latents.shallow_clone(),
        };
        self.decoder.forward(&latents)
    }

    /// Images of the U-Net's latents: divides by `scaling_factor`, then decodes.
    pub fn decode_scaled(&self, latents: &Tensor) -> Tensor {
        self.decode(&(latents / self.scaling_factor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    fn tiny_config() -> VaeConfig {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": [32, 32, 64, 64],
            "down_block_types": vec!["DownEncoderBlock2D"; 4],
            "up_block_types": vec!["UpDecoderBlock2D"; 4],
            "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 8, "sample_size": 64
        }))
        .unwrap()
    }

    #[test]
    fn names_and_shapes_follow_diffusers() {
        let vs = VarStore::new(Device::Cpu);
        let vae = AutoencoderKl::new(vs.root(), &tiny_config());
        let vars = vs.variables();
        for (name, shape) in [
            ("encoder.conv_in.weight", vec![32, 3, 3, 3]),
            (
                "encoder.down_blocks.1.resnets.0.conv1.weight",
                vec![32, 32, 3, 3],
            ),
            (
                "encoder.down_blocks.2.resnets.0.conv_shortcut.weight",
                vec![64, 32, 1, 1],
            ),
            ("encoder.down_blocks.2.downsamplers.0.conv.bias", vec![64]),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                vec![64, 64],
            ),
            ("encoder.mid_block.attentions.0.group_norm.weight", vec![64]),
            ("encoder.conv_out.weight", vec![8, 64, 3, 3]),
            ("quant_conv.weight", vec![8, 8, 1, 1]),
            ("post_quant_conv.weight", vec![4, 4, 1, 1]),
            ("decoder.up_blocks.0.resnets.2.norm2.weight", vec![64]),
            (
                "decoder.up_blocks.2.resnets.0.conv_shortcut.weight",
                vec![32, 64, 1, 1],
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                vec![32, 32, 3, 3],
            ),
            ("decoder.conv_out.weight", vec![3, 32, 3, 3]),
        ] {
            assert_eq!(vars.get(name).map(Tensor::size), Some(shape), "{name}");
        }
        assert!(!vars.contains_key("encoder.down_blocks.3.downsamplers.0.conv.weight"));
        assert!(!vars.contains_key("decoder.up_blocks.3.upsamplers.0.conv.weight"));

        let pixels = Tensor::zeros([1, 3, 16, 16], (Kind::Float, Device::Cpu));
        let posterior = vae.encode(&pixels);
        assert_eq!(posterior.mean().size(), [1, 4, 2, 2]);
        assert_eq!(vae.decode(posterior.mean()).size(), [1, 3, 16, 16]);
    }

    #[test]
    fn posterior_clamps_logvar_and_scales() {
        let moments =
            Tensor::from_slice(&[1.0f32, -2.0, -40.0, 2f32.ln() * 2.0]).view([1, 4, 1, 1]);
        let q = DiagonalGaussian::from_moments(&moments);
        let values = |t: &Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        assert_eq!(values(&q.logvar)[0], -30.0);
        assert!((values(&q.std)[1] - 2.0).abs() < 1e-6);
        let noise = Tensor::from_slice(&[1.0f32, 1.0]).view([1, 2, 1, 1]);
        let z = values(&q.sample(&noise));
        assert!(
            (z[0] - (1.0 + (-15f32).exp())).abs() < 1e-6 && (z[1] - 0.0).abs() < 1e-6,
            "{z:?}"
        );
        let scaled = q.scaled(0.5);
        let zs = values(&scaled.sample(&noise));
        assert!((zs[0] - z[0] * 0.5).abs() < 1e-6 && (zs[1] - z[1] * 0.5).abs() < 1e-6);
        assert!((values(&scaled.logvar)[1] - 0.0).abs() < 1e-6);
    }
}
