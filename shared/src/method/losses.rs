//! CoRe's two context regularization losses (paper Eqs. 3 and 4), each in the
//! reduction the reference implementation uses (the default: it produced the published
//! numbers) and in the paper's.
//!
//! Both compare the concept prompt y* with the category prompt y_cat at the context
//! positions only (`ContextPair::kept_positions`). They are computed in fp32 whatever
//! the models' precision: half-precision cosines and squared differences of attention
//! probabilities around 1e-3 lose most of their digits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// torch's `F.cosine_similarity` default: norms are clamped to at least this.
const COSINE_EPS: f64 = 1e-8;

/// Which reductions the losses use (docs/method.md, "Stage 1" steps 4 and 5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossVariant {
    /// The released code: L_emb is one cosine per hidden channel along the token axis;
    /// L_attn is a per-layer MSE, averaged over layers and summed over the batch.
    #[default]
    Reference,
    /// The paper: Eq. 3 is a per-token cosine over the features; Eq. 4 compares the
    /// layer-averaged attention, averaged over the batch.
    Paper,
}

impl LossVariant {
    pub fn name(self) -> &'static str {
        match self {
            LossVariant::Reference => "reference",
            LossVariant::Paper => "paper",
        }
    }
}

impl fmt::Display for LossVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossVariant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "reference" => Ok(LossVariant::Reference),
            "paper" => Ok(LossVariant::Paper),
            _ => Err(Error::InvalidInput(format!(
                "unknown loss variant {s:?} (expected reference or paper)"
            ))),
        }
    }
}

/// L_emb, unweighted, as an fp32 scalar: how far the text encoder's outputs for y*
/// (`concept_hidden` [1, 77, D]) are from those for y_cat (`reference_hidden`, same
/// shape) at the `kept` positions (i64 `[K]`).
///
/// - `Reference`: cosine along the token axis, one per hidden channel d over the K
///   kept tokens, loss = 1 − mean_d cos_d.
/// - `Paper` (Eq. 3): cosine over the D features, one per kept token k,
///   loss = mean_k (1 − cos_k).
///
/// Cosines clamp each norm to at least 1e-8, as torch's `cosine_similarity` does.
pub fn context_embedding_loss(
    concept_hidden: &Tensor,
    reference_hidden: &Tensor,
    kept: &Tensor,
    variant: LossVariant,
) -> Tensor {
    let select = |hidden: &Tensor| {
        hidden
            .to_kind(Kind::Float)
            .index_select(1, &kept.to_device(hidden.device()))
    };
    let (concept, reference) = (select(concept_hidden), select(reference_hidden));
    let axis = match variant {
        LossVariant::Reference => 1,
        LossVariant::Paper => 2,
    };
    let cosines = Tensor::cosine_similarity(&concept, &reference, axis, COSINE_EPS);
    1.0 - cosines.mean(Kind::Float)
}

