"""Python reference for the model stack: diffusers and transformers on random weights.

Two commands, run with cwd `tests/reference` as `python -m model_reference ...`:

  make-model --config NAME --seed N --out DIR
      Builds a randomly initialized Stable Diffusion 2.1-architecture model with
      diffusers/transformers and saves it in diffusers layout under DIR/model (the
      same layout `coreg model init` writes); norm weights are perturbed so they
      matter. Also writes DIR/inputs.safetensors (tokenized prompts, latents, per-sample
      timesteps, pixels) and DIR/expected.safetensors, the `forward` outputs for them.

  forward --model DIR --inputs IN.safetensors --out OUT.safetensors [--check-pipeline]
      Loads DIR with diffusers/transformers (whoever wrote it) and writes, for the
      inputs present, the outputs `coreg model forward` writes under the same names:
      input_ids -> text_hidden; latents+timesteps(+encoder_hidden_states) -> unet_out
      and cross_attn_token_means [16,B,77]; pixels -> vae_mean; latents -> vae_decoded.

This file is the oracle the Rust tests compare against; it is written from diffusers'
public API independently of the Rust code.
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

import clip_vocab

# Model configurations the parity tests use. Every one keeps SD 2.1's architecture
# (4 blocks, 2 layers per block, 16 cross-attention layers, linear projections, GELU
# text encoder); they differ in the options the Rust code must honour.
TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[32, 32, 64, 64],
    layers_per_block=2,
    attention_head_dim=[2, 2, 4, 4],
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=True,
    upcast_attention=False,
)
TINY_VAE = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 32, 64, 64],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    scaling_factor=0.18215,
)
# SD 2.1 base ships a PNDMScheduler config; the Rust samplers read it as diffusers does.
SD21_SCHEDULER = dict(
    _class_name="PNDMScheduler",
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="epsilon",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
)

CONFIGS = {
    # SD 2.1 base options: epsilon prediction, no attention upcast.
    "tiny": dict(unet={}, scheduler={}, legacy_vae_names=False, unet_variant=None, explicit_context=False),
    # SD 2.1 (768) options: v-prediction and upcast attention.
    "tiny-v-upcast": dict(
        unet=dict(upcast_attention=True),
        scheduler=dict(prediction_type="v_prediction", _class_name="DDIMScheduler"),
        legacy_vae_names=False,
        unet_variant=None,
        # The U-Net conditioned on given states rather than the text encoder's.
        explicit_context=True,
    ),
    # Older checkpoints: conv projections, the VAE's legacy attention names, and a
    # U-Net stored only as an fp16 variant file.
    "tiny-legacy": dict(
        unet=dict(use_linear_projection=False),
        scheduler={},
        legacy_vae_names=True,
        unet_variant="fp16",
        explicit_context=False,
    ),
}


def perturb_norms(module, generator):
    """Random affine parameters for every norm layer, so a wrong epsilon or a missing
    affine shows up in the outputs (fresh norms are weight 1, bias 0)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=generator))
                m.bias.add_(0.1 * torch.randn(m.bias.shape, generator=generator))


def make_case(name, seed, out):
    from transformers import CLIPTokenizer

    model_dir = os.path.join(out, "model")
    make_model(name, seed, model_dir)
    generator = torch.Generator().manual_seed(seed + 2)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
    prompts = ["a photo of a dog", "A cat, wearing a hat!! in the snow (watercolor)"]
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    inputs = {
        "input_ids": ids,
        "latents": torch.randn(2, 4, 8, 8, generator=generator),
        # Per-sample timesteps, as training draws them.
        "timesteps": torch.tensor([37, 911]),
        "pixels": torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1,
    }
    if CONFIGS[name]["explicit_context"]:
        inputs["encoder_hidden_states"] = torch.randn(2, 77, TINY_TEXT["hidden_size"], generator=generator)
    save_file(inputs, os.path.join(out, "inputs.safetensors"))
    forward(model_dir, os.path.join(out, "inputs.safetensors"), os.path.join(out, "expected.safetensors"), False)


