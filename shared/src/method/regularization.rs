//! CoRe's context regularization of one step: both losses for one [`ContextPair`],
//! computed from the models (docs/method.md, "Stage 1" steps 4–5; also test-time
//! optimization).
//!
//! The y* branch splices the concept vector S* into the token embeddings and stays on
//! the autograd graph; the y_cat branch runs without autograd, since gradients reach S*
//! only through y* and recording a graph for the reference prompt would cost memory and
//! time for nothing (a known defect of the reference implementation).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::method::context::ContextPair;
use crate::method::losses::{context_attention_loss, context_embedding_loss, LossVariant};
use crate::model::clip::ClipTextTransformer;
use crate::model::unet::UNet2DConditionModel;
use crate::{Error, Result};

/// λ_emb and λ_attn: how much each loss weighs against the diffusion loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RegularizationWeights {
    #[serde(rename = "lambda_embedding")]
    pub embedding: f64,
    #[serde(rename = "lambda_attention")]
    pub attention: f64,
}

impl Default for RegularizationWeights {
    /// The paper's and the reference implementation's λ_emb = 1.5e-4, λ_attn = 0.05.
    fn default() -> Self {
        Self {
            embedding: 1.5e-4,
            attention: 0.05,
        }
    }
}

/// Which losses run: switching one off is the paper's "w/o CER" / "w/o CAR" ablation,
/// and a switched-off loss costs nothing (no U-Net passes without the attention loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegularizationTerms {
    #[serde(rename = "embedding_loss")]
    pub embedding: bool,
    #[serde(rename = "attention_loss")]
    pub attention: bool,
}

impl Default for RegularizationTerms {
    fn default() -> Self {
        Self {
            embedding: true,
            attention: true,
        }
    }
}

/// The unweighted losses of one step, fp32 scalars on the autograd graph of S*; `None`
/// for a loss that is switched off.
#[derive(Debug)]
pub struct ContextLosses {
    pub embedding: Option<Tensor>,
    pub attention: Option<Tensor>,
}

impl ContextLosses {
    /// λ_emb·L_emb + λ_attn·L_attn over the losses present; `None` when both are off.
    pub fn weighted_sum(&self, weights: &RegularizationWeights) -> Option<Tensor> {
        let embedding = self.embedding.as_ref().map(|l| l * weights.embedding);
        let attention = self.attention.as_ref().map(|l| l * weights.attention);
        match (embedding, attention) {
            (Some(e), Some(a)) => Some(e + a),
            (e, a) => e.or(a),
        }
    }
}

/// Computes [`ContextLosses`] with a text encoder and a U-Net.
///
/// The models' variables should be frozen (`VarStore::freeze`): backward then reaches
/// S* alone.
pub struct ContextRegularizer<'a> {
    pub text_encoder: &'a ClipTextTransformer,
    pub unet: &'a UNet2DConditionModel,
    /// The id the concept prompts hold where S* goes.
    pub placeholder_id: i64,
    pub variant: LossVariant,
    pub terms: RegularizationTerms,
}

