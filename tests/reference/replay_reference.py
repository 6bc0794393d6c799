"""Python reference for CoRe's training loops, replaying recorded random inputs.

Written from docs/method.md on top of diffusers/transformers and torch.optim.AdamW,
independently of the Rust code. Run with cwd `tests/reference`:

  run --model DIR --replay REPLAY.safetensors --prompts FILE --placeholder TOKEN
      --category WORD --out OUT.safetensors [hyper-parameter flags]
      Stage 1 (the concept vector S*, with the context regularization) for every
      recorded `stage1.{i}.*` step, then stage 2 (all U-Net parameters, diffusion loss
      only) for every recorded `stage2.{i}.*` step. A step's inputs: `pixels`
      [B,3,H,W] in [-1,1], `posterior_noise` and `noise` [B,4,H/8,W/8], `timesteps`
      i64 [B]; stage-1 steps also `template_index` i64 [1] (a line of FILE).
      Writes `embedding` [D] (S* after stage 1), `stage1_losses` [N,4] (diffusion,
      L_emb, L_attn, total), `stage1_norms` [N] (‖S*‖ after each update and the
      rescaling rule), `stage2_losses` [M] and `unet_delta.<name>` (tuned − base) for
      every U-Net parameter.

  tto --model DIR --tto-inputs IN.safetensors --tto-template T --placeholder TOKEN
      --category WORD --tto-out OUT.safetensors [--tto-lr --tto-lambda-attn ...]
      Test-time optimization: from `embedding` [D], for every recorded `step.{i}.*`
      (`latent_indices` i64 [B] into `latents` [L,4,h,w], already scaled; `noise`;
      `timesteps`), one AdamW step of λ_emb·L_emb + λ_attn·L_attn with T (holding
      `{}` or TOKEN) as the only template. Writes `embedding` (the result) and `losses`
      [N,3] (L_emb, L_attn, total). `run` takes the same --tto-* flags to do this
      first, on the base model, in the same process (one interpreter start fewer).

The concept token is added to transformers' CLIPTokenizer and its vector is appended
to the text encoder's embedding table (a trainable row, the rest frozen), as textual
inversion does. Losses follow docs/method.md: L_emb compares the text encoder outputs of
y* and y_cat at the context positions (start token through end token, without the
concept position); L_attn compares the 16 cross-attention layers' per-token attention
(post-softmax probabilities averaged over heads and query positions) on the step's
noisy latents; the y_cat branch runs under torch.no_grad().
"""

import argparse
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

TRAINING_PROMPT = "a photo of a {}"


class AttentionSwitch:
    """An attn2 processor: plain SDPA attention normally; while `store` is a list, the
    explicit computation that appends the per-token mean probabilities [B, tokens]."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fused = AttnProcessor2_0()
        self.store = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.store is None:
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store.append(probs.reshape(batch, attn.heads, probs.shape[1], probs.shape[2]).mean(dim=(1, 2)))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


class SplicedEmbedding(torch.nn.Module):
    """The token embedding table with the concept's vector as one extra row."""

    def __init__(self, table, vector):
        super().__init__()
        self.table = table
        self.vector = vector

    def forward(self, ids):
        return F.embedding(ids, torch.cat([self.table.weight, self.vector[None].to(self.table.weight.dtype)]))


