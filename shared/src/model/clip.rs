//! The CLIP text encoder: transformers' `CLIPTextModel` (its `text_model`), whose
//! `last_hidden_state` conditions the U-Net and is what CoRe's context embedding loss
//! compares.
//!
//! Variables are named as SD checkpoints store them, under `text_model.`
//! (`text_model.encoder.layers.0.self_attn.q_proj.weight`, …); files saved by
//! transformers 5, which drops that prefix, load through [`weight_aliases`].
//!
//! The concept's learned vector is spliced into the token embeddings
//! ([`ClipTextTransformer::embed_tokens_with`]) rather than appended to the embedding
//! table: the base encoder stays shared and unchanged across concepts, and gradients
//! reach the one trained vector through [`ClipTextTransformer::forward_embeds`].

use tch::nn::{self, Module};
use tch::Tensor;

use crate::model::config::ClipTextConfig;
use crate::{Error, Result};

/// Other names a text-encoder variable may have in a checkpoint: transformers 5 saves
/// `CLIPTextModel` without the `text_model.` prefix.
pub fn weight_aliases(name: &str) -> Vec<String> {
    name.strip_prefix("text_model.")
        .map(String::from)
        .into_iter()
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Activation {
    /// Exact (erf) GELU: OpenCLIP ViT-H, SD 2.x.
    Gelu,
    /// x·σ(1.702x): OpenAI's CLIP, SD 1.x.
    QuickGelu,
}

impl Activation {
    fn apply(self, xs: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => xs.gelu("none"),
            Activation::QuickGelu => xs * (xs * 1.702).sigmoid(),
        }
    }
}

#[derive(Debug)]
struct SelfAttention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    heads: i64,
}

impl SelfAttention {
    fn new(p: nn::Path, cfg: &ClipTextConfig) -> Self {
        let d = cfg.hidden_size as i64;
        let linear = |name: &str| nn::linear(&p / name, d, d, Default::default());
        Self {
            q_proj: linear("q_proj"),
            k_proj: linear("k_proj"),
            v_proj: linear("v_proj"),
            out_proj: linear("out_proj"),
            heads: cfg.num_attention_heads as i64,
        }
    }

    /// Causal self-attention: position i sees positions ≤ i only, as CLIP was trained.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, t, d) = xs
            .size3()
            .expect("hidden states are [batch, tokens, hidden]");
        let heads = |proj: &nn::Linear| {
            proj.forward(xs)
                .view([b, t, self.heads, d / self.heads])
                .transpose(1, 2)
        };
        let attended = Tensor::scaled_dot_product_attention(
            &heads(&self.q_proj),
            &heads(&self.k_proj),
            &heads(&self.v_proj),
            None::<Tensor>,
            0.0,
            true,
            None,
            false,
        );
        self.out_proj
            .forward(&attended.transpose(1, 2).reshape([b, t, d]))
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: nn::LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    activation: Activation,
}

