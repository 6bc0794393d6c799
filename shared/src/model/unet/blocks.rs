//! The U-Net's stages: `CrossAttnDownBlock2D`/`DownBlock2D`,
//! `UNetMidBlock2DCrossAttn` and `CrossAttnUpBlock2D`/`UpBlock2D`. A block type without
//! cross-attention is the same block with no `attentions`.

use tch::nn::{self, Module};
use tch::Tensor;

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetSettings, Upsample2D};
use super::transformer::{CrossAttentionSettings, Transformer2DModel};

/// The cross-attention of a block: its head count and transformer depth.
#[derive(Debug, Clone, Copy)]
pub struct BlockAttention {
    pub heads: i64,
    pub transformer_layers: usize,
    pub settings: CrossAttentionSettings,
}

/// One resnet and, in cross-attention blocks, the transformer that follows it.
#[derive(Debug)]
struct Layer {
    resnet: ResnetBlock2D,
    attention: Option<Transformer2DModel>,
}

impl Layer {
    fn new(
        p: &nn::Path,
        i: usize,
        in_channels: i64,
        out_channels: i64,
        r: ResnetSettings,
        a: Option<BlockAttention>,
    ) -> Self {
        Self {
            resnet: ResnetBlock2D::new(p / "resnets" / i, in_channels, out_channels, r),
            attention: a.map(|a| {
                Transformer2DModel::new(
                    p / "attentions" / i,
                    out_channels,
                    a.heads,
                    a.transformer_layers,
                    a.settings,
                )
            }),
        }
    }

    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        record: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let xs = self.resnet.forward(xs, temb);
        match &self.attention {
            Some(attention) => attention.forward(&xs, context, record),
            None => xs,
        }
    }

    fn cross_attention_layers(&self) -> usize {
        self.attention
            .as_ref()
            .map_or(0, Transformer2DModel::cross_attention_layers)
    }
}

#[derive(Debug)]
pub struct DownBlock {
    layers: Vec<Layer>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// `downsample_padding`: `Some` adds `downsamplers.0` (all blocks but the last).
    pub fn new(
        p: nn::Path,
        in_channels: i64,
        out_channels: i64,
        num_layers: usize,
        resnet: ResnetSettings,
        attention: Option<BlockAttention>,
        downsample_padding: Option<i64>,
    ) -> Self {
        let layers = (0..num_layers)
            .map(|i| {
                let in_channels = if i == 0 { in_channels } else { out_channels };
                Layer::new(&p, i, in_channels, out_channels, resnet, attention)
            })
            .collect();
        let downsampler = downsample_padding
            .map(|padding| Downsample2D::new(&p / "downsamplers" / 0, out_channels, padding));
        Self {
            layers,
            downsampler,
        }
    }

    /// The states the block hands to the up path as skip connections: each layer's
    /// output, then the downsampled one. The last is also the block's output.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        mut record: Option<&mut Vec<Tensor>>,
    ) -> Vec<Tensor> {
        let mut outputs = Vec::with_capacity(self.layers.len() + 1);
        let mut xs = xs.shallow_clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, temb, context, record.as_deref_mut());
            outputs.push(xs.shallow_clone());
        }
        if let Some(downsampler) = &self.downsampler {
            outputs.push(downsampler.forward(&xs));
        }
        outputs
    }

    pub fn cross_attention_layers(&self) -> usize {
        self.layers.iter().map(Layer::cross_attention_layers).sum()
    }
}

/// `resnets.0`, then `attentions.0` and `resnets.1`.
#[derive(Debug)]
pub struct MidBlock {
    first: ResnetBlock2D,
    attention: Transformer2DModel,
    second: ResnetBlock2D,
}

impl MidBlock {
    pub fn new(
        p: nn::Path,
        channels: i64,
        resnet: ResnetSettings,
        attention: BlockAttention,
    ) -> Self {
        let a = attention;
        Self {
            first: ResnetBlock2D::new(&p / "resnets" / 0, channels, channels, resnet),
            attention: Transformer2DModel::new(
                &p / "attentions" / 0,
                channels,
                a.heads,
                a.transformer_layers,
                a.settings,
            ),
            second: ResnetBlock2D::new(&p / "resnets" / 1, channels, channels, resnet),
        }
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        record: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let xs = self.first.forward(xs, temb);
        let xs = self.attention.forward(&xs, context, record);
        self.second.forward(&xs, temb)
    }

    pub fn cross_attention_layers(&self) -> usize {
        self.attention.cross_attention_layers()
    }
}

#[derive(Debug)]
pub struct UpBlock {
    layers: Vec<Layer>,
    upsampler: Option<Upsample2D>,
}

/// The widths an up block joins: the previous up block's output (`prev`), the
/// deepest skip it consumes last (`skip`, the input of the mirrored down block) and
/// its own output (`out`).
#[derive(Debug, Clone, Copy)]
pub struct UpChannels {
    pub prev: i64,
    pub skip: i64,
    pub out: i64,
}

impl UpBlock {
    pub fn new(
        p: nn::Path,
        channels: UpChannels,
        num_layers: usize,
        resnet: ResnetSettings,
        attention: Option<BlockAttention>,
        add_upsample: bool,
    ) -> Self {
        let out = channels.out;
        let layers = (0..num_layers)
            .map(|i| {
                let skip = if i == num_layers - 1 {
                    channels.skip
                } else {
                    out
                };
                let input = if i == 0 { channels.prev } else { out };
                Layer::new(&p, i, input + skip, out, resnet, attention)
            })
            .collect();
        let upsampler = add_upsample.then(|| Upsample2D::new(&p / "upsamplers" / 0, out));
        Self { layers, upsampler }
    }

    /// How many skip connections the block consumes.
    pub fn skip_count(&self) -> usize {
        self.layers.len()
    }

    /// `skips` in the order the down path produced them; the block consumes them from
    /// the last, concatenating each on the channel axis. `upsample_to` is the spatial
    /// size of the skip the next block starts with (diffusers' `upsample_size`).
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        upsample_to: Option<[i64; 2]>,
        temb: &Tensor,
        context: &Tensor,
        mut record: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let mut xs = xs.shallow_clone();
        for (layer, skip) in self.layers.iter().zip(skips.iter().rev()) {
            let joined = Tensor::cat(&[&xs, skip], 1);
            xs = layer.forward(&joined, temb, context, record.as_deref_mut());
        }
        match &self.upsampler {
            Some(upsampler) => {
                let size = upsample_to.expect("an upsampling block is followed by more skips");
                upsampler.forward(&xs, size)
            }
            None => xs,
        }
    }

    pub fn cross_attention_layers(&self) -> usize {
        self.layers.iter().map(Layer::cross_attention_layers).sum()
    }
}
