//! The diffusers configuration files of a Stable Diffusion folder, read with the
//! defaults diffusers and transformers apply when a key is absent.
//!
//! Mirrors `model_index.json`, `unet/config.json` (`UNet2DConditionModel`),
//! `vae/config.json` (`AutoencoderKL`) and `text_encoder/config.json`
//! (`CLIPTextConfig`). Keys this implementation cannot honour are rejected with the
//! file and key named, instead of being silently ignored.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// A value diffusers accepts either once for every block or once per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks; `None` if a list has the wrong length.
    pub fn expand(&self, n: usize) -> Option<Vec<T>> {
        match self {
            PerBlock::One(v) => Some(vec![v.clone(); n]),
            PerBlock::Each(vs) if vs.len() == n => Some(vs.clone()),
            PerBlock::Each(_) => None,
        }
    }
}

/// `model_index.json`: which class each component folder holds.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    pub unet: (String, String),
    pub vae: (String, String),
    pub text_encoder: (String, String),
    pub tokenizer: (String, String),
    pub scheduler: (String, String),
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn four() -> usize {
    4
}
fn three() -> usize {
    3
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn eps_1e5() -> f64 {
    1e-5
}
fn silu() -> String {
    "silu".into()
}
fn sd_scaling_factor() -> f64 {
    0.18215
}
fn positional() -> String {
    "positional".into()
}
fn default_shift() -> String {
    "default".into()
}
fn mid_cross_attn() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn one_per_block() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn eight_heads() -> PerBlock<usize> {
    PerBlock::One(8)
}

/// `unet/config.json` for `UNet2DConditionModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "mid_cross_attn")]
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "eps_1e5")]
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// In diffusers' UNet2DConditionModel this key is, for historical reasons, the
    /// number of heads (see `num_attention_heads` there); SD 2.1 uses `[5,10,20,20]`.
    #[serde(default = "eight_heads")]
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    pub encoder_hid_dim: Option<usize>,
    // Options of later diffusers U-Nets that SD 2.1 leaves at their defaults. They are
    // read only to refuse a non-default value, which would otherwise build a
    // different network than the checkpoint was trained as.
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "one_f")]
    pub resnet_out_scale_factor: f64,
    pub cross_attention_norm: Option<String>,
    pub attention_type: Option<String>,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    pub addition_time_embed_dim: Option<usize>,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    pub mid_block_only_cross_attention: Option<bool>,
}

fn one_f() -> f64 {
    1.0
}

impl UNetConfig {
    /// Rejects the diffusers options this U-Net does not implement, naming the key.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, message: String| Err(Error::config(path, key, message));
        let n = self.block_out_channels.len();
        if n == 0 {
            return bad("block_out_channels", "must list at least one block".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(
                "down_block_types",
                format!(
                    "{} down and {} up block types for {} block_out_channels",
                    self.down_block_types.len(),
                    self.up_block_types.len(),
                    n
                ),
            );
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad("down_block_types", format!("unsupported block type {t:?}"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad("up_block_types", format!("unsupported block type {t:?}"));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return bad("mid_block_type", format!("unsupported mid block {other:?}")),
        }
        match self.heads_per_block() {
            None => {
                return bad(
                    "attention_head_dim",
                    format!("needs one value or {n} values (one per block)"),
                )
            }
            Some(heads) if heads.contains(&0) => {
                return bad(
                    "attention_head_dim",
                    "a block cannot have zero attention heads".into(),
                )
            }
            Some(_) => {}
        }
        let time_embed = 4 * self.block_out_channels[0];
        if self.time_embedding_dim.is_some_and(|d| d != time_embed) {
            return bad(
                "time_embedding_dim",
                format!("only the default {time_embed} is supported"),
            );
        }
        let non_default = [
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.is_some(),
            ),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("resnet_skip_time_act", self.resnet_skip_time_act),
            (
                "resnet_out_scale_factor",
                self.resnet_out_scale_factor != 1.0,
            ),
            ("cross_attention_norm", self.cross_attention_norm.is_some()),
            (
                "attention_type",
                self.attention_type
                    .as_deref()
                    .is_some_and(|t| t != "default"),
            ),
            ("class_embeddings_concat", self.class_embeddings_concat),
            (
                "addition_time_embed_dim",
                self.addition_time_embed_dim.is_some(),
            ),
            (
                "reverse_transformer_layers_per_block",
                self.reverse_transformer_layers_per_block
                    .as_ref()
                    .is_some_and(|v| !v.is_null()),
            ),
            (
                "mid_block_only_cross_attention",
                self.mid_block_only_cross_attention == Some(true),
            ),
        ];
        if let Some((key, _)) = non_default.iter().find(|(_, set)| *set) {
            return bad(key, "only the SD 2.1 default is supported".into());
        }
        match self.transformer_layers_per_block.expand(n) {
            Some(v) if v.iter().all(|&l| l == 1) => {}
            _ => {
                return bad(
                    "transformer_layers_per_block",
                    "only 1 is supported (SD 2.1)".into(),
                )
            }
        }
        if self.norm_num_groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| c % self.norm_num_groups != 0)
        {
            return bad(
                "norm_num_groups",
                format!(
                    "{} does not divide every block_out_channels entry {:?}",
                    self.norm_num_groups, self.block_out_channels
                ),
            );
        }
        if self.act_fn != "silu" {
            return bad(
                "act_fn",
                format!("only \"silu\" is supported, got {:?}", self.act_fn),
            );
        }
        if self.time_embedding_type != "positional" {
            return bad(
                "time_embedding_type",
                "only \"positional\" is supported".into(),
            );
        }
        if self.resnet_time_scale_shift != "default" {
            return bad(
                "resnet_time_scale_shift",
                "only \"default\" is supported".into(),
            );
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            return bad(
                "class_embed_type",
                "class embeddings are not supported".into(),
            );
        }
        if self.addition_embed_type.is_some() {
            return bad(
                "addition_embed_type",
                "added embeddings are not supported".into(),
            );
        }
        if self.encoder_hid_dim.is_some() {
            return bad(
                "encoder_hid_dim",
                "an encoder projection is not supported".into(),
            );
        }
        if self.dual_cross_attention {
            return bad("dual_cross_attention", "not supported".into());
        }
        if !matches!(
            self.only_cross_attention,
            serde_json::Value::Null | serde_json::Value::Bool(false)
        ) {
            return bad("only_cross_attention", "not supported".into());
        }
        if self.conv_in_kernel % 2 == 0 || self.conv_out_kernel % 2 == 0 {
            return bad("conv_in_kernel", "kernel sizes must be odd".into());
        }
        Ok(())
    }

