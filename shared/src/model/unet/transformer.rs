//! diffusers' `Transformer2DModel` over continuous inputs and its
//! `BasicTransformerBlock`: self-attention, cross-attention on the text encoder's
//! states, GEGLU feed-forward, each pre-normed with a residual.

use tch::nn::{self, Module};
use tch::Tensor;

use crate::model::attention::Attention;

/// What the cross-attention layers of one U-Net share.
#[derive(Debug, Clone, Copy)]
pub struct CrossAttentionSettings {
    pub cross_attention_dim: i64,
    pub groups: i64,
    pub use_linear_projection: bool,
}

/// `ff`: `net.0` is GEGLU (`proj` to twice the inner width, the second half gating the
/// first through exact GELU), `net.1` dropout (absent: inference and training use 0),
/// `net.2` the output projection.
#[derive(Debug)]
struct FeedForward {
    proj: nn::Linear,
    out: nn::Linear,
}

impl FeedForward {
    fn new(p: nn::Path, dim: i64) -> Self {
        let inner = 4 * dim;
        Self {
            proj: nn::linear(&p / "net" / 0 / "proj", dim, 2 * inner, Default::default()),
            out: nn::linear(&p / "net" / 2, inner, dim, Default::default()),
        }
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let halves = self.proj.forward(xs).chunk(2, -1);
        self.out.forward(&(&halves[0] * halves[1].gelu("none")))
    }
}

#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(p: nn::Path, dim: i64, heads: i64, head_dim: i64, cross_attention_dim: i64) -> Self {
        // Transformer2DModel's own default norm_eps; the U-Net does not pass its own.
        let norm = |p: nn::Path| {
            let config = nn::LayerNormConfig {
                eps: 1e-5,
                ..Default::default()
            };
            nn::layer_norm(p, vec![dim], config)
        };
        Self {
            norm1: norm(&p / "norm1"),
            attn1: Attention::new(&p / "attn1", dim, None, heads, head_dim),
            norm2: norm(&p / "norm2"),
            attn2: Attention::new(
                &p / "attn2",
                dim,
                Some(cross_attention_dim),
                heads,
                head_dim,
            ),
            norm3: norm(&p / "norm3"),
            ff: FeedForward::new(&p / "ff", dim),
        }
    }

    fn forward(&self, xs: &Tensor, context: &Tensor, record: Option<&mut Vec<Tensor>>) -> Tensor {
        let xs = self.attn1.forward(&self.norm1.forward(xs), None) + xs;
        let normed = self.norm2.forward(&xs);
        let cross = match record {
            Some(recorded) => {
                let (out, per_token) = self.attn2.forward_recording(&normed, Some(context));
                recorded.push(per_token);
                out
            }
            None => self.attn2.forward(&normed, Some(context)),
        };
        let xs = cross + xs;
        self.ff.forward(&self.norm3.forward(&xs)) + xs
    }
}

/// `proj_in`/`proj_out`: linear layers over tokens (SD 2.x) or 1×1 convolutions over
/// the feature map (SD 1.x).
#[derive(Debug)]
enum Projection {
    Linear(nn::Linear),
    Conv(nn::Conv2D),
}

impl Projection {
    fn new(p: nn::Path, linear: bool, in_dim: i64, out_dim: i64) -> Self {
        if linear {
            Projection::Linear(nn::linear(p, in_dim, out_dim, Default::default()))
        } else {
            Projection::Conv(nn::conv2d(p, in_dim, out_dim, 1, Default::default()))
        }
    }
}

/// [B, C, H, W] → [B, H·W, C].
fn to_tokens(xs: &Tensor) -> Tensor {
    let (b, c, h, w) = xs
        .size4()
        .expect("feature map is [batch, channels, height, width]");
    xs.permute([0, 2, 3, 1]).reshape([b, h * w, c])
}

/// [B, H·W, C] → [B, C, H, W].
fn to_map(xs: &Tensor, h: i64, w: i64) -> Tensor {
    let (b, _, c) = xs.size3().expect("tokens are [batch, tokens, channels]");
    xs.reshape([b, h, w, c]).permute([0, 3, 1, 2]).contiguous()
}