impl EncoderLayer {
    fn new(p: nn::Path, cfg: &ClipTextConfig, activation: Activation) -> Self {
        let d = cfg.hidden_size as i64;
        let norm = |name: &str| {
            let config = nn::LayerNormConfig {
                eps: cfg.layer_norm_eps,
                ..Default::default()
            };
            nn::layer_norm(&p / name, vec![d], config)
        };
        let mlp = &p / "mlp";
        Self {
            layer_norm1: norm("layer_norm1"),
            self_attn: SelfAttention::new(&p / "self_attn", cfg),
            layer_norm2: norm("layer_norm2"),
            fc1: nn::linear(
                &mlp / "fc1",
                d,
                cfg.intermediate_size as i64,
                Default::default(),
            ),
            fc2: nn::linear(
                &mlp / "fc2",
                cfg.intermediate_size as i64,
                d,
                Default::default(),
            ),
            activation,
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = xs + self.self_attn.forward(&self.layer_norm1.forward(xs));
        let mlp = self.fc2.forward(
            &self
                .activation
                .apply(&self.fc1.forward(&self.layer_norm2.forward(&xs))),
        );
        xs + mlp
    }
}

/// transformers' `CLIPTextModel` up to `last_hidden_state` (after `final_layer_norm`).
#[derive(Debug)]
pub struct ClipTextTransformer {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: nn::LayerNorm,
    hidden_size: i64,
}

impl ClipTextTransformer {
    /// Declares the encoder's variables under `p / "text_model"`; `cfg` must have
    /// passed [`ClipTextConfig::validate`].
    pub fn new(p: nn::Path, cfg: &ClipTextConfig) -> Self {
        let activation = if cfg.hidden_act == "quick_gelu" {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        };
        let p = &p / "text_model";
        let embeddings = &p / "embeddings";
        let d = cfg.hidden_size as i64;
        let layers = &p / "encoder" / "layers";
        let final_config = nn::LayerNormConfig {
            eps: cfg.layer_norm_eps,
            ..Default::default()
        };
        Self {
            token_embedding: nn::embedding(
                &embeddings / "token_embedding",
                cfg.vocab_size as i64,
                d,
                Default::default(),
            ),
            position_embedding: nn::embedding(
                &embeddings / "position_embedding",
                cfg.max_position_embeddings as i64,
                d,
                Default::default(),
            ),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| EncoderLayer::new(&layers / i, cfg, activation))
                .collect(),
            final_layer_norm: nn::layer_norm(&p / "final_layer_norm", vec![d], final_config),
            hidden_size: d,
        }
    }

    pub fn hidden_size(&self) -> i64 {
        self.hidden_size
    }

    /// Rows of the token embedding table (49408 for CLIP).
    pub fn vocab_rows(&self) -> i64 {
        self.token_embedding.ws.size()[0]
    }