class Models:
    def __init__(self, model_dir, placeholder, category):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
        self.tokenizer.add_tokens(placeholder)
        self.placeholder = placeholder
        self.category = category
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(placeholder)
        category_ids = self.tokenizer.encode(category, add_special_tokens=False)
        if len(category_ids) != 1:
            raise SystemExit(f"category {category!r} is not a single CLIP token")
        self.category_id = category_ids[0]

        self.text_encoder = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder")).eval()
        self.unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet")).eval()
        self.vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae")).eval()
        self.scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        for m in (self.text_encoder, self.unet, self.vae):
            m.requires_grad_(False)
        self.table = self.text_encoder.get_input_embeddings()
        self.switches = {}
        processors = {}
        for name, proc in self.unet.attn_processors.items():
            if "attn2" in name:
                processors[name] = self.switches[name] = AttentionSwitch()
            else:
                processors[name] = proc
        self.unet.set_attn_processor(processors)

    def ids(self, prompt):
        return self.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    def hidden(self, ids, vector):
        """last_hidden_state [1,77,D] with the concept's id reading `vector`."""
        self.text_encoder.set_input_embeddings(SplicedEmbedding(self.table, vector))
        try:
            return self.text_encoder(ids).last_hidden_state
        finally:
            self.text_encoder.set_input_embeddings(self.table)

    def unet_attention(self, latents, timesteps, hidden):
        """The 16 cross-attention layers' per-token means, [B,77] each."""
        store = []
        for switch in self.switches.values():
            switch.store = store
        try:
            self.unet(latents, timesteps, encoder_hidden_states=hidden.repeat(latents.shape[0], 1, 1))
        finally:
            for switch in self.switches.values():
                switch.store = None
        return store

    @torch.no_grad()
    def latents(self, pixels, posterior_noise):
        dist = self.vae.encode(pixels).latent_dist
        return (dist.mean + dist.std * posterior_noise) * self.vae.config.scaling_factor

    def diffusion_loss(self, latents, noise, timesteps, hidden):
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise SystemExit(f"unsupported prediction type {prediction_type}")
        pred = self.unet(noisy, timesteps, encoder_hidden_states=hidden.repeat(latents.shape[0], 1, 1)).sample
        return F.mse_loss(pred.float(), target.float(), reduction="mean"), noisy

    def context_positions(self, template):
        """y*, y_cat ids and the kept positions (start through end token, without the
        concept position)."""
        concept = self.ids(template.format(self.placeholder))
        reference = self.ids(template.format(self.category))
        position = (concept[0] == self.placeholder_id).nonzero().flatten()
        end = (concept[0] == self.tokenizer.eos_token_id).nonzero().flatten()
        assert len(position) == 1 and len(end) >= 1, template
        assert (reference[0, : end[0] + 1] != concept[0, : end[0] + 1]).sum() == 1, template
        kept = torch.tensor([i for i in range(int(end[0]) + 1) if i != int(position[0])])
        return concept, reference, kept

    def context_losses(self, template, vector, noisy, timesteps, variant, use_emb, use_attn):
        concept, reference, kept = self.context_positions(template)
        concept_hidden = self.hidden(concept, vector)
        with torch.no_grad():
            reference_hidden = self.text_encoder(reference).last_hidden_state
        zero = torch.zeros((), dtype=torch.float32)
        l_emb, l_attn = zero, zero
        if use_emb:
            a = concept_hidden.float()[:, kept]
            b = reference_hidden.float()[:, kept]
            if variant == "reference":
                # One cosine per hidden channel, along the token axis.
                l_emb = 1 - F.cosine_similarity(a, b, dim=1).mean()
            else:
                # Eq. 3: one cosine per token over the features.
                l_emb = (1 - F.cosine_similarity(a, b, dim=2)).mean()
        if use_attn:
            concept_means = torch.stack(self.unet_attention(noisy, timesteps, concept_hidden)).float()[:, :, kept]
            with torch.no_grad():
                reference_means = torch.stack(self.unet_attention(noisy, timesteps, reference_hidden)).float()[
                    :, :, kept
                ]
            if variant == "reference":
                # Per layer and sample an MSE over tokens; mean over layers; sum over samples.
                per_layer_sample = ((concept_means - reference_means) ** 2).mean(dim=2)
                l_attn = per_layer_sample.mean(dim=0).sum()
            else:
                # Eq. 4: layer-averaged attention, then mean squared difference.
                l_attn = ((concept_means.mean(dim=0) - reference_means.mean(dim=0)) ** 2).mean()
        return l_emb, l_attn


