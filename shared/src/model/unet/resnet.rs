//! diffusers' `ResnetBlock2D` (with the time embedding added between the two convs),
//! `Downsample2D` and `Upsample2D` as the SD U-Net uses them.

use tch::nn::{self, Module};
use tch::Tensor;

/// What every resnet of one U-Net shares.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    pub temb_channels: i64,
    pub groups: i64,
    pub eps: f64,
    /// The sum of shortcut and residual is divided by this (`mid_block_scale_factor`
    /// in the mid block, 1 elsewhere).
    pub output_scale_factor: f64,
}

#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: nn::Linear,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
    output_scale_factor: f64,
}

fn conv3x3(p: nn::Path, in_channels: i64, out_channels: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        padding: 1,
        ..Default::default()
    };
    nn::conv2d(p, in_channels, out_channels, 3, config)
}

impl ResnetBlock2D {
    pub fn new(p: nn::Path, in_channels: i64, out_channels: i64, s: ResnetSettings) -> Self {
        let norm = |p: nn::Path, channels| {
            let config = nn::GroupNormConfig {
                eps: s.eps,
                ..Default::default()
            };
            nn::group_norm(p, s.groups, channels, config)
        };
        let conv_shortcut = (in_channels != out_channels).then(|| {
            nn::conv2d(
                &p / "conv_shortcut",
                in_channels,
                out_channels,
                1,
                Default::default(),
            )
        });
        Self {
            norm1: norm(&p / "norm1", in_channels),
            conv1: conv3x3(&p / "conv1", in_channels, out_channels),
            time_emb_proj: nn::linear(
                &p / "time_emb_proj",
                s.temb_channels,
                out_channels,
                Default::default(),
            ),
            norm2: norm(&p / "norm2", out_channels),
            conv2: conv3x3(&p / "conv2", out_channels, out_channels),
            conv_shortcut,
            output_scale_factor: s.output_scale_factor,
        }
    }

    /// `xs` [B, C, H, W]; `temb` [B, temb_channels], the time embedding before SiLU
    /// (every resnet applies its own, as diffusers does).
    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> Tensor {
        let hs = self.conv1.forward(&self.norm1.forward(xs).silu());
        let time = self
            .time_emb_proj
            .forward(&temb.silu())
            .unsqueeze(-1)
            .unsqueeze(-1);
        let hs = self.norm2.forward(&(hs + time)).silu();
        let hs = self.conv2.forward(&hs);
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs),
            None => xs.shallow_clone(),
        };
        let out = shortcut + hs;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `downsamplers.0`: a stride-2 3×3 convolution.
#[derive(Debug)]
pub struct Downsample2D {
    conv: nn::Conv2D,
    asymmetric_pad: bool,
}

impl Downsample2D {
    /// `padding` is the config's `downsample_padding` (1 for SD).
    pub fn new(p: nn::Path, channels: i64, padding: i64) -> Self {
        let config = nn::ConvConfig {
            stride: 2,
            padding,
            ..Default::default()
        };
        Self {
            conv: nn::conv2d(&p / "conv", channels, channels, 3, config),
            // diffusers pads right and bottom by one when the conv itself has no padding.
            asymmetric_pad: padding == 0,
        }
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Tensor {
        if self.asymmetric_pad {
            self.conv.forward(&xs.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(xs)
        }
    }
}

/// `upsamplers.0`: nearest-neighbour upsampling then a 3×3 convolution.
#[derive(Debug)]
pub struct Upsample2D {
    conv: nn::Conv2D,
}

impl Upsample2D {
    pub fn new(p: nn::Path, channels: i64) -> Self {
        Self {
            conv: conv3x3(&p / "conv", channels, channels),
        }
    }

    /// Upsamples to `size` (the spatial size of the skip connection that comes next),
    /// like diffusers' `upsample_size`: for even sizes this is exactly the 2× nearest
    /// upsampling, and it keeps latents whose sides are not multiples of 8 working.
    pub fn forward(&self, xs: &Tensor, size: [i64; 2]) -> Tensor {
        self.conv.forward(&xs.upsample_nearest2d(size, None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    fn settings() -> ResnetSettings {
        ResnetSettings {
            temb_channels: 12,
            groups: 2,
            eps: 1e-5,
            output_scale_factor: 1.0,
        }
    }

    #[test]
    fn resnet_names_shapes_and_shortcut() {
        let vs = VarStore::new(Device::Cpu);
        let changing = ResnetBlock2D::new(vs.root() / "a", 4, 6, settings());
        let keeping = ResnetBlock2D::new(vs.root() / "b", 6, 6, settings());
        let vars = vs.variables();
        assert_eq!(vars["a.conv_shortcut.weight"].size(), vec![6, 4, 1, 1]);
        assert!(!vars.contains_key("b.conv_shortcut.weight"));
        assert_eq!(vars["a.time_emb_proj.weight"].size(), vec![6, 12]);
        assert_eq!(vars["a.norm1.weight"].size(), vec![4]);
        assert_eq!(vars["a.norm2.weight"].size(), vec![6]);

        let xs = Tensor::randn([3, 4, 5, 7], (Kind::Float, Device::Cpu));
        let temb = Tensor::randn([3, 12], (Kind::Float, Device::Cpu));
        let hs = changing.forward(&xs, &temb);
        assert_eq!(hs.size(), vec![3, 6, 5, 7]);
        assert_eq!(keeping.forward(&hs, &temb).size(), vec![3, 6, 5, 7]);
    }

    #[test]
    fn identity_residual_when_the_branch_is_zero() {
        let vs = VarStore::new(Device::Cpu);
        let block = ResnetBlock2D::new(
            vs.root(),
            4,
            4,
            ResnetSettings {
                output_scale_factor: 2.0,
                ..settings()
            },
        );
        tch::no_grad(|| {
            for (name, mut var) in vs.variables() {
                if name.starts_with("conv2") {
                    let _ = var.zero_();
                }
            }
        });
        let xs = Tensor::randn([1, 4, 3, 3], (Kind::Float, Device::Cpu));
        let temb = Tensor::randn([1, 12], (Kind::Float, Device::Cpu));
        let out = block.forward(&xs, &temb);
        assert!((out - &xs / 2.0).abs().max().double_value(&[]) < 1e-7);
    }

    #[test]
    fn downsample_halves_rounding_up_and_upsample_meets_the_skip_size() {
        let vs = VarStore::new(Device::Cpu);
        let down = Downsample2D::new(vs.root() / "down", 4, 1);
        let down_unpadded = Downsample2D::new(vs.root() / "down0", 4, 0);
        let up = Upsample2D::new(vs.root() / "up", 4);
        let xs = Tensor::randn([2, 4, 5, 8], (Kind::Float, Device::Cpu));
        assert_eq!(down.forward(&xs).size(), vec![2, 4, 3, 4]);
        assert_eq!(down_unpadded.forward(&xs).size(), vec![2, 4, 2, 4]);
        assert_eq!(
            up.forward(&down.forward(&xs), [5, 8]).size(),
            vec![2, 4, 5, 8]
        );
        assert!(vs.variables().contains_key("up.conv.weight"));
        assert!(vs.variables().contains_key("down.conv.bias"));
    }

    #[test]
    fn explicit_size_equals_doubling() {
        let xs = Tensor::randn([1, 2, 3, 4], (Kind::Float, Device::Cpu));
        let by_size = xs.upsample_nearest2d([6, 8], None, None);
        let by_scale = xs.upsample_nearest2d([6, 8], 2.0, 2.0);
        assert!((by_size - by_scale).abs().max().double_value(&[]) == 0.0);
    }
}
