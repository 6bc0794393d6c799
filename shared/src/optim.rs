//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"), computed
//! operation for operation as `torch.optim.AdamW`'s single-tensor path does it, so that
//! a run here and the reference implementation's run take the same steps.
//!
//! The optimizer works on any list of named parameters: the one concept vector of
//! stage 1 and test-time optimization, or every U-Net variable of stage 2. Its state
//! (the step count and both moments) can be read out and restored, so a checkpointed
//! run resumes exactly.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::{Error, Result};

/// AdamW's hyper-parameters; the defaults are torch's and CoRe's (docs/method.md, "Stage 1").
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    #[serde(rename = "learning_rate", alias = "lr")]
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// The defaults with learning rate `lr`.
    pub fn with_lr(lr: f64) -> Self {
        AdamWConfig {
            lr,
            ..Default::default()
        }
    }

    /// Rejects values torch's AdamW rejects, naming the offending one.
    pub fn validate(&self) -> Result<()> {
        let invalid = |what: &str, value: f64| {
            Err(Error::InvalidInput(format!(
                "AdamW: invalid {what} {value}"
            )))
        };
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return invalid("learning rate", self.lr);
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return invalid("beta1 (must lie in [0, 1))", self.beta1);
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return invalid("beta2 (must lie in [0, 1))", self.beta2);
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return invalid("epsilon", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return invalid("weight decay", self.weight_decay);
        }
        Ok(())
    }
}

/// What AdamW remembers between steps: how many updates it made and, per parameter
/// name, the running first (`exp_avg`) and second (`exp_avg_sq`) moments.
#[derive(Debug)]
pub struct AdamWState {
    pub step: u64,
    pub exp_avg: BTreeMap<String, Tensor>,
    pub exp_avg_sq: BTreeMap<String, Tensor>,
}

const EXP_AVG: &str = "exp_avg.";
const EXP_AVG_SQ: &str = "exp_avg_sq.";

impl AdamWState {
    /// The moments as named tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`) for a
    /// safetensors file; the step count travels separately, with a run's scalars.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let named = |prefix: &str, moments: &BTreeMap<String, Tensor>| {
            moments
                .iter()
                .map(|(name, t)| (format!("{prefix}{name}"), t.shallow_clone()))
                .collect::<Vec<_>>()
        };
        let mut tensors = named(EXP_AVG, &self.exp_avg);
        tensors.extend(named(EXP_AVG_SQ, &self.exp_avg_sq));
        tensors
    }

    /// The inverse of [`AdamWState::named_tensors`]; names with neither prefix are
    /// an error.
    pub fn from_named_tensors(
        step: u64,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) -> Result<Self> {
        let mut state = AdamWState {
            step,
            exp_avg: BTreeMap::new(),
            exp_avg_sq: BTreeMap::new(),
        };
        for (name, tensor) in tensors {
            if let Some(param) = name.strip_prefix(EXP_AVG_SQ) {
                state.exp_avg_sq.insert(param.to_string(), tensor);
            } else if let Some(param) = name.strip_prefix(EXP_AVG) {
                state.exp_avg.insert(param.to_string(), tensor);
            } else {
                return Err(Error::InvalidInput(format!(
                    "optimizer state: unexpected tensor {name:?}"
                )));
            }
        }
        Ok(state)
    }
}