def adamw(params, args, lr):
    return torch.optim.AdamW(
        params, lr=lr, betas=(args.beta1, args.beta2), eps=args.eps, weight_decay=args.weight_decay
    )


def check_finite(name, value):
    if not torch.isfinite(value):
        raise SystemExit(f"{name} is not finite: {value}")


def recorded_step(replay, stage, i):
    """Step i's inputs of `stage` ("stage1" or "stage2") from a replay mapping, by the
    names after the `{stage}.{i}.` prefix."""
    prefix = f"{stage}.{i}."
    return {k[len(prefix) :]: v for k, v in replay.items() if k.startswith(prefix)}


def stage1_step(models, args, vector, optimizer, step, template, number):
    """One stage-1 update of `vector` (S*) on a recorded step's inputs with one
    regularization template; returns [diffusion, L_emb, L_attn, total]."""
    latents = models.latents(step["pixels"], step["posterior_noise"])
    hidden = models.hidden(models.ids(TRAINING_PROMPT.format(args.placeholder)), vector)
    diffusion, noisy = models.diffusion_loss(latents, step["noise"], step["timesteps"], hidden)
    l_emb, l_attn = models.context_losses(
        template, vector, noisy, step["timesteps"], args.variant, not args.no_emb_loss, not args.no_attn_loss
    )
    total = diffusion + args.lambda_emb * l_emb + args.lambda_attn * l_attn
    check_finite(f"stage-1 loss at step {number}", total)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return [diffusion.item(), l_emb.item(), l_attn.item(), total.item()]


def stage2_start(models, args, vector):
    """Unfreezes the U-Net; returns its AdamW and the frozen conditioning [1,77,D] of
    the training prompt with S* = `vector`."""
    models.unet.requires_grad_(True)
    models.unet.train()
    optimizer = adamw(list(models.unet.parameters()), args, args.stage2_lr)
    with torch.no_grad():
        hidden = models.hidden(models.ids(TRAINING_PROMPT.format(args.placeholder)), vector)
    return optimizer, hidden


