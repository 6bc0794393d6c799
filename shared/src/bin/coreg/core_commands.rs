//! `coreg core …`: CoRe's method on tensors from a file, for parity checks against a
//! Python reference and for looking at the losses of a given prompt pair.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Context};
use clap::Subcommand;
use coreg::method::context::ContextPair;
use coreg::method::losses::LossVariant;
use coreg::method::regularization::{
    ContextRegularizer, RegularizationTerms, RegularizationWeights,
};
use coreg::model::tokenizer::MAX_TOKENS;
use coreg::model::{LoadOptions, ModelFolder};
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum CoreCommand {
    /// Compute the context regularization losses of one prompt pair and their gradient
    /// with respect to the concept embedding.
    ///
    /// IN holds concept_ids i64 [1,77] (the placeholder is the first added token id,
    /// the text encoder's vocabulary size), reference_ids i64 [1,77], concept_embedding
    /// f32 [D], latents f32 [B,4,h,w] (already noised) and timesteps i64 [B]. OUT gets
    /// loss_emb and loss_attn (unweighted fp32 scalars) and grad_emb f32 [D], the
    /// gradient of lambda_emb·loss_emb + lambda_attn·loss_attn.
    Losses {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// `reference` (the released code's reductions) or `paper` (Eqs. 3 and 4).
        #[arg(long, default_value_t = LossVariant::Reference)]
        variant: LossVariant,
        #[arg(long, default_value_t = RegularizationWeights::default().embedding)]
        lambda_emb: f64,
        #[arg(long, default_value_t = RegularizationWeights::default().attention)]
        lambda_attn: f64,
    },
}

pub fn run(command: CoreCommand) -> anyhow::Result<()> {
    match command {
        CoreCommand::Losses {
            model,
            inputs,
            out,
            variant,
            lambda_emb,
            lambda_attn,
        } => losses(
            &model,
            &inputs,
            &out,
            variant,
            RegularizationWeights {
                embedding: lambda_emb,
                attention: lambda_attn,
            },
        ),
    }
}

/// The inputs file's tensors, each checked as it is taken.
struct Inputs {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl Inputs {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let tensors = Tensor::read_safetensors(path)
            .with_context(|| format!("reading inputs {}", path.display()))?
            .into_iter()
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }

    fn take(&self, name: &str) -> anyhow::Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| anyhow!("{} holds no `{name}`", self.path.display()))
    }

    fn ids(&self, name: &str) -> anyhow::Result<Tensor> {
        let ids = self.take(name)?;
        ensure!(
            ids.kind() == Kind::Int64 && ids.size() == [1, MAX_TOKENS as i64],
            "`{name}` must be i64 [1,{MAX_TOKENS}], got {:?} {:?}",
            ids.kind(),
            ids.size()
        );
        Ok(ids.shallow_clone())
    }

    /// A finite float tensor, as fp32.
    fn float(&self, name: &str) -> anyhow::Result<Tensor> {
        let t = self.take(name)?;
        ensure!(
            t.is_floating_point(),
            "`{name}` must be a float tensor, got {:?}",
            t.kind()
        );
        let t = t.to_kind(Kind::Float);
        ensure!(
            t.isfinite().all().int64_value(&[]) == 1,
            "`{name}` holds NaN or infinite values"
        );
        Ok(t)
    }
}

fn losses(
    model: &Path,
    inputs: &Path,
    out: &Path,
    variant: LossVariant,
    weights: RegularizationWeights,
) -> anyhow::Result<()> {
    ensure!(
        weights.embedding.is_finite() && weights.attention.is_finite(),
        "the loss weights must be finite numbers"
    );
    let folder = ModelFolder::open(model)?;
    let inputs = Inputs::read(inputs)?;
    let placeholder_id = folder.text_encoder.vocab_size as i64;
    let pair = ContextPair::from_ids(
        &inputs.ids("concept_ids")?,
        &inputs.ids("reference_ids")?,
        placeholder_id,
    )
    .context("`concept_ids` and `reference_ids` are not an aligned prompt pair")?;

    let hidden = folder.text_encoder.hidden_size as i64;
    let concept_embedding = inputs.float("concept_embedding")?;
    ensure!(
        concept_embedding.size() == [hidden],
        "`concept_embedding` must be [{hidden}] (the text encoder's width), got {:?}",
        concept_embedding.size()
    );
    let latents = inputs.float("latents")?;
    let channels = folder.unet.in_channels as i64;
    let batch = match latents.size()[..] {
        [batch, c, h, w] if batch > 0 && c == channels && h > 0 && w > 0 => batch,
        ref size => anyhow::bail!("`latents` must be [B,{channels},h,w], got {size:?}"),
    };
    let timesteps = inputs.take("timesteps")?;
    ensure!(
        timesteps.kind() == Kind::Int64 && timesteps.size() == [batch],
        "`timesteps` must be i64 [B] = [{batch}], got {:?} {:?}",
        timesteps.kind(),
        timesteps.size()
    );
    let train_steps = folder.scheduler.num_train_timesteps as i64;
    ensure!(
        timesteps.min().int64_value(&[]) >= 0 && timesteps.max().int64_value(&[]) < train_steps,
        "`timesteps` must lie in [0, {train_steps})"
    );

    let options = LoadOptions::default();
    let mut text_encoder = folder.load_text_encoder(&options)?;
    let mut unet = folder.load_unet(&options)?;
    // Only the concept embedding is differentiated.
    text_encoder.vars.freeze();
    unet.vars.freeze();

    let s_star = concept_embedding.set_requires_grad(true);
    let regularizer = ContextRegularizer {
        text_encoder: &text_encoder.model,
        unet: &unet.model,
        placeholder_id,
        variant,
        terms: RegularizationTerms::default(),
    };
    let losses = regularizer.losses(&pair, &s_star, &latents, timesteps)?;
    let total = losses
        .weighted_sum(&weights)
        .context("both losses are switched on, so there is a total")?;
    total.f_backward()?;
    let (Some(loss_emb), Some(loss_attn)) = (losses.embedding, losses.attention) else {
        anyhow::bail!("both losses are switched on, yet one is missing");
    };
    let outputs = [
        ("loss_emb", loss_emb.detach()),
        ("loss_attn", loss_attn.detach()),
        ("grad_emb", s_star.grad()),
    ]
    .map(|(name, t)| {
        (
            name,
            t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous(),
        )
    });
    Tensor::write_safetensors(&outputs, out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