#[derive(Debug)]
struct Parameter {
    name: String,
    value: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over named parameters (tensors that require gradients; the optimizer holds
/// shallow clones, so updates land in the caller's tensors and `VarStore`s).
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Parameter>,
    step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let mut seen = std::collections::HashSet::new();
        let params = params
            .into_iter()
            .map(|(name, value)| {
                if !seen.insert(name.clone()) {
                    return Err(Error::InvalidInput(format!(
                        "AdamW: parameter {name:?} given twice"
                    )));
                }
                if !value.is_floating_point() {
                    return Err(Error::InvalidInput(format!(
                        "AdamW: parameter {name:?} is {:?}, not floating point",
                        value.kind()
                    )));
                }
                let _guard = tch::no_grad_guard();
                Ok(Parameter {
                    name,
                    exp_avg: value.zeros_like(),
                    exp_avg_sq: value.zeros_like(),
                    value,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            config,
            params,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// How many updates have been made.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update from the gradients autograd left on the parameters. Every parameter
    /// must have one: torch would skip a parameter without a gradient and keep a step
    /// count per parameter, which this optimizer, with one count for all, does not.
    pub fn step(&mut self) -> Result<()> {
        if let Some(p) = self.params.iter().find(|p| !p.value.grad().defined()) {
            return Err(Error::InvalidInput(format!(
                "AdamW: parameter {:?} received no gradient",
                p.name
            )));
        }
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.value.grad()).collect();
        self.update(&grads);
        Ok(())
    }

    /// One update from gradients computed elsewhere, one per parameter in the order
    /// the optimizer was given them, each of its parameter's shape (mixed precision
    /// computes them on a half-precision copy of the weights).
    pub fn step_with_gradients(&mut self, grads: &[Tensor]) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::InvalidInput(format!(
                "AdamW: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        if let Some((p, g)) = self
            .params
            .iter()
            .zip(grads)
            .find(|(p, g)| g.size() != p.value.size())
        {
            return Err(Error::InvalidInput(format!(
                "AdamW: the gradient of {:?} has shape {:?}, the parameter {:?}",
                p.name,
                g.size(),
                p.value.size()
            )));
        }
        self.update(grads);
        Ok(())
    }

    fn update(&mut self, grads: &[Tensor]) {
        let AdamWConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        self.step += 1;
        // torch evaluates the bias corrections in Python floats (double precision).
        let step = self.step as f64;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2_sqrt = (1.0 - beta2.powf(step)).sqrt();
        let step_size = lr / bias_correction1;
        let _guard = tch::no_grad_guard();
        for (p, grad) in self.params.iter_mut().zip(grads) {
            let grad = grad.to_kind(p.value.kind());
            // Decoupled weight decay: shrink the weights before the Adam update.
            let _ = p.value.g_mul_scalar_(1.0 - lr * weight_decay);
            let _ = p.exp_avg.lerp_(&grad, 1.0 - beta1);
            let _ = p.exp_avg_sq.g_mul_scalar_(beta2);
            // addcmul_(grad, grad, value=1−β₂) computes value·t1·t2 in that order.
            let _ = p.exp_avg_sq.g_add_(&(&grad * (1.0 - beta2) * &grad));
            let denom = p.exp_avg_sq.sqrt() / bias_correction2_sqrt + eps;
            // addcdiv_(m, denom, value=−step_size) computes (value·m)/denom.
            let _ = p.value.g_add_(&(&p.exp_avg * -step_size / denom));
        }
    }

    /// The parameters' names, in the order [`AdamW::step_with_gradients`] takes
    /// gradients.
    pub fn parameter_names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    /// Zeroes every parameter's gradient so that the next backward starts from
    /// nothing (tch cannot unset a gradient as torch's `set_to_none` does; the next
    /// update sees the same values either way).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut grad = p.value.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// A copy of the optimizer's state.
    pub fn state(&self) -> AdamWState {
        let copy = |f: fn(&Parameter) -> &Tensor| {
            self.params
                .iter()
                .map(|p| (p.name.clone(), f(p).copy()))
                .collect()
        };
        AdamWState {
            step: self.step,
            exp_avg: copy(|p| &p.exp_avg),
            exp_avg_sq: copy(|p| &p.exp_avg_sq),
        }
    }

    /// Restores a state read back from [`AdamW::state`]: it must hold both moments
    /// for exactly this optimizer's parameters, with their shapes.
    pub fn load_state(&mut self, state: &AdamWState) -> Result<()> {
        for moments in [&state.exp_avg, &state.exp_avg_sq] {
            if moments.len() != self.params.len() {
                return Err(Error::InvalidInput(format!(
                    "optimizer state holds {} tensors per moment, the optimizer has {} parameters",
                    moments.len(),
                    self.params.len()
                )));
            }
        }
        for p in &self.params {
            for (which, moments) in [
                ("exp_avg", &state.exp_avg),
                ("exp_avg_sq", &state.exp_avg_sq),
            ] {
                let saved = moments.get(&p.name).ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "optimizer state lacks {which} of parameter {:?}",
                        p.name
                    ))
                })?;
                if saved.size() != p.value.size() {
                    return Err(Error::InvalidInput(format!(
                        "optimizer state: {which} of {:?} has shape {:?}, the parameter {:?}",
                        p.name,
                        saved.size(),
                        p.value.size()
                    )));
                }
            }
        }
        let _guard = tch::no_grad_guard();
        for p in &mut self.params {
            p.exp_avg.copy_(&state.exp_avg[&p.name]);
            p.exp_avg_sq.copy_(&state.exp_avg_sq[&p.name]);
        }
        self.step = state.step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn vector(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    /// Sets the gradient of `p` to `g` as backward would.
    fn give_gradient(p: &Tensor, g: &[f32]) {
        (p * Tensor::from_slice(g)).sum(Kind::Float).backward();
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.detach()).unwrap()
    }

    /// Three steps of `torch.optim.AdamW([p], lr=0.1, weight_decay=0.05)` (torch
    /// 2.11.0, CPU, float32) from p = [1, −2, 0.5, 3] with gradients
    /// [0.3, −0.1, 2.0, 0.0], [−0.5, 0.2, 1.0, 1e-9], [0.25, 0.25, −3.0, 0.0]
    /// (the 1e-9 probes ε), printed with `p.tolist()` after each step.
    const TORCH: [[f32; 4]; 3] = [
        [0.895_000_04, -1.89, 0.3975, 2.985_000_1],
        [0.919_881_17, -1.917_160_4, 0.302_294_55, 2.965_159_7],
        [0.910_949_7, -1.974_062, 0.308_980_76, 2.947_194],
    ];

    #[test]
    fn matches_torch_adamw() {
        let p = vector(&[1.0, -2.0, 0.5, 3.0]);
        let config = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.05,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], config).unwrap();
        let grads = [
            [0.3, -0.1, 2.0, 0.0],
            [-0.5, 0.2, 1.0, 1e-9],
            [0.25, 0.25, -3.0, 0.0],
        ];
        for (g, want) in grads.iter().zip(TORCH) {
            give_gradient(&p, g);
            opt.step().unwrap();
            opt.zero_grad();
            let got = values(&p);
            for (a, b) in got.iter().zip(want) {
                assert!(
                    (a - b).abs() <= 2e-7 * b.abs().max(1.0),
                    "{got:?} vs {want:?}"
                );
            }
        }
        assert_eq!(opt.step_count(), 3);
    }