    /// Attention heads per block, honouring diffusers' historical naming: when
    /// `num_attention_heads` is absent, `attention_head_dim` holds the head count.
    pub fn heads_per_block(&self) -> Option<Vec<usize>> {
        let n = self.block_out_channels.len();
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand(n)
    }
}

/// `vae/config.json` for `AutoencoderKL`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    pub sample_size: Option<usize>,
    #[serde(default = "sd_scaling_factor")]
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
}

impl VaeConfig {
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, message: String| Err(Error::config(path, key, message));
        let n = self.block_out_channels.len();
        if n == 0 {
            return bad("block_out_channels", "must list at least one block".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(
                "down_block_types",
                format!("block types do not match {n} block_out_channels"),
            );
        }
        if self
            .down_block_types
            .iter()
            .any(|t| t != "DownEncoderBlock2D")
        {
            return bad(
                "down_block_types",
                "only DownEncoderBlock2D is supported".into(),
            );
        }
        if self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D") {
            return bad(
                "up_block_types",
                "only UpDecoderBlock2D is supported".into(),
            );
        }
        if self.norm_num_groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| c % self.norm_num_groups != 0)
        {
            return bad(
                "norm_num_groups",
                "must divide every block_out_channels entry".into(),
            );
        }
        if self.act_fn != "silu" {
            return bad(
                "act_fn",
                format!("only \"silu\" is supported, got {:?}", self.act_fn),
            );
        }
        if self.shift_factor.is_some_and(|s| s != 0.0) {
            return bad(
                "shift_factor",
                "a latent shift is not supported (SD 2.1 has none)".into(),
            );
        }
        Ok(())
    }
}

fn clip_vocab() -> usize {
    49408
}
fn clip_hidden() -> usize {
    512
}
fn clip_intermediate() -> usize {
    2048
}
fn clip_layers() -> usize {
    12
}
fn clip_heads() -> usize {
    8
}
fn clip_positions() -> usize {
    77
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}

/// `text_encoder/config.json` for transformers' `CLIPTextModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "clip_vocab")]
    pub vocab_size: usize,
    #[serde(default = "clip_hidden")]
    pub hidden_size: usize,
    #[serde(default = "clip_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "clip_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "clip_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "clip_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps_1e5")]
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, message: String| Err(Error::config(path, key, message));
        if !matches!(self.hidden_act.as_str(), "gelu" | "quick_gelu") {
            return bad(
                "hidden_act",
                format!("unsupported activation {:?}", self.hidden_act),
            );
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return bad(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        Ok(())
    }
}