/// L_attn, unweighted, as an fp32 scalar, from the 16 cross-attention layers' per-token
/// attention (post-softmax probabilities averaged over heads and spatial positions), one
/// [B, 77] tensor per layer for y* (`concept_means`) and for y_cat (`reference_means`),
/// compared at the `kept` positions.
///
/// - `Reference`: per layer and sample, the MSE over kept tokens; averaged over layers,
///   **summed** over the batch (the released code's reduction, so it grows with B).
/// - `Paper` (Eq. 4): the per-token values averaged over layers first, then the mean
///   squared difference over kept tokens and over the batch.
///
/// # Panics
/// If the two lists differ in length or are empty, or the tensors' shapes differ.
pub fn context_attention_loss(
    concept_means: &[Tensor],
    reference_means: &[Tensor],
    kept: &Tensor,
    variant: LossVariant,
) -> Tensor {
    assert!(
        !concept_means.is_empty() && concept_means.len() == reference_means.len(),
        "one recorded attention per cross-attention layer for each prompt: got {} and {}",
        concept_means.len(),
        reference_means.len()
    );
    // [L, B, K]
    let stack = |means: &[Tensor]| {
        let stacked = Tensor::stack(means, 0).to_kind(Kind::Float);
        let kept = kept.to_device(stacked.device());
        stacked.index_select(2, &kept)
    };
    let (concept, reference) = (stack(concept_means), stack(reference_means));
    match variant {
        LossVariant::Reference => (concept - reference)
            .square()
            .mean_dim(2i64, false, Kind::Float)
            .mean_dim(0i64, false, Kind::Float)
            .sum(Kind::Float),
        LossVariant::Paper => {
            let layer_mean = |t: Tensor| t.mean_dim(0i64, false, Kind::Float);
            (layer_mean(concept) - layer_mean(reference))
                .square()
                .mean(Kind::Float)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn scalar(t: &Tensor) -> f64 {
        assert_eq!(t.size(), Vec::<i64>::new(), "losses are scalars");
        assert_eq!(t.kind(), Kind::Float);
        t.double_value(&[])
    }

    fn close(got: f64, want: f64) {
        assert!((got - want).abs() < 1e-6, "got {got}, want {want}");
    }

    #[test]
    fn variants_have_names() {
        for v in [LossVariant::Reference, LossVariant::Paper] {
            assert_eq!(v.to_string().parse::<LossVariant>().unwrap(), v);
            let json = serde_json::to_string(&v).unwrap();
            assert_eq!(serde_json::from_str::<LossVariant>(&json).unwrap(), v);
        }
        assert_eq!(
            serde_json::to_string(&LossVariant::Paper).unwrap(),
            "\"paper\""
        );
        assert_eq!(LossVariant::default(), LossVariant::Reference);
        assert!("Paper".parse::<LossVariant>().is_err());
    }

    #[test]
    fn embedding_loss_is_zero_for_identical_context() {
        tch::manual_seed(0);
        let a = Tensor::randn([1, 77, 8], (Kind::Float, Device::Cpu));
        // Only the kept positions matter: change the others freely.
        let b = a.copy();
        let _ = b.narrow(1, 2, 1).fill_(5.0);
        let _ = b.narrow(1, 10, 60).fill_(-3.0);
        let kept = Tensor::from_slice(&[0i64, 1, 3, 4, 5]);
        for v in [LossVariant::Reference, LossVariant::Paper] {
            close(scalar(&context_embedding_loss(&a, &b, &kept, v)), 0.0);
        }
    }

    #[test]
    fn embedding_loss_by_hand() {
        // Two kept tokens (positions 0 and 2), two channels; position 1 is the concept.
        // concept: t0 = (1, 0), t2 = (0, 1); reference: t0 = (1, 1), t2 = (0, 1).
        let hidden = |rows: [[f32; 2]; 3]| Tensor::from_slice(rows.as_flattened()).view([1, 3, 2]);
        let concept = hidden([[1.0, 0.0], [9.0, 9.0], [0.0, 1.0]]);
        let reference = hidden([[1.0, 1.0], [-4.0, 2.0], [0.0, 1.0]]);
        let kept = Tensor::from_slice(&[0i64, 2]);
        // Reference: channel 0 over tokens (1, 0)·(1, 0) → cos 1; channel 1 (0, 1)·(1, 1)
        // → 1/√2. Loss = 1 − (1 + 1/√2)/2.
        let half_sqrt2 = std::f64::consts::FRAC_1_SQRT_2;
        close(
            scalar(&context_embedding_loss(
                &concept,
                &reference,
                &kept,
                LossVariant::Reference,
            )),
            1.0 - (1.0 + half_sqrt2) / 2.0,
        );
        // Paper: token 0 (1, 0)·(1, 1) → 1/√2; token 2 → 1. Loss = mean(1 − cos).
        close(
            scalar(&context_embedding_loss(
                &concept,
                &reference,
                &kept,
                LossVariant::Paper,
            )),
            ((1.0 - half_sqrt2) + 0.0) / 2.0,
        );
        // A zero channel: its norm is clamped to 1e-8, so its cosine is 0, not NaN;
        // channel 1 compares (1, 2) with (1, 1): cos = 3/√10.
        let zero = hidden([[0.0, 1.0], [0.0, 0.0], [0.0, 2.0]]);
        close(
            scalar(&context_embedding_loss(
                &zero,
                &reference,
                &kept,
                LossVariant::Reference,
            )),
            1.0 - (0.0 + 3.0 / 10f64.sqrt()) / 2.0,
        );
    }

    #[test]
    fn embedding_loss_upcasts_half_inputs() {
        tch::manual_seed(1);
        let a = Tensor::randn([1, 77, 16], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([1, 77, 16], (Kind::Float, Device::Cpu));
        let kept = Tensor::arange(9, (Kind::Int64, Device::Cpu));
        let full = context_embedding_loss(&a, &b, &kept, LossVariant::Paper);
        let half = context_embedding_loss(
            &a.to_kind(Kind::Half),
            &b.to_kind(Kind::Half),
            &kept,
            LossVariant::Paper,
        );
        assert_eq!(half.kind(), Kind::Float);
        assert!((scalar(&full) - scalar(&half)).abs() < 1e-2);
    }

    #[test]
    fn attention_loss_by_hand() {
        // Two layers, batch 2, four tokens; kept are tokens 0 and 3.
        let t = |v: [f32; 8]| Tensor::from_slice(&v).view([2, 4]);
        let concept = [
            t([0.5, 9.0, 9.0, 0.1, 0.2, 9.0, 9.0, 0.4]),
            t([0.3, 0.0, 0.0, 0.1, 0.2, 0.0, 0.0, 0.0]),
        ];
        let reference = [
            t([0.4, 0.0, 0.0, 0.3, 0.2, 0.0, 0.0, 0.2]),
            t([0.3, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.2]),
        ];
        let kept = Tensor::from_slice(&[0i64, 3]);
        // Differences at kept tokens, [layer][sample] = (d0, d3):
        // l0: s0 (0.1, −0.2), s1 (0.0, 0.2); l1: s0 (0, 0), s1 (0.2, −0.2).
        // Reference: MSE per (layer, sample): l0 s0 0.025, s1 0.02; l1 s0 0, s1 0.04.
        // Mean over layers: s0 0.0125, s1 0.03; sum over samples 0.0425.
        close(
            scalar(&context_attention_loss(
                &concept,
                &reference,
                &kept,
                LossVariant::Reference,
            )),
            0.0425,
        );
        // Paper: layer-mean differences s0 (0.05, −0.1), s1 (0.1, 0.0); mean of squares
        // (0.0025 + 0.01 + 0.01 + 0) / 4.
        close(
            scalar(&context_attention_loss(
                &concept,
                &reference,
                &kept,
                LossVariant::Paper,
            )),
            0.005625,
        );
        for v in [LossVariant::Reference, LossVariant::Paper] {
            close(
                scalar(&context_attention_loss(&concept, &concept, &kept, v)),
                0.0,
            );
        }
    }

    #[test]
    fn reference_attention_loss_sums_over_the_batch() {
        tch::manual_seed(2);
        let one: Vec<Tensor> = (0..3)
            .map(|_| Tensor::rand([1, 77], (Kind::Float, Device::Cpu)))
            .collect();
        let other: Vec<Tensor> = (0..3)
            .map(|_| Tensor::rand([1, 77], (Kind::Float, Device::Cpu)))
            .collect();
        let twice =
            |means: &[Tensor]| -> Vec<Tensor> { means.iter().map(|m| m.repeat([2, 1])).collect() };
        let kept = Tensor::arange(7, (Kind::Int64, Device::Cpu));
        let loss = |a: &[Tensor], b: &[Tensor], v| scalar(&context_attention_loss(a, b, &kept, v));
        let single = loss(&one, &other, LossVariant::Reference);
        assert!(single > 0.0);
        close(
            loss(&twice(&one), &twice(&other), LossVariant::Reference),
            2.0 * single,
        );
        close(
            loss(&twice(&one), &twice(&other), LossVariant::Paper),
            loss(&one, &other, LossVariant::Paper),
        );
    }
}
