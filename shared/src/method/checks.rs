//! What every optimization in `method/` refuses before and during its steps: frozen
//! parts that would collect gradients, unusable loss weights, malformed batches and
//! losses that are NaN or infinite (a diverged run fails rather than writing a
//! broken artifact).

use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::method::regularization::RegularizationWeights;
use crate::{Error, Result};

/// λ_emb and λ_attn must be finite and non-negative.
pub(crate) fn check_weights(weights: &RegularizationWeights) -> Result<()> {
    for (name, value) in [("λ_emb", weights.embedding), ("λ_attn", weights.attention)] {
        if !(value.is_finite() && value >= 0.0) {
            return Err(Error::InvalidInput(format!(
                "{name} must be a finite non-negative number, got {value}"
            )));
        }
    }
    Ok(())
}

/// Refuses a component whose weights would collect gradients: the stages train S* (or
/// the U-Net) only, and a trainable frozen part would build graphs for nothing.
pub(crate) fn check_frozen(component: &str, vars: &VarStore) -> Result<()> {
    if vars.trainable_variables().iter().any(Tensor::requires_grad) {
        return Err(Error::InvalidInput(format!(
            "the {component}'s weights require gradients; freeze them (VarStore::freeze) first"
        )));
    }
    Ok(())
}

/// The loss value of a step, or an error naming the step if it is NaN or infinite: a
/// diverged run must fail rather than write a broken artifact.
pub(crate) fn finite_value(what: &str, step: usize, loss: &Tensor) -> Result<f64> {
    let value = loss.f_double_value(&[])?;
    if !value.is_finite() {
        return Err(Error::InvalidInput(format!(
            "{what} at step {step} is {value}: training diverged or its inputs hold NaN/Inf"
        )));
    }
    Ok(value)
}

/// Checks a step's images and draws against each other and the schedule.
pub(crate) fn check_batch(
    pixels: &Tensor,
    posterior_noise: &Tensor,
    noise: &Tensor,
    timesteps: &Tensor,
    num_train_timesteps: usize,
) -> Result<()> {
    let invalid = |message: String| Err(Error::InvalidInput(format!("training batch: {message}")));
    let size = pixels.size();
    let (batch, height, width) = match size[..] {
        [b, 3, h, w] if b > 0 && h % 8 == 0 && w % 8 == 0 => (b, h, w),
        _ => {
            return invalid(format!(
                "pixels must be [batch, 3, height, width] with sides a multiple of 8, got {size:?}"
            ))
        }
    };
    let latent = [batch, 4, height / 8, width / 8];
    for (name, t) in [("posterior noise", posterior_noise), ("noise", noise)] {
        if t.size() != latent {
            return invalid(format!(
                "{name} must be {latent:?} for pixels {size:?}, got {:?}",
                t.size()
            ));
        }
    }
    if timesteps.size() != [batch] || timesteps.kind() != Kind::Int64 {
        return invalid(format!(
            "timesteps must be i64 [{batch}], got {:?} {:?}",
            timesteps.kind(),
            timesteps.size()
        ));
    }
    let (low, high) = (
        timesteps.min().int64_value(&[]),
        timesteps.max().int64_value(&[]),
    );
    if low < 0 || high >= num_train_timesteps as i64 {
        return invalid(format!(
            "timesteps must lie in [0, {num_train_timesteps}), got {low}..={high}"
        ));
    }
    Ok(())
}