impl ContextRegularizer<'_> {
    /// The losses for `pair` with the concept vector `s_star` `[D]` (which requires grad
    /// while training). The attention loss conditions two U-Net passes, one on each
    /// prompt repeated over the batch, on the same `noisy_latents` [B, 4, h, w] and
    /// `timesteps` `[B]` as the step's diffusion loss.
    ///
    /// The prompts' ids go to the latents' device, which must be the models' device;
    /// the latents are cast to the models' precision. Neither latents nor timesteps are
    /// touched when the attention loss is off.
    pub fn losses(
        &self,
        pair: &ContextPair,
        s_star: &Tensor,
        noisy_latents: &Tensor,
        timesteps: &Tensor,
    ) -> Result<ContextLosses> {
        let terms = self.terms;
        if !terms.embedding && !terms.attention {
            return Ok(ContextLosses {
                embedding: None,
                attention: None,
            });
        }
        let at_concept = pair
            .concept_ids
            .flatten(0, -1)
            .f_int64_value(&[pair.concept_position])?;
        if at_concept != self.placeholder_id {
            return Err(Error::InvalidInput(format!(
                "the concept prompt holds {at_concept} at the concept position {}, not the \
                 placeholder id {}",
                pair.concept_position, self.placeholder_id
            )));
        }
        let device = noisy_latents.device();
        let encoder = self.text_encoder;
        let concept_embeds = encoder.embed_tokens_with(
            &pair.concept_ids.to_device(device),
            &[(self.placeholder_id, s_star)],
        )?;
        let concept_hidden = encoder.forward_embeds(&concept_embeds);
        let reference_hidden = tch::no_grad(|| -> Result<Tensor> {
            let embeds = encoder.embed_tokens_with(&pair.reference_ids.to_device(device), &[])?;
            Ok(encoder.forward_embeds(&embeds))
        })?;

        let embedding = terms.embedding.then(|| {
            context_embedding_loss(
                &concept_hidden,
                &reference_hidden,
                &pair.kept_positions,
                self.variant,
            )
        });
        let attention = if terms.attention {
            Some(self.attention_loss(
                pair,
                &concept_hidden,
                &reference_hidden,
                noisy_latents,
                timesteps,
            )?)
        } else {
            None
        };
        Ok(ContextLosses {
            embedding,
            attention,
        })
    }

    fn attention_loss(
        &self,
        pair: &ContextPair,
        concept_hidden: &Tensor,
        reference_hidden: &Tensor,
        noisy_latents: &Tensor,
        timesteps: &Tensor,
    ) -> Result<Tensor> {
        let latents = noisy_latents.to_kind(concept_hidden.kind());
        let batch = match latents.size()[..] {
            [batch, _, _, _] => batch,
            ref size => {
                return Err(Error::InvalidInput(format!(
                    "noisy latents must be [batch, channels, height, width], got {size:?}"
                )))
            }
        };
        let over_batch = |hidden: &Tensor| hidden.repeat([batch, 1, 1]);
        let concept_context = over_batch(concept_hidden);
        self.unet
            .check_inputs(&latents, timesteps, &concept_context)?;
        if self.unet.cross_attention_layers() == 0 {
            return Err(Error::InvalidInput(
                "the U-Net has no cross-attention layers to regularize".into(),
            ));
        }
        let (_, concept_means) =
            self.unet
                .forward_with_cross_attention(&latents, timesteps, &concept_context);
        let (_, reference_means) = tch::no_grad(|| {
            self.unet.forward_with_cross_attention(
                &latents,
                timesteps,
                &over_batch(reference_hidden),
            )
        });
        Ok(context_attention_loss(
            &concept_means,
            &reference_means,
            &pair.kept_positions,
            self.variant,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::explicit_attention_calls;
    use crate::model::random::{write_random_model, ModelSize};
    use crate::model::{Component, LoadOptions, ModelFolder};
    use crate::schedule::PredictionType;
    use tch::{Device, Kind};

    struct Models {
        _dir: tempfile::TempDir,
        text_encoder: Component<ClipTextTransformer>,
        unet: Component<UNet2DConditionModel>,
        pair: ContextPair,
        category_vector: Tensor,
    }

    fn tiny_models() -> Models {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("model");
        write_random_model(&root, ModelSize::Tiny, PredictionType::Epsilon, 3).unwrap();
        let folder = ModelFolder::open(&root).unwrap();
        let mut tokenizer = folder.tokenizer().unwrap();
        tokenizer.add_placeholder("<concept>").unwrap();
        let mut text_encoder = folder.load_text_encoder(&LoadOptions::default()).unwrap();
        let mut unet = folder.load_unet(&LoadOptions::default()).unwrap();
        text_encoder.vars.freeze();
        unet.vars.freeze();
        let pair = ContextPair::new(&tokenizer, "a {} in the snow", "<concept>", "dog").unwrap();
        let category_vector = text_encoder
            .model
            .token_embedding(&Tensor::from(1929i64))
            .detach();
        Models {
            _dir: dir,
            text_encoder,
            unet,
            pair,
            category_vector,
        }
    }

    fn regularizer(
        models: &Models,
        variant: LossVariant,
        terms: RegularizationTerms,
    ) -> ContextRegularizer<'_> {
        ContextRegularizer {
            text_encoder: &models.text_encoder.model,
            unet: &models.unet.model,
            placeholder_id: 49408,
            variant,
            terms,
        }
    }

    fn inputs() -> (Tensor, Tensor) {
        tch::manual_seed(11);
        (
            Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu)),
            Tensor::from_slice(&[17i64, 640]),
        )
    }

    fn value(t: &Option<Tensor>) -> f64 {
        let t = t.as_ref().expect("the loss is on");
        assert_eq!(t.size(), Vec::<i64>::new());
        assert_eq!(t.kind(), Kind::Float);
        t.double_value(&[])
    }

    #[test]
    fn the_category_vector_itself_has_no_context_loss() {
        let models = tiny_models();
        let (latents, timesteps) = inputs();
        for variant in [LossVariant::Reference, LossVariant::Paper] {
            let losses = regularizer(&models, variant, RegularizationTerms::default())
                .losses(&models.pair, &models.category_vector, &latents, &timesteps)
                .unwrap();
            assert!(value(&losses.embedding).abs() < 1e-6);
            assert_eq!(value(&losses.attention), 0.0);
        }
    }

    #[test]
    fn gradients_reach_s_star_through_both_losses() {
        let models = tiny_models();
        let (latents, timesteps) = inputs();
        tch::manual_seed(5);
        let mut s_star = (&models.category_vector
            + Tensor::randn([32], (Kind::Float, Device::Cpu)) * 0.5)
            .set_requires_grad(true);
        let weights = RegularizationWeights::default();
        let mut grads = Vec::new();
        for terms in [
            RegularizationTerms {
                embedding: true,
                attention: false,
            },
            RegularizationTerms {
                embedding: false,
                attention: true,
            },
            RegularizationTerms::default(),
        ] {
            s_star.zero_grad();
            let losses = regularizer(&models, LossVariant::Reference, terms)
                .losses(&models.pair, &s_star, &latents, &timesteps)
                .unwrap();
            assert_eq!(losses.embedding.is_some(), terms.embedding);
            assert_eq!(losses.attention.is_some(), terms.attention);
            let total = losses.weighted_sum(&weights).unwrap();
            let by_hand = losses
                .embedding
                .as_ref()
                .map_or(0.0, |l| l.double_value(&[]))
                * 1.5e-4
                + losses
                    .attention
                    .as_ref()
                    .map_or(0.0, |l| l.double_value(&[]))
                    * 0.05;
            assert!((total.double_value(&[]) - by_hand).abs() <= 1e-6 * by_hand.abs());
            total.backward();
            let grad = s_star.grad();
            assert!(grad.abs().max().double_value(&[]) > 0.0, "{terms:?}");
            grads.push(grad.copy());
        }
        // The total's gradient is the sum of the two losses' gradients.
        let sum = &grads[0] + &grads[1];
        let err = (&grads[2] - &sum).abs().max().double_value(&[]);
        assert!(err <= 1e-6 * sum.abs().max().double_value(&[]), "{err}");
        // Frozen models collect nothing.
        for var in models.unet.vars.trainable_variables() {
            assert!(!var.grad().defined());
        }
    }

    #[test]
    fn switched_off_losses_cost_nothing() {
        let models = tiny_models();
        let (latents, timesteps) = inputs();
        let layers = models.unet.model.cross_attention_layers();
        assert_eq!(layers, 16);
        let calls = |terms| {
            let before = explicit_attention_calls();
            let losses = regularizer(&models, LossVariant::Paper, terms)
                .losses(&models.pair, &models.category_vector, &latents, &timesteps)
                .unwrap();
            (explicit_attention_calls() - before, losses)
        };
        let (n, losses) = calls(RegularizationTerms {
            embedding: true,
            attention: false,
        });
        assert_eq!(n, 0);
        assert!(losses.attention.is_none() && losses.embedding.is_some());
        let (n, _) = calls(RegularizationTerms::default());
        assert_eq!(n, 2 * layers);
        let (n, losses) = calls(RegularizationTerms {
            embedding: false,
            attention: false,
        });
        assert_eq!(n, 0);
        assert!(losses
            .weighted_sum(&RegularizationWeights::default())
            .is_none());
        // With nothing to compute, not even the inputs are looked at.
        let nonsense = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        assert!(regularizer(
            &models,
            LossVariant::Paper,
            RegularizationTerms {
                embedding: false,
                attention: false
            }
        )
        .losses(&models.pair, &nonsense, &nonsense, &nonsense)
        .is_ok());
    }

    #[test]
    fn mismatched_inputs_are_refused() {
        let models = tiny_models();
        let (latents, timesteps) = inputs();
        let mut reg = regularizer(
            &models,
            LossVariant::Reference,
            RegularizationTerms::default(),
        );
        let short = Tensor::zeros([31], (Kind::Float, Device::Cpu));
        assert!(reg
            .losses(&models.pair, &short, &latents, &timesteps)
            .is_err());
        let e = reg
            .losses(
                &models.pair,
                &models.category_vector,
                &latents,
                &timesteps.narrow(0, 0, 1).repeat([3]),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 timesteps"), "{e}");
        reg.placeholder_id = 49409;
        let e = reg
            .losses(&models.pair, &models.category_vector, &latents, &timesteps)
            .unwrap_err()
            .to_string();
        assert!(e.contains("49409"), "{e}");
    }
}