def make_model(name, seed, out):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = CONFIGS[name]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)

    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT)).eval()
    unet = UNet2DConditionModel(**{**TINY_UNET, **spec["unet"]}).eval()
    vae = AutoencoderKL(**TINY_VAE).eval()
    for m in (text_encoder, unet, vae):
        perturb_norms(m, generator)

    os.makedirs(out, exist_ok=True)
    text_encoder.save_pretrained(os.path.join(out, "text_encoder"))
    if spec["unet_variant"]:
        unet.half().save_pretrained(os.path.join(out, "unet"), variant=spec["unet_variant"])
    else:
        unet.save_pretrained(os.path.join(out, "unet"))
    vae.save_pretrained(os.path.join(out, "vae"))
    if spec["legacy_vae_names"]:
        rename_vae_attention_legacy(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))

    clip_vocab.write_tokenizer(os.path.join(out, "tokenizer"))
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({**SD21_SCHEDULER, **spec["scheduler"]}, f, indent=2)
    scheduler_class = {**SD21_SCHEDULER, **spec["scheduler"]}["_class_name"]
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "scheduler": ["diffusers", scheduler_class],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
            f,
            indent=2,
        )


def rename_vae_attention_legacy(path):
    """Rewrites the VAE attention keys to the pre-0.14 diffusers names (which diffusers
    still loads)."""
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    tensors = load_file(path)
    legacy = {}
    for key, value in tensors.items():
        new_key = key
        for new, old in renames.items():
            if new in key and "attentions" in key:
                new_key = key.replace(new, old)
        legacy[new_key] = value.contiguous()
    save_file(legacy, path)


class CrossAttentionRecorder:
    """An attention processor for the attn2 layers that computes attention explicitly
    and keeps, per call, the post-softmax probabilities averaged over heads and query
    positions: one value per key token ([B, 77])."""

    def __init__(self, store):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store.append(probs.reshape(batch, attn.heads, probs.shape[1], probs.shape[2]).mean(dim=(1, 2)))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def unet_variant(model_dir):
    unet_dir = os.path.join(model_dir, "unet")
    if os.path.exists(os.path.join(unet_dir, "diffusion_pytorch_model.safetensors")):
        return None
    return "fp16"


@torch.no_grad()
def forward(model_dir, inputs_path, out_path, check_pipeline):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    inputs = load_file(inputs_path)
    outputs = {}
    if check_pipeline:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.from_pretrained(
            model_dir, safety_checker=None, requires_safety_checker=False, variant=unet_variant(model_dir)
        )

    if "input_ids" in inputs:
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder")).eval()
        outputs["text_hidden"] = text_encoder(inputs["input_ids"]).last_hidden_state

    if "latents" in inputs and "timesteps" in inputs:
        unet = UNet2DConditionModel.from_pretrained(
            os.path.join(model_dir, "unet"), variant=unet_variant(model_dir), torch_dtype=torch.float32
        ).eval()
        store = []
        processors = {
            name: (CrossAttentionRecorder(store) if "attn2" in name else proc)
            for name, proc in unet.attn_processors.items()
        }
        unet.set_attn_processor(processors)
        context = inputs.get("encoder_hidden_states", outputs.get("text_hidden"))
        if context is None:
            sys.exit("latents need encoder_hidden_states or input_ids")
        outputs["unet_out"] = unet(inputs["latents"], inputs["timesteps"], encoder_hidden_states=context).sample
        if len(store) != 16:
            sys.exit(f"expected 16 cross-attention layers, recorded {len(store)}")
        outputs["cross_attn_token_means"] = torch.stack(store)

    if "pixels" in inputs or "latents" in inputs:
        vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae")).eval()
        if "pixels" in inputs:
            outputs["vae_mean"] = vae.encode(inputs["pixels"]).latent_dist.mean
        if "latents" in inputs:
            outputs["vae_decoded"] = vae.decode(inputs["latents"] / vae.config.scaling_factor).sample

    save_file({k: v.contiguous().float() for k, v in outputs.items()}, out_path)


def main():
    parser = argparse.ArgumentParser(prog="model_reference")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-model")
    make.add_argument("--config", choices=sorted(CONFIGS), required=True)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--out", required=True)
    fwd = sub.add_parser("forward")
    fwd.add_argument("--model", required=True)
    fwd.add_argument("--inputs", required=True)
    fwd.add_argument("--out", required=True)
    fwd.add_argument("--check-pipeline", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.command == "make-model":
        make_case(args.config, args.seed, args.out)
    else:
        forward(args.model, args.inputs, args.out, args.check_pipeline)


if __name__ == "__main__":
    main()