    #[test]
    fn state_round_trips_and_resumes_identically() {
        let config = AdamWConfig::with_lr(0.05);
        let run = |split: bool| {
            let p = vector(&[0.5, -0.5, 2.0]);
            let mut opt = AdamW::new(vec![("v".into(), p.shallow_clone())], config).unwrap();
            for i in 0..6 {
                if split && i == 3 {
                    let state = opt.state();
                    let named = state.named_tensors();
                    let restored = AdamWState::from_named_tensors(state.step, named).unwrap();
                    let resumed_p = p.detach().copy().set_requires_grad(true);
                    let mut fresh =
                        AdamW::new(vec![("v".into(), resumed_p.shallow_clone())], config).unwrap();
                    fresh.load_state(&restored).unwrap();
                    assert_eq!(fresh.step_count(), 3);
                    for j in 3..6 {
                        give_gradient(&resumed_p, &[j as f32, -1.0, 0.1 * j as f32]);
                        fresh.step().unwrap();
                        fresh.zero_grad();
                    }
                    return values(&resumed_p);
                }
                give_gradient(&p, &[i as f32, -1.0, 0.1 * i as f32]);
                opt.step().unwrap();
                opt.zero_grad();
            }
            values(&p)
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn refuses_missing_gradients_and_mismatched_state() {
        let p = vector(&[1.0, 2.0]);
        let mut opt = AdamW::new(
            vec![("p".into(), p.shallow_clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        let err = opt.step().unwrap_err().to_string();
        assert!(err.contains("\"p\" received no gradient"), "{err}");
        assert_eq!(opt.step_count(), 0);

        let wrong = AdamWState {
            step: 1,
            exp_avg: [(
                "p".to_string(),
                Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            )]
            .into(),
            exp_avg_sq: [(
                "p".to_string(),
                Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            )]
            .into(),
        };
        let err = opt.load_state(&wrong).unwrap_err().to_string();
        assert!(err.contains("shape [3]"), "{err}");
        let err = AdamWState::from_named_tensors(0, [("x".to_string(), p.detach())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"x\""), "{err}");
        assert!(AdamW::new(
            vec![
                ("p".into(), p.shallow_clone()),
                ("p".into(), p.shallow_clone())
            ],
            AdamWConfig::default()
        )
        .is_err());
        assert!(AdamWConfig {
            beta2: 1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
