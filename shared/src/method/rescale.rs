//! Embedding rescaling (docs/method.md, "Stage 1" step 7): a learned token vector tends to
//! grow far beyond the norms of real word embeddings, which lets it dominate the
//! prompt. CoRe records ‖S*‖ at one step and holds S* at that norm for a window of
//! later steps, then lets it go.
//!
//! Steps are counted as the reference implementation's `train.py` counts them: 1-based,
//! incremented after each optimizer update, and the rule runs right after that update.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// After the update numbered `record_at`, remember ‖S*‖; after every update numbered
/// `record_at + 1 ..= until`, scale S* back to that norm. Outside the window the rule
/// does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RescaleWindow {
    pub record_at: usize,
    pub until: usize,
}

impl Default for RescaleWindow {
    /// The reference implementation's window: record at step 120, hold through 180.
    fn default() -> Self {
        RescaleWindow {
            record_at: 120,
            until: 180,
        }
    }
}

/// What the rule remembers: the norm recorded at `record_at`, once it has been.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RescaleState {
    /// ‖S*‖ after update `record_at`, as the fp32 value the norm evaluated to.
    pub recorded_norm: Option<f32>,
}

impl RescaleWindow {
    pub fn validate(&self) -> Result<()> {
        if self.record_at == 0 || self.until < self.record_at {
            return Err(Error::InvalidInput(format!(
                "embedding rescaling: the norm must be recorded at a step ≥ 1 and held \
                 until a step not before it, got record_at {} and until {}",
                self.record_at, self.until
            )));
        }
        Ok(())
    }

    /// Whether updates numbered `step` are rescaled.
    pub fn holds(&self, step: usize) -> bool {
        step > self.record_at && step <= self.until
    }

    /// Applies the rule to `embedding` (S*, a leaf that may require grad) right after
    /// update number `step` (1-based).
    pub fn apply(&self, step: usize, embedding: &Tensor, state: &mut RescaleState) -> Result<()> {
        let _guard = tch::no_grad_guard();
        if step == self.record_at {
            state.recorded_norm =
                Some(embedding.norm().to_kind(Kind::Float).f_double_value(&[])? as f32);
        } else if self.holds(step) {
            let recorded = state.recorded_norm.ok_or_else(|| {
                Error::InvalidInput(format!(
                    "embedding rescaling at step {step}: no norm was recorded at step {}",
                    self.record_at
                ))
            })?;
            // The target norm over the current one, evaluated in the embedding's kind
            // as the reference's tensor arithmetic does, then one in-place scaling.
            let scale = Tensor::from(recorded)
                .to_kind(embedding.kind())
                .to_device(embedding.device())
                / embedding.norm();
            let _ = embedding.shallow_clone().g_mul_(&scale);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(t: &Tensor) -> f64 {
        t.norm().double_value(&[])
    }

    #[test]
    fn holds_the_recorded_norm_from_step_121_through_180_only() {
        let window = RescaleWindow::default();
        window.validate().unwrap();
        let s = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let mut state = RescaleState::default();
        let mut norms = vec![5.0];
        for step in 1..=200 {
            // An "update" that grows the vector by 1% per step.
            tch::no_grad(|| {
                let _ = s.shallow_clone().g_mul_scalar_(1.01);
            });
            window.apply(step, &s, &mut state).unwrap();
            norms.push(norm(&s));
        }
        let recorded = state.recorded_norm.unwrap() as f64;
        assert!((recorded - 5.0 * 1.01f64.powi(120)).abs() < 1e-4 * recorded);
        for step in 1..=200usize {
            let (before, now) = (norms[step - 1], norms[step]);
            if (121..=180).contains(&step) {
                assert!(
                    (now - recorded).abs() < 1e-6 * recorded,
                    "step {step}: {now}"
                );
            } else {
                // Outside the window the update's growth goes through untouched.
                assert!(
                    (now / before - 1.01).abs() < 1e-5,
                    "step {step}: {before} → {now}"
                );
            }
        }
        // The direction is kept, and S* stays a trainable leaf.
        let v = Vec::<f32>::try_from(s.detach()).unwrap();
        assert!((v[0] / v[1] - 0.75).abs() < 1e-6);
        assert!(s.requires_grad() && s.is_leaf());
    }

    #[test]
    fn window_bounds() {
        let w = RescaleWindow::default();
        assert!(!w.holds(120) && w.holds(121) && w.holds(180) && !w.holds(181));
        assert!(RescaleWindow {
            record_at: 0,
            until: 5
        }
        .validate()
        .is_err());
        assert!(RescaleWindow {
            record_at: 5,
            until: 4
        }
        .validate()
        .is_err());
        // Rescaling without a recorded norm (a state that was lost) is an error.
        let s = Tensor::from_slice(&[1.0f32]);
        let err = w
            .apply(150, &s, &mut RescaleState::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("step 120"), "{err}");
        // Outside the window nothing happens, even without a record.
        w.apply(181, &s, &mut RescaleState::default()).unwrap();
        w.apply(1, &s, &mut RescaleState::default()).unwrap();
    }

    #[test]
    fn state_serializes() {
        let state = RescaleState {
            recorded_norm: Some(1.25),
        };
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<RescaleState>(&json).unwrap(), state);
    }
}
