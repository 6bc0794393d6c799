//! diffusers' `Attention` as the U-Net's transformer blocks use it: `to_q`, `to_k`,
//! `to_v` without bias, `to_out.0` with bias, no norms, no residual.
//!
//! Two ways to compute it: [`Attention::forward`] runs libtorch's fused
//! scaled-dot-product attention and never materializes the probabilities;
//! [`Attention::forward_recording`] computes them explicitly (scores → softmax →
//! probabilities) and also returns their mean over heads and query positions, the
//! per-token quantity CoRe's attention regularization compares. Only the second one
//! builds the `[B, heads, queries, keys]` tensor, so callers pay for it only when a loss
//! needs it.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

#[cfg(test)]
thread_local! {
    /// How often this thread materialized attention probabilities, so that tests can
    /// prove a forward without recording never does.
    static EXPLICIT_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The number of explicit (probability-materializing) attention computations this
/// thread has run.
#[cfg(test)]
pub(crate) fn explicit_attention_calls() -> usize {
    EXPLICIT_CALLS.with(std::cell::Cell::get)
}

#[derive(Debug)]
pub struct Attention {
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
    heads: i64,
    head_dim: i64,
    scale: f64,
}

impl Attention {
    /// `context_dim` is the width of the states attended to (`cross_attention_dim` for
    /// cross-attention), `None` for self-attention.
    ///
    /// There is no `upcast_attention` switch: the explicit path always computes scores
    /// and softmax in at least fp32 (docs/method.md: fp32 softmax whenever the weights are
    /// half precision), which covers what that diffusers flag asks for.
    pub fn new(
        p: nn::Path,
        query_dim: i64,
        context_dim: Option<i64>,
        heads: i64,
        head_dim: i64,
    ) -> Self {
        let inner_dim = heads * head_dim;
        let context_dim = context_dim.unwrap_or(query_dim);
        let no_bias = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        Self {
            to_q: nn::linear(&p / "to_q", query_dim, inner_dim, no_bias),
            to_k: nn::linear(&p / "to_k", context_dim, inner_dim, no_bias),
            to_v: nn::linear(&p / "to_v", context_dim, inner_dim, no_bias),
            to_out: nn::linear(&p / "to_out" / 0, inner_dim, query_dim, Default::default()),
            heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        }
    }

    /// Attention of `xs` [B, N, query_dim] over `context` [B, M, context_dim] (over `xs`
    /// itself when `None`), without materializing the probabilities.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        let (q, k, v) = self.heads_qkv(xs, context);
        // libtorch's SDPA kernels (flash and memory-efficient on CUDA, flash on CPU, and
        // the math fallback unless `allow_fp16_bf16_reduction_math_sdp` is switched on)
        // accumulate scores and softmax in fp32 for fp16/bf16 inputs, so this path needs
        // no explicit upcast; `fast_path_keeps_half_scores_in_fp32` checks it.
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<&Tensor>,
            0.0,
            false,
            self.scale,
            false,
        );
        self.to_out.forward(&self.merge_heads(&out))
    }

    /// Like [`Self::forward`], computed explicitly, also returning the post-softmax
    /// probabilities averaged over heads and query positions: [B, M], one value per key
    /// token, in the softmax's precision (fp32 for half-precision weights). The mean
    /// stays on the autograd graph, so a loss on it backpropagates into `context`.
    pub fn forward_recording(&self, xs: &Tensor, context: Option<&Tensor>) -> (Tensor, Tensor) {
        let (q, k, v) = self.heads_qkv(xs, context);
        let probs = self.probabilities(&q, &k);
        let out = probs.to_kind(v.kind()).matmul(&v);
        let per_token = probs.mean_dim([1i64, 2].as_slice(), false, None);
        (self.to_out.forward(&self.merge_heads(&out)), per_token)
    }

    /// softmax(q kᵀ · scale) over the keys: [B, heads, N, M]. fp16/bf16 inputs are
    /// upcast to fp32 first, since half-precision scores of real SD activations can
    /// overflow and a half softmax loses the small probabilities CoRe compares.
    fn probabilities(&self, q: &Tensor, k: &Tensor) -> Tensor {
        #[cfg(test)]
        EXPLICIT_CALLS.with(|calls| calls.set(calls.get() + 1));
        let kind = match q.kind() {
            Kind::Half | Kind::BFloat16 => Kind::Float,
            kind => kind,
        };
        let scores = q.to_kind(kind).matmul(&k.to_kind(kind).transpose(-1, -2)) * self.scale;
        scores.softmax(-1, kind)
    }

    /// The projections split into heads: each [B, heads, tokens, head_dim].
    fn heads_qkv(&self, xs: &Tensor, context: Option<&Tensor>) -> (Tensor, Tensor, Tensor) {
        let context = context.unwrap_or(xs);
        (
            self.split_heads(&self.to_q.forward(xs)),
            self.split_heads(&self.to_k.forward(context)),
            self.split_heads(&self.to_v.forward(context)),
        )
    }

    fn split_heads(&self, xs: &Tensor) -> Tensor {
        let (b, n, _) = xs
            .size3()
            .expect("attention input is [batch, tokens, channels]");
        xs.view([b, n, self.heads, self.head_dim]).transpose(1, 2)
    }

    fn merge_heads(&self, xs: &Tensor) -> Tensor {
        let (b, _, n, _) = xs
            .size4()
            .expect("attention heads are [batch, heads, tokens, head_dim]");
        xs.transpose(1, 2)
            .reshape([b, n, self.heads * self.head_dim])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    fn layer(vs: &VarStore) -> Attention {
        Attention::new(vs.root() / "attn", 8, Some(6), 2, 4)
    }

    #[test]
    fn variable_names_follow_diffusers() {
        let vs = VarStore::new(Device::Cpu);
        let _ = layer(&vs);
        let mut names: Vec<_> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                ("attn.to_k.weight".to_string(), vec![8, 6]),
                ("attn.to_out.0.bias".to_string(), vec![8]),
                ("attn.to_out.0.weight".to_string(), vec![8, 8]),
                ("attn.to_q.weight".to_string(), vec![8, 8]),
                ("attn.to_v.weight".to_string(), vec![8, 6]),
            ]
        );
    }

    #[test]
    fn explicit_path_matches_fused_path_and_averages_probabilities() {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let attn = layer(&vs);
        let xs = Tensor::randn([3, 5, 8], (Kind::Float, Device::Cpu));
        let context = Tensor::randn([3, 7, 6], (Kind::Float, Device::Cpu)) * 3.0;
        let fused = attn.forward(&xs, Some(&context));
        let (explicit, per_token) = attn.forward_recording(&xs, Some(&context));
        assert_eq!(per_token.size(), vec![3, 7]);
        let diff = (&fused - &explicit).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "fused and explicit attention differ by {diff}");
        // Each query's probabilities sum to one, so their mean over queries and heads
        // does too.
        let sums = Vec::<f32>::try_from(per_token.sum_dim_intlist(-1, false, None)).unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");

        let q = attn.split_heads(&attn.to_q.forward(&xs));
        let k = attn.split_heads(&attn.to_k.forward(&context));
        let by_hand = (q.matmul(&k.transpose(-1, -2)) / 2.0)
            .softmax(-1, Kind::Float)
            .mean_dim([1i64, 2].as_slice(), false, None);
        assert!((&per_token - by_hand).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn self_attention_attends_to_its_input() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let attn = Attention::new(vs.root(), 8, None, 2, 4);
        let xs = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
        let (out, per_token) = attn.forward_recording(&xs, None);
        assert_eq!(per_token.size(), vec![2, 5]);
        assert!(
            (attn.forward(&xs, None) - out)
                .abs()
                .max()
                .double_value(&[])
                < 1e-5
        );
    }

    #[test]
    fn recorded_means_carry_gradients_to_the_context() {
        tch::manual_seed(2);
        let vs = VarStore::new(Device::Cpu);
        let attn = layer(&vs);
        let xs = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
        let context = Tensor::randn([2, 7, 6], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let (_, per_token) = attn.forward_recording(&xs, Some(&context));
        let weights = Tensor::randn([2, 7], (Kind::Float, Device::Cpu));
        (per_token * weights).sum(Kind::Float).backward();
        assert!(context.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn half_precision_scores_are_upcast() {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let attn = layer(&vs);
        // Scores around 1e5 overflow fp16 (max 65504) unless computed in fp32.
        let q = Tensor::randn([1, 2, 4, 4], (Kind::Float, Device::Cpu)) * 200.0;
        let k = Tensor::randn([1, 2, 3, 4], (Kind::Float, Device::Cpu)) * 200.0;
        let (q, k) = (q.to_kind(Kind::Half), k.to_kind(Kind::Half));
        let want = attn.probabilities(&q.to_kind(Kind::Double), &k.to_kind(Kind::Double));
        let got = attn.probabilities(&q, &k);
        assert_eq!(got.kind(), Kind::Float);
        let naive = q.matmul(&k.transpose(-1, -2));
        assert!(
            naive.isinf().any().int64_value(&[]) == 1,
            "the test inputs must overflow fp16"
        );
        let err = (got.to_kind(Kind::Double) - want)
            .abs()
            .max()
            .double_value(&[]);
        assert!(err < 1e-2, "upcast probabilities off by {err}");
    }

    #[test]
    fn fast_path_keeps_half_scores_in_fp32() {
        tch::manual_seed(4);
        let half = |t: Tensor| t.to_kind(Kind::Half);
        let q = half(Tensor::randn([1, 2, 4, 4], (Kind::Float, Device::Cpu)) * 200.0);
        let k = half(Tensor::randn([1, 2, 3, 4], (Kind::Float, Device::Cpu)) * 200.0);
        let v = half(Tensor::randn([1, 2, 3, 4], (Kind::Float, Device::Cpu)));
        let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor| {
            Tensor::scaled_dot_product_attention(q, k, v, None::<&Tensor>, 0.0, false, 0.5, false)
        };
        let want = sdpa(
            &q.to_kind(Kind::Double),
            &k.to_kind(Kind::Double),
            &v.to_kind(Kind::Double),
        );
        let got = sdpa(&q, &k, &v);
        let err = (got.to_kind(Kind::Double) - want)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            err < 1e-2,
            "fp16 SDPA off by {err}: scores were not kept in fp32"
        );
    }
}
