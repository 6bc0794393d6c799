//! diffusers' `UNet2DConditionModel` as Stable Diffusion 2.1 uses it.
//!
//! The variable tree reproduces diffusers' weight names (`conv_in`, `time_embedding`,
//! `down_blocks.N`, `mid_block`, `up_blocks.N`, `conv_norm_out`, `conv_out`), so a
//! `unet/diffusion_pytorch_model.safetensors` loads with `weights::load_into` as is.
//!
//! The output is the raw model prediction (epsilon or v): which one it is, is the
//! scheduler configuration's business. Cross-attention probabilities are computed
//! only when the caller asks for them ([`UNet2DConditionModel::forward_with_cross_attention`]);
//! a plain [`UNet2DConditionModel::forward`] uses fused attention everywhere.

mod blocks;
mod embeddings;
mod resnet;
mod stage;
mod transformer;

pub use embeddings::timestep_embedding;

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::model::config::UNetConfig;
use crate::{Error, Result};
use blocks::{BlockAttention, DownBlock, MidBlock, UpBlock, UpChannels};
use embeddings::TimestepEmbedding;
use resnet::ResnetSettings;
use stage::Stage;
use transformer::CrossAttentionSettings;

#[derive(Debug)]
pub struct UNet2DConditionModel {
    conv_in: nn::Conv2D,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<Stage<DownBlock>>,
    mid_block: Stage<MidBlock>,
    up_blocks: Vec<Stage<UpBlock>>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    in_channels: i64,
    cross_attention_dim: i64,
    time_channels: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    center_input_sample: bool,
    gradient_checkpointing: bool,
}

fn last(states: &[Tensor]) -> &Tensor {
    states
        .last()
        .expect("the down path starts with conv_in's output")
}

fn spatial_size(xs: &Tensor) -> [i64; 2] {
    let size = xs.size();
    [size[2], size[3]]
}

fn conv(p: nn::Path, in_channels: i64, out_channels: i64, kernel: usize) -> nn::Conv2D {
    let config = nn::ConvConfig {
        padding: (kernel as i64 - 1) / 2,
        ..Default::default()
    };
    nn::conv2d(p, in_channels, out_channels, kernel as i64, config)
}