def stage2_step(models, optimizer, step, hidden, number):
    """One stage-2 update of every U-Net parameter on a recorded step's inputs;
    returns the diffusion loss."""
    latents = models.latents(step["pixels"], step["posterior_noise"])
    loss, _ = models.diffusion_loss(latents, step["noise"], step["timesteps"], hidden)
    check_finite(f"stage-2 loss at step {number}", loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def run(args):
    models = Models(args.model, args.placeholder, args.category)
    if args.tto_inputs:
        # Before stage 2 changes the U-Net: test-time optimization on the base model.
        tto(args, models)
    replay = load_file(args.replay)
    with open(args.prompts) as f:
        templates = [line.strip() for line in f if line.strip()]
    count = lambda stage: len({k.split(".")[1] for k in replay if k.startswith(stage + ".")})

    vector = models.table.weight[models.category_id].detach().clone().requires_grad_(True)
    optimizer = adamw([vector], args, args.stage1_lr)
    recorded_norm = None
    stage1_losses, stage1_norms = [], []
    for i in range(count("stage1")):
        step = recorded_step(replay, "stage1", i)
        template = templates[int(step["template_index"].item())]
        global_step = i + 1
        stage1_losses.append(stage1_step(models, args, vector, optimizer, step, template, global_step))
        with torch.no_grad():
            if args.rescale_record_at is not None:
                if global_step == args.rescale_record_at:
                    recorded_norm = vector.norm()
                elif args.rescale_record_at < global_step <= args.rescale_until:
                    vector.mul_(recorded_norm / vector.norm())
            stage1_norms.append(vector.norm().item())

    vector = vector.detach()
    base = {name: p.detach().clone() for name, p in models.unet.named_parameters()}
    optimizer, hidden = stage2_start(models, args, vector)
    stage2_losses = [
        stage2_step(models, optimizer, recorded_step(replay, "stage2", i), hidden, i + 1)
        for i in range(count("stage2"))
    ]

    out = {
        "embedding": vector,
        "stage1_losses": torch.tensor(stage1_losses, dtype=torch.float32).reshape(-1, 4),
        "stage1_norms": torch.tensor(stage1_norms, dtype=torch.float32),
        "stage2_losses": torch.tensor(stage2_losses, dtype=torch.float32),
    }
    for name, p in models.unet.named_parameters():
        out[f"unet_delta.{name}"] = (p.detach() - base[name]).contiguous()
    save_file(out, args.out)


def tto(args, models):
    inputs = load_file(args.tto_inputs)
    template = args.tto_template.replace(args.placeholder, "{}")
    vector = inputs["embedding"].detach().clone().requires_grad_(True)
    optimizer = adamw([vector], args, args.tto_lr)
    steps = len({k.split(".")[1] for k in inputs if k.startswith("step.")})
    losses = []
    for i in range(steps):
        indices = inputs[f"step.{i}.latent_indices"]
        timesteps = inputs[f"step.{i}.timesteps"]
        noisy = models.scheduler.add_noise(inputs["latents"][indices], inputs[f"step.{i}.noise"], timesteps)
        l_emb, l_attn = models.context_losses(template, vector, noisy, timesteps, args.variant, True, True)
        total = args.lambda_emb * l_emb + args.tto_lambda_attn * l_attn
        check_finite(f"test-time loss at step {i + 1}", total)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append([l_emb.item(), l_attn.item(), total.item()])
    save_file(
        {"embedding": vector.detach(), "losses": torch.tensor(losses, dtype=torch.float32).reshape(-1, 3)},
        args.tto_out,
    )


def hyperparameter_flags(p):
    """The model, concept and loss/optimizer flags `run`, `tto` and the benchmark share."""
    p.add_argument("--model", required=True)
    p.add_argument("--placeholder", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--variant", choices=["reference", "paper"], default="reference")
    p.add_argument("--lambda-emb", type=float, default=1.5e-4)
    p.add_argument("--lambda-attn", type=float, default=0.05)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--weight-decay", type=float, default=1e-2)


def training_flags(p):
    """The flags of the two training stages."""
    p.add_argument("--stage1-lr", type=float, default=5e-3)
    p.add_argument("--stage2-lr", type=float, default=2e-6)
    p.add_argument("--no-emb-loss", action="store_true")
    p.add_argument("--no-attn-loss", action="store_true")


def main():
    parser = argparse.ArgumentParser(prog="replay_reference")
    sub = parser.add_subparsers(dest="command", required=True)

    def tto_flags(p, required):
        p.add_argument("--tto-inputs", required=required)
        p.add_argument("--tto-template", required=required)
        p.add_argument("--tto-out", required=required)
        p.add_argument("--tto-lr", type=float, default=5e-4)
        p.add_argument("--tto-lambda-attn", type=float, default=0.05)

    r = sub.add_parser("run")
    hyperparameter_flags(r)
    training_flags(r)
    tto_flags(r, False)
    r.add_argument("--out", required=True)
    r.add_argument("--replay", required=True)
    r.add_argument("--prompts", required=True)
    r.add_argument("--rescale-record-at", type=int, default=None)
    r.add_argument("--rescale-until", type=int, default=None)

    t = sub.add_parser("tto")
    hyperparameter_flags(t)
    tto_flags(t, True)

    args = parser.parse_args()
    # The tiny test model's operations are too small to gain from threads, and
    # spinning threads slow a loaded machine down several times over.
    torch.set_num_threads(1)
    if args.command == "run":
        if (args.rescale_record_at is None) != (args.rescale_until is None):
            raise SystemExit("--rescale-record-at and --rescale-until go together")
        run(args)
    else:
        tto(args, Models(args.model, args.placeholder, args.category))


if __name__ == "__main__":
    main()