    /// `last_hidden_state` [B, T, D] of token ids [B, T].
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        self.forward_embeds(&self.token_embedding(input_ids))
    }

    /// The input token embeddings [.., D] of ids that are all in the table.
    pub fn token_embedding(&self, ids: &Tensor) -> Tensor {
        self.token_embedding.forward(ids)
    }

    /// Token embeddings of `ids` [B, T] where every position holding one of the
    /// `placeholders`' ids takes that placeholder's vector `[D]` instead (its id may lie
    /// beyond the table, e.g. 49408). Differentiable in the vectors, which are cast to
    /// the table's device and kind.
    pub fn embed_tokens_with(
        &self,
        ids: &Tensor,
        placeholders: &[(i64, &Tensor)],
    ) -> Result<Tensor> {
        let rows = self.vocab_rows();
        let mut known = ids.ge(0).logical_and(&ids.lt(rows));
        for (id, vector) in placeholders {
            if vector.size() != [self.hidden_size] {
                return Err(Error::InvalidInput(format!(
                    "the vector for token id {id} has shape {:?}, the text encoder takes [{}]",
                    vector.size(),
                    self.hidden_size
                )));
            }
            known = known.logical_or(&ids.eq(*id));
        }
        if known.all().int64_value(&[]) == 0 {
            return Err(Error::InvalidInput(format!(
                "token ids outside the vocabulary (0..{rows}) that no placeholder vector stands for"
            )));
        }
        let table = &self.token_embedding.ws;
        let mut embeds = self.token_embedding(&ids.clamp(0, rows - 1));
        for (id, vector) in placeholders {
            let at = ids.eq(*id).unsqueeze(-1);
            embeds = vector
                .to_device(table.device())
                .to_kind(table.kind())
                .where_self(&at, &embeds);
        }
        Ok(embeds)
    }

    /// `last_hidden_state` [B, T, D] of token embeddings [B, T, D]: adds the position
    /// embeddings, then runs the causal encoder and the final layer norm.
    pub fn forward_embeds(&self, inputs_embeds: &Tensor) -> Tensor {
        let tokens = inputs_embeds.size()[1];
        let positions = self.position_embedding.ws.narrow(0, 0, tokens);
        let mut xs = inputs_embeds + positions;
        for layer in &self.layers {
            xs = layer.forward(&xs);
        }
        self.final_layer_norm.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    fn tiny_config(hidden_act: &str) -> ClipTextConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 77, "hidden_act": hidden_act, "layer_norm_eps": 1e-5
        }))
        .unwrap()
    }

    fn tiny_model(hidden_act: &str) -> (VarStore, ClipTextTransformer) {
        tch::manual_seed(7);
        let vs = VarStore::new(Device::Cpu);
        let model = ClipTextTransformer::new(vs.root(), &tiny_config(hidden_act));
        (vs, model)
    }

    fn ids(values: &[i64]) -> Tensor {
        Tensor::from_slice(values).view([1, -1])
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn names_follow_sd_checkpoints() {
        let (vs, _) = tiny_model("gelu");
        let vars = vs.variables();
        for name in [
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.1.self_attn.out_proj.bias",
            "text_model.encoder.layers.0.mlp.fc2.weight",
            "text_model.encoder.layers.0.layer_norm2.weight",
            "text_model.final_layer_norm.bias",
        ] {
            assert!(vars.contains_key(name), "{name} missing");
        }
        assert_eq!(vars.len(), 4 + 2 * 16);
        assert_eq!(
            vars["text_model.embeddings.token_embedding.weight"].size(),
            [49408, 32]
        );
        assert_eq!(
            weight_aliases("text_model.final_layer_norm.bias"),
            ["final_layer_norm.bias"]
        );
        assert!(weight_aliases("final_layer_norm.bias").is_empty());
    }

    #[test]
    fn causal_mask_hides_later_tokens() {
        for act in ["gelu", "quick_gelu"] {
            let (_vs, model) = tiny_model(act);
            let a = model.forward(&ids(&[49406, 320, 1125, 539, 49407]));
            let b = model.forward(&ids(&[49406, 320, 1125, 7, 8]));
            assert_eq!(a.size(), [1, 5, 32]);
            assert_eq!(max_abs_diff(&a.narrow(1, 0, 3), &b.narrow(1, 0, 3)), 0.0);
            assert!(max_abs_diff(&a.narrow(1, 3, 2), &b.narrow(1, 3, 2)) > 1e-3);
            // The final layer norm has unit weight and zero bias at initialization.
            let mean = a
                .mean_dim(-1, false, Kind::Float)
                .abs()
                .max()
                .double_value(&[]);
            assert!(mean < 1e-5, "{mean}");
        }
    }

    #[test]
    fn splicing_a_vector_matches_the_token_it_copies_and_passes_gradients() {
        let (_vs, model) = tiny_model("gelu");
        let plain = ids(&[49406, 320, 1929, 49407]);
        let with_placeholder = ids(&[49406, 320, 49408, 49407]);
        let dog = model
            .token_embedding(&Tensor::from(1929i64))
            .detach()
            .set_requires_grad(true);
        let embeds = model
            .embed_tokens_with(&with_placeholder, &[(49408, &dog)])
            .unwrap();
        let spliced = model.forward_embeds(&embeds);
        let reference = model.forward(&plain);
        assert_eq!(max_abs_diff(&spliced, &reference), 0.0);
        assert_eq!(
            max_abs_diff(
                &model.forward_embeds(&model.token_embedding(&plain)),
                &reference
            ),
            0.0
        );

        spliced.sum(Kind::Float).backward();
        let grad = dog.grad();
        assert_eq!(grad.size(), [32]);
        assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn splicing_refuses_unknown_ids_and_wrong_shapes() {
        let (_vs, model) = tiny_model("gelu");
        let v = Tensor::zeros([32], (Kind::Float, Device::Cpu));
        let unknown = ids(&[49406, 49409, 49407]);
        assert!(model.embed_tokens_with(&unknown, &[(49408, &v)]).is_err());
        assert!(model.embed_tokens_with(&ids(&[-1]), &[]).is_err());
        let short = Tensor::zeros([31], (Kind::Float, Device::Cpu));
        assert!(model
            .embed_tokens_with(&ids(&[49408]), &[(49408, &short)])
            .is_err());
    }
}