impl UNet2DConditionModel {
    /// Declares the U-Net's variables under `p` for `config`.
    ///
    /// # Panics
    /// If `config` would not pass [`UNetConfig::validate`] or asks for zero attention
    /// heads.
    pub fn new(p: nn::Path, config: &UNetConfig) -> Self {
        let channels: Vec<i64> = config
            .block_out_channels
            .iter()
            .map(|&c| c as i64)
            .collect();
        let n = channels.len();
        let heads = config
            .heads_per_block()
            .expect("validated: one head count per block");
        assert!(
            heads.iter().all(|&h| h > 0),
            "U-Net configuration: zero attention heads"
        );
        let depths = config
            .transformer_layers_per_block
            .expand(n)
            .expect("validated: one transformer depth per block");
        let cross_attention = |types: &[String], i: usize| types[i].starts_with("CrossAttn");

        let c0 = channels[0];
        let groups = config.norm_num_groups as i64;
        let resnet = ResnetSettings {
            temb_channels: 4 * c0,
            groups,
            eps: config.norm_eps,
            output_scale_factor: 1.0,
        };
        let settings = CrossAttentionSettings {
            cross_attention_dim: config.cross_attention_dim as i64,
            groups,
            use_linear_projection: config.use_linear_projection,
        };
        let attention = |i: usize| BlockAttention {
            heads: heads[i] as i64,
            transformer_layers: depths[i],
            settings,
        };

        let down_blocks = (0..n)
            .map(|i| {
                let block = DownBlock::new(
                    &p / "down_blocks" / i,
                    if i == 0 { c0 } else { channels[i - 1] },
                    channels[i],
                    config.layers_per_block,
                    resnet,
                    cross_attention(&config.down_block_types, i).then(|| attention(i)),
                    (i + 1 < n).then_some(config.downsample_padding as i64),
                );
                let layers = block.cross_attention_layers();
                Stage::new(block, layers)
            })
            .collect();

        let mid_resnet = ResnetSettings {
            output_scale_factor: config.mid_block_scale_factor,
            ..resnet
        };
        let mid_block = MidBlock::new(
            &p / "mid_block",
            channels[n - 1],
            mid_resnet,
            attention(n - 1),
        );
        let mid_layers = mid_block.cross_attention_layers();

        let up_blocks = (0..n)
            .map(|i| {
                // Up block i mirrors down block n-1-i.
                let mirrored = n - 1 - i;
                let block = UpBlock::new(
                    &p / "up_blocks" / i,
                    UpChannels {
                        prev: channels[(mirrored + 1).min(n - 1)],
                        skip: channels[mirrored.saturating_sub(1)],
                        out: channels[mirrored],
                    },
                    config.layers_per_block + 1,
                    resnet,
                    cross_attention(&config.up_block_types, i).then(|| attention(mirrored)),
                    i + 1 < n,
                );
                let layers = block.cross_attention_layers();
                Stage::new(block, layers)
            })
            .collect();

        let norm_config = nn::GroupNormConfig {
            eps: config.norm_eps,
            ..Default::default()
        };
        let in_channels = config.in_channels as i64;
        let out_channels = config.out_channels as i64;
        Self {
            conv_in: conv(&p / "conv_in", in_channels, c0, config.conv_in_kernel),
            time_embedding: TimestepEmbedding::new(&p / "time_embedding", c0, 4 * c0),
            down_blocks,
            mid_block: Stage::new(mid_block, mid_layers),
            up_blocks,
            conv_norm_out: nn::group_norm(&p / "conv_norm_out", groups, c0, norm_config),
            conv_out: conv(&p / "conv_out", c0, out_channels, config.conv_out_kernel),
            in_channels,
            cross_attention_dim: config.cross_attention_dim as i64,
            time_channels: c0,
            flip_sin_to_cos: config.flip_sin_to_cos,
            freq_shift: config.freq_shift as f64,
            center_input_sample: config.center_input_sample,
            gradient_checkpointing: false,
        }
    }

    /// With gradient checkpointing on, each down, mid and up block keeps only its
    /// inputs for backward and recomputes its activations when backward reaches it:
    /// the same gradients for far less activation memory, at the cost of about one
    /// more forward pass. It only matters while autograd records a graph.
    pub fn set_gradient_checkpointing(&mut self, enabled: bool) {
        self.gradient_checkpointing = enabled;
    }

    /// The latent channels the U-Net denoises (4 for SD 2.1).
    pub fn in_channels(&self) -> i64 {
        self.in_channels
    }