#[derive(Debug)]
pub struct Transformer2DModel {
    norm: nn::GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    /// `heads` from the config's per-block head count; each head is
    /// `channels / heads` wide, as diffusers' blocks build it.
    pub fn new(
        p: nn::Path,
        channels: i64,
        heads: i64,
        layers: usize,
        s: CrossAttentionSettings,
    ) -> Self {
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        let norm_config = nn::GroupNormConfig {
            eps: 1e-6,
            ..Default::default()
        };
        let blocks = &p / "transformer_blocks";
        Self {
            norm: nn::group_norm(&p / "norm", s.groups, channels, norm_config),
            proj_in: Projection::new(&p / "proj_in", s.use_linear_projection, channels, inner),
            transformer_blocks: (0..layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        &blocks / i,
                        inner,
                        heads,
                        head_dim,
                        s.cross_attention_dim,
                    )
                })
                .collect(),
            proj_out: Projection::new(&p / "proj_out", s.use_linear_projection, inner, channels),
        }
    }

    /// The number of cross-attention layers, i.e. what one forward records.
    pub fn cross_attention_layers(&self) -> usize {
        self.transformer_blocks.len()
    }

    /// `xs` [B, C, H, W]; `context` [B, tokens, cross_attention_dim]. With `record`,
    /// each block's cross-attention appends its per-token probability mean [B, tokens].
    pub fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        mut record: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let (_, _, h, w) = xs
            .size4()
            .expect("feature map is [batch, channels, height, width]");
        let normed = self.norm.forward(xs);
        let mut tokens = match &self.proj_in {
            Projection::Linear(proj) => proj.forward(&to_tokens(&normed)),
            Projection::Conv(proj) => to_tokens(&proj.forward(&normed)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context, record.as_deref_mut());
        }
        let out = match &self.proj_out {
            Projection::Linear(proj) => to_map(&proj.forward(&tokens), h, w),
            Projection::Conv(proj) => proj.forward(&to_map(&tokens, h, w)),
        };
        out + xs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    fn settings(linear: bool) -> CrossAttentionSettings {
        CrossAttentionSettings {
            cross_attention_dim: 6,
            groups: 2,
            use_linear_projection: linear,
        }
    }

    #[test]
    fn names_and_shapes_follow_diffusers() {
        for linear in [true, false] {
            let vs = VarStore::new(Device::Cpu);
            let model = Transformer2DModel::new(vs.root(), 8, 2, 1, settings(linear));
            let vars = vs.variables();
            let proj_in = if linear { vec![8, 8] } else { vec![8, 8, 1, 1] };
            assert_eq!(vars["proj_in.weight"].size(), proj_in);
            assert_eq!(
                vars["transformer_blocks.0.attn2.to_k.weight"].size(),
                vec![8, 6]
            );
            assert_eq!(
                vars["transformer_blocks.0.ff.net.0.proj.weight"].size(),
                vec![64, 8]
            );
            assert_eq!(
                vars["transformer_blocks.0.ff.net.2.weight"].size(),
                vec![8, 32]
            );
            assert_eq!(vars["transformer_blocks.0.norm3.bias"].size(), vec![8]);
            assert_eq!(vars["norm.weight"].size(), vec![8]);
            // norm, proj_in, proj_out; norm1-3; attn1 and attn2 (q, k, v, out w/b); ff.
            assert_eq!(vars.len(), 6 + 6 + 2 * 5 + 4);

            let xs = Tensor::randn([2, 8, 3, 5], (Kind::Float, Device::Cpu));
            let context = Tensor::randn([2, 7, 6], (Kind::Float, Device::Cpu));
            let mut recorded = Vec::new();
            let out = model.forward(&xs, &context, Some(&mut recorded));
            assert_eq!(out.size(), vec![2, 8, 3, 5]);
            assert_eq!(recorded.len(), 1);
            assert_eq!(recorded[0].size(), vec![2, 7]);
            let plain = model.forward(&xs, &context, None);
            assert!((plain - out).abs().max().double_value(&[]) < 1e-5);
        }
    }

    #[test]
    fn geglu_gates_with_exact_gelu() {
        let vs = VarStore::new(Device::Cpu);
        let ff = FeedForward::new(vs.root(), 2);
        let xs = Tensor::randn([3, 2], (Kind::Float, Device::Cpu));
        let hidden = ff.proj.forward(&xs);
        let (value, gate) = (hidden.narrow(-1, 0, 8), hidden.narrow(-1, 8, 8));
        let erf_gelu = &gate * 0.5 * (1.0 + (&gate / 2f64.sqrt()).erf());
        let want = ff.out.forward(&(value * erf_gelu));
        assert!((ff.forward(&xs) - want).abs().max().double_value(&[]) < 1e-6);
    }
}