    /// The model prediction for `sample` [B, in_channels, H, W] (any H, W) at
    /// `timesteps` (a scalar, `[1]` or `[B]`; integer or fractional) conditioned on
    /// `encoder_hidden_states` [B, tokens, cross_attention_dim].
    ///
    /// Inputs must have the weights' kind and device (timesteps may be on any device);
    /// [`Self::check_inputs`] says why inputs do not fit, where this panics.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Tensor {
        self.run(sample, timesteps, encoder_hidden_states, None)
    }

    /// [`Self::forward`], also recording every cross-attention layer's post-softmax
    /// probabilities averaged over heads and query positions: one [B, tokens] tensor
    /// per layer in execution order (down blocks, mid block, up blocks; 16 for SD),
    /// in fp32 for half-precision weights. They stay on the autograd graph, so a loss
    /// on them backpropagates into `encoder_hidden_states`.
    pub fn forward_with_cross_attention(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let mut recorded = Vec::with_capacity(self.cross_attention_layers());
        let out = self.run(
            sample,
            timesteps,
            encoder_hidden_states,
            Some(&mut recorded),
        );
        (out, recorded)
    }

    /// How many cross-attention layers the model has (what one recording returns).
    pub fn cross_attention_layers(&self) -> usize {
        let down: usize = self
            .down_blocks
            .iter()
            .map(Stage::cross_attention_layers)
            .sum();
        let up: usize = self
            .up_blocks
            .iter()
            .map(Stage::cross_attention_layers)
            .sum();
        down + self.mid_block.cross_attention_layers() + up
    }

    /// Whether the forward inputs fit the model: shapes, kinds and devices, with an
    /// [`Error::InvalidInput`] that says what does not.
    pub fn check_inputs(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<()> {
        let invalid = |message: String| Err(Error::InvalidInput(format!("U-Net input: {message}")));
        let (kind, device) = (self.conv_in.ws.kind(), self.conv_in.ws.device());
        let size = sample.size();
        if size.len() != 4 || size[1] != self.in_channels {
            return invalid(format!(
                "sample must be [batch, {}, height, width], got {size:?}",
                self.in_channels
            ));
        }
        let batch = size[0];
        let context_size = encoder_hidden_states.size();
        if context_size.len() != 3
            || context_size[0] != batch
            || context_size[2] != self.cross_attention_dim
        {
            return invalid(format!(
                "encoder_hidden_states must be [{batch}, tokens, {}], got {context_size:?}",
                self.cross_attention_dim
            ));
        }
        for (name, t) in [
            ("sample", sample),
            ("encoder_hidden_states", encoder_hidden_states),
        ] {
            if t.kind() != kind || t.device() != device {
                return invalid(format!(
                    "{name} is {:?} on {:?}, the weights are {kind:?} on {device:?}",
                    t.kind(),
                    t.device()
                ));
            }
        }
        let count = match timesteps.size()[..] {
            [] => 1,
            [count] => count,
            _ => {
                return invalid(format!(
                    "timesteps must be a scalar or [batch], got {:?}",
                    timesteps.size()
                ))
            }
        };
        if count != 1 && count != batch {
            return invalid(format!("{count} timesteps for a batch of {batch}"));
        }
        if timesteps.is_complex() || timesteps.kind() == Kind::Bool {
            return invalid(format!(
                "timesteps must be real numbers, got {:?}",
                timesteps.kind()
            ));
        }
        Ok(())
    }

    fn run(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        mut record: Option<&mut Vec<Tensor>>,
    ) -> Tensor {
        let checkpointed = self.gradient_checkpointing;
        let temb = self.time_embed(sample, timesteps);
        let mut skips = vec![self.conv_in.forward(&self.centered(sample))];
        for stage in &self.down_blocks {
            let inputs = [last(&skips), &temb, context];
            let outputs = stage.run(
                checkpointed,
                &inputs,
                record.as_deref_mut(),
                |block, x, record| block.forward(&x[0], &x[1], &x[2], record),
            );
            skips.extend(outputs);
        }
        let inputs = [last(&skips), &temb, context];
        let mut xs = self
            .mid_block
            .run(
                checkpointed,
                &inputs,
                record.as_deref_mut(),
                |block, x, record| vec![block.forward(&x[0], &x[1], &x[2], record)],
            )
            .remove(0);
        for stage in &self.up_blocks {
            let own = skips.split_off(skips.len() - stage.lock().skip_count());
            let upsample_to = skips.last().map(spatial_size);
            let mut inputs = vec![&xs, &temb, context];
            inputs.extend(&own);
            xs = stage
                .run(
                    checkpointed,
                    &inputs,
                    record.as_deref_mut(),
                    move |block, x, record| {
                        vec![block.forward(&x[0], &x[3..], upsample_to, &x[1], &x[2], record)]
                    },
                )
                .remove(0);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&xs).silu())
    }

    fn centered(&self, sample: &Tensor) -> Tensor {
        if self.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample.shallow_clone()
        }
    }

    /// The embedding every resnet receives: [B, 4·C₀] in `sample`'s kind, from
    /// timesteps broadcast to the batch and moved to `sample`'s device.
    fn time_embed(&self, sample: &Tensor, timesteps: &Tensor) -> Tensor {
        let batch = sample.size()[0];
        let timesteps = timesteps
            .reshape([-1])
            .to_device(sample.device())
            .expand([batch], false);
        let sinusoid = timestep_embedding(
            &timesteps,
            self.time_channels,
            self.flip_sin_to_cos,
            self.freq_shift,
        );
        self.time_embedding
            .forward(&sinusoid.to_kind(sample.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::explicit_attention_calls;
    use tch::nn::VarStore;
    use tch::Device;

    /// The project's "tiny" test U-Net.
    fn tiny_config(linear: bool) -> UNetConfig {
        serde_json::from_value(serde_json::json!({
            "sample_size": 8,
            "block_out_channels": [32, 32, 64, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2,
            "attention_head_dim": [2, 2, 4, 4],
            "cross_attention_dim": 32,
            "norm_num_groups": 8,
            "use_linear_projection": linear,
        }))
        .unwrap()
    }

    fn tiny(linear: bool) -> (VarStore, UNet2DConditionModel) {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let unet = UNet2DConditionModel::new(vs.root(), &tiny_config(linear));
        (vs, unet)
    }

    fn inputs(batch: i64, h: i64, w: i64) -> (Tensor, Tensor) {
        let options = (Kind::Float, Device::Cpu);
        (
            Tensor::randn([batch, 4, h, w], options),
            Tensor::randn([batch, 77, 32], options) * 4.0,
        )
    }

    /// max |got − want| / max |want|.
    fn relative_diff(got: &Tensor, want: &Tensor) -> f64 {
        (got - want).abs().max().double_value(&[]) / want.abs().max().double_value(&[])
    }

    #[test]
    fn declares_diffusers_weight_names() {
        let (vs, unet) = tiny(true);
        let vars = vs.variables();
        // diffusers' tiny U-Net saves 684 tensors (checked with save_pretrained).
        assert_eq!(vars.len(), 684);
        for (name, shape) in [
            ("conv_in.weight", vec![32, 4, 3, 3]),
            ("time_embedding.linear_1.weight", vec![128, 32]),
            ("time_embedding.linear_2.weight", vec![128, 128]),
            (
                "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
                vec![32, 32],
            ),
            (
                "down_blocks.1.resnets.0.time_emb_proj.weight",
                vec![32, 128],
            ),
            (
                "down_blocks.2.resnets.0.conv_shortcut.weight",
                vec![64, 32, 1, 1],
            ),
            (
                "down_blocks.2.downsamplers.0.conv.weight",
                vec![64, 64, 3, 3],
            ),
            ("mid_block.attentions.0.proj_in.weight", vec![64, 64]),
            ("mid_block.resnets.1.norm2.weight", vec![64]),
            ("up_blocks.0.resnets.2.conv1.weight", vec![64, 128, 3, 3]),
            ("up_blocks.0.upsamplers.0.conv.weight", vec![64, 64, 3, 3]),
            (
                "up_blocks.1.resnets.2.conv_shortcut.weight",
                vec![64, 96, 1, 1],
            ),
            (
                "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight",
                vec![256, 32],
            ),
            ("up_blocks.3.resnets.0.conv1.weight", vec![32, 64, 3, 3]),
            ("conv_norm_out.weight", vec![32]),
            ("conv_out.weight", vec![4, 32, 3, 3]),
        ] {
            assert_eq!(vars.get(name).map(Tensor::size), Some(shape), "{name}");
        }
        assert!(!vars.contains_key("down_blocks.3.downsamplers.0.conv.weight"));
        assert!(!vars.contains_key("up_blocks.3.upsamplers.0.conv.weight"));
        assert!(!vars.contains_key("up_blocks.0.attentions.0.norm.weight"));
        assert_eq!(unet.cross_attention_layers(), 16);

        let (conv_vs, _) = tiny(false);
        let conv_vars = conv_vs.variables();
        assert_eq!(
            conv_vars["mid_block.attentions.0.proj_in.weight"].size(),
            vec![64, 64, 1, 1]
        );
    }

    #[test]
    fn records_sixteen_layers_only_when_asked() {
        let (_vs, unet) = tiny(true);
        let (sample, context) = inputs(2, 8, 8);
        let t = Tensor::from_slice(&[10i64, 900]);
        let _guard = tch::no_grad_guard();

        let before = explicit_attention_calls();
        let plain = unet.forward(&sample, &t, &context);
        assert_eq!(
            explicit_attention_calls(),
            before,
            "a plain forward materialized probabilities"
        );
        assert_eq!(plain.size(), vec![2, 4, 8, 8]);

        let (recorded_out, recorded) = unet.forward_with_cross_attention(&sample, &t, &context);
        assert_eq!(explicit_attention_calls(), before + 16);
        assert_eq!(recorded.len(), 16);
        for per_token in &recorded {
            assert_eq!(per_token.size(), vec![2, 77]);
            let sums = Vec::<f32>::try_from(per_token.sum_dim_intlist(-1, false, None)).unwrap();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-4), "{sums:?}");
        }
        assert!(relative_diff(&recorded_out, &plain) < 1e-5);
    }

    #[test]
    fn recorded_means_backpropagate_to_the_text_states() {
        let (_vs, unet) = tiny(false);
        let (sample, context) = inputs(2, 8, 8);
        let context = context.set_requires_grad(true);
        let t = Tensor::from_slice(&[3i64, 500]);
        let (_, recorded) = unet.forward_with_cross_attention(&sample, &t, &context);
        // Each layer's means sum to one per sample, so only a weighted sum has a
        // non-zero gradient.
        let probe = Tensor::randn([16, 2, 77], (Kind::Float, Device::Cpu));
        (Tensor::stack(&recorded, 0) * probe)
            .sum(Kind::Float)
            .backward();
        let grad = context.grad();
        assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(bool::try_from(grad.isfinite().all()).unwrap());
    }

    #[test]
    fn per_sample_scalar_and_fractional_timesteps() {
        // In fp64, so that batching changes nothing beyond rounding noise.
        let (mut vs, unet) = tiny(true);
        vs.double();
        let (sample, context) = inputs(2, 8, 8);
        let (sample, context) = (sample.to_kind(Kind::Double), context.to_kind(Kind::Double));
        let _guard = tch::no_grad_guard();
        let both = unet.forward(&sample, &Tensor::from_slice(&[20i64, 700]), &context);
        let first = unet.forward(
            &sample.narrow(0, 0, 1),
            &Tensor::from(20i64),
            &context.narrow(0, 0, 1),
        );
        let second = unet.forward(
            &sample.narrow(0, 1, 1),
            &Tensor::from_slice(&[700.0f32]),
            &context.narrow(0, 1, 1),
        );
        let split = relative_diff(&Tensor::cat(&[first, second], 0), &both);
        assert!(split < 1e-12, "{split}");

        let scalar = unet.forward(&sample, &Tensor::from(700.0f64), &context);
        let repeated = unet.forward(&sample, &Tensor::from_slice(&[700i64, 700]), &context);
        assert!(relative_diff(&scalar, &repeated) == 0.0);
        let fractional = unet.forward(&sample, &Tensor::from_slice(&[700.5f32, 700.5]), &context);
        assert!(relative_diff(&fractional, &repeated) > 1e-6);
    }

    #[test]
    fn latent_sides_not_divisible_by_eight() {
        let (_vs, unet) = tiny(false);
        let (sample, context) = inputs(1, 10, 13);
        let _guard = tch::no_grad_guard();
        let out = unet.forward(&sample, &Tensor::from(5i64), &context);
        assert_eq!(out.size(), vec![1, 4, 10, 13]);
    }

    #[test]
    fn half_precision_weights_record_in_fp32() {
        let (mut vs, unet) = tiny(true);
        vs.bfloat16();
        let (sample, context) = inputs(1, 8, 8);
        let (sample, context) = (
            sample.to_kind(Kind::BFloat16),
            context.to_kind(Kind::BFloat16),
        );
        let _guard = tch::no_grad_guard();
        let (out, recorded) =
            unet.forward_with_cross_attention(&sample, &Tensor::from(1i64), &context);
        assert_eq!(out.kind(), Kind::BFloat16);
        assert!(recorded.iter().all(|r| r.kind() == Kind::Float));
        assert!(bool::try_from(out.isfinite().all()).unwrap());
    }

    #[test]
    fn says_why_inputs_do_not_fit() {
        let (_vs, unet) = tiny(true);
        let (sample, context) = inputs(2, 8, 8);
        let t = Tensor::from_slice(&[1i64, 2]);
        assert!(unet.check_inputs(&sample, &t, &context).is_ok());
        assert!(unet
            .check_inputs(&sample, &Tensor::from(3.5f64), &context)
            .is_ok());
        let message = |r: Result<()>| r.unwrap_err().to_string();
        let wrong_channels = Tensor::zeros([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        assert!(message(unet.check_inputs(&wrong_channels, &t, &context))
            .contains("sample must be [batch, 4"));
        assert!(
            message(unet.check_inputs(&sample, &t, &context.narrow(0, 0, 1)))
                .contains("encoder_hidden_states")
        );
        let three = Tensor::from_slice(&[1i64, 2, 3]);
        assert!(message(unet.check_inputs(&sample, &three, &context))
            .contains("3 timesteps for a batch of 2"));
        assert!(
            message(unet.check_inputs(&sample.to_kind(Kind::Double), &t, &context))
                .contains("Double")
        );
        let flags = Tensor::from_slice(&[true, false]);
        assert!(message(unet.check_inputs(&sample, &flags, &context)).contains("real"));
    }

    /// Every variable's gradient by name, then the context's, zeroing them.
    fn take_grads(vs: &VarStore, context: &Tensor) -> Vec<(String, Tensor)> {
        let mut grads: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .chain([("context".to_string(), context.shallow_clone())])
            .map(|(name, t)| {
                let mut grad = t.grad();
                assert!(grad.defined(), "no gradient reached {name}");
                let copy = grad.copy();
                let _ = grad.zero_();
                (name, copy)
            })
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        grads
    }

    #[test]
    fn gradient_checkpointing_gives_the_same_gradients() {
        let (mut vs, mut unet) = tiny(true);
        vs.double();
        let (sample, context) = inputs(2, 8, 8);
        let (sample, context) = (sample.to_kind(Kind::Double), context.to_kind(Kind::Double));
        let context = context.set_requires_grad(true);
        let t = Tensor::from_slice(&[30i64, 600]);
        let weights = Tensor::randn([2, 4, 8, 8], (Kind::Double, Device::Cpu));
        let probe = Tensor::randn([16, 2, 77], (Kind::Double, Device::Cpu));
        let loss = |unet: &UNet2DConditionModel| {
            let (out, recorded) = unet.forward_with_cross_attention(&sample, &t, &context);
            let attention = (Tensor::stack(&recorded, 0) * &probe).sum(Kind::Double);
            ((out * &weights).sum(Kind::Double) + attention * 100.0).backward();
        };

        loss(&unet);
        let plain = take_grads(&vs, &context);
        unet.set_gradient_checkpointing(true);
        let before = explicit_attention_calls();
        loss(&unet);
        // The backward pass recomputed every block, attention probabilities included.
        assert_eq!(explicit_attention_calls(), before + 32);
        let checkpointed = take_grads(&vs, &context);

        assert_eq!(plain.len(), 685);
        for ((name, want), (_, got)) in plain.iter().zip(&checkpointed) {
            let scale = want.abs().max().double_value(&[]).max(1e-30);
            let err = (got - want).abs().max().double_value(&[]) / scale;
            assert!(err < 1e-10, "{name}: relative gradient error {err}");
        }

        let _guard = tch::no_grad_guard();
        let with = unet.forward(&sample, &t, &context);
        unet.set_gradient_checkpointing(false);
        let without = unet.forward(&sample, &t, &context);
        assert!(relative_diff(&with, &without) == 0.0);
    }

    #[test]
    fn heads_that_do_not_divide_the_channels_narrow_the_attention_like_diffusers() {
        // diffusers builds 3 heads of 32 // 3 = 10 channels: a 30-wide attention.
        let mut config = tiny_config(true);
        config.attention_head_dim = crate::model::config::PerBlock::Each(vec![3, 2, 4, 4]);
        let vs = VarStore::new(Device::Cpu);
        let unet = UNet2DConditionModel::new(vs.root(), &config);
        let vars = vs.variables();
        assert_eq!(
            vars["down_blocks.0.attentions.0.proj_in.weight"].size(),
            vec![30, 32]
        );
        assert_eq!(
            vars["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight"].size(),
            vec![30, 30]
        );
        let (sample, context) = inputs(1, 8, 8);
        let out = tch::no_grad(|| unet.forward(&sample, &Tensor::from(1i64), &context));
        assert_eq!(out.size(), vec![1, 4, 8, 8]);
    }
}
