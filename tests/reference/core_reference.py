"""Python reference for CoRe's context regularization losses, on transformers/diffusers.

Two commands, run with cwd `tests/reference` as `python -m core_reference ...`:

  make-inputs --model DIR --template T --placeholder P --category C
              [--seed N] [--batch B] [--latent-size S] --out IN.safetensors
      Tokenizes T filled with P (added to a CLIPTokenizer as a new token) and with C,
      and writes the inputs `coreg core losses` takes: concept_ids, reference_ids
      (i64 [1,77]), concept_embedding (the category's input embedding plus noise,
      f32 [D]), latents (random, standing for noised latents, f32 [B,4,S,S]) and
      timesteps (i64 [B], uniform in [0, 1000)).

  losses --model DIR --inputs IN.safetensors --out OUT.safetensors --variant V
         [--lambda-emb L] [--lambda-attn L]
      Writes loss_emb and loss_attn (unweighted, fp32 scalars) for variant `reference`
      or `paper`, and grad_emb, the gradient of lambda_emb * loss_emb + lambda_attn *
      loss_attn (1.5e-4 and 0.05 by default) with respect to the concept embedding.

The concept embedding enters the text encoder as textual inversion does it: the token
embedding table is resized by one row, which holds the embedding, and the gradient is
read off that row. The category prompt's passes run under torch.no_grad(). This file
is written from the method's description (docs/method.md) independently of the
Rust code.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model_reference import CrossAttentionRecorder, unet_variant

LAMBDA_EMB = 1.5e-4
LAMBDA_ATTN = 0.05
END_OF_TEXT = 49407


def load_text_encoder(model_dir):
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder")).eval()
    encoder.requires_grad_(False)
    return encoder


def make_inputs(args):
    from transformers import CLIPTokenizer

    generator = torch.Generator().manual_seed(args.seed)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(args.model, "tokenizer"))
    base_vocab = len(tokenizer)
    tokenizer.add_tokens([args.placeholder])
    placeholder_id = tokenizer.convert_tokens_to_ids(args.placeholder)
    assert placeholder_id == base_vocab, (placeholder_id, base_vocab)
    category_ids = tokenizer(args.category, add_special_tokens=False).input_ids
    if len(category_ids) != 1:
        raise SystemExit(f"category {args.category!r} is {len(category_ids)} tokens, not one")

    def ids(word):
        return tokenizer(
            args.template.replace("{}", word),
            padding="max_length",
            max_length=77,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    encoder = load_text_encoder(args.model)
    table = encoder.get_input_embeddings().weight
    category = table[category_ids[0]]
    embedding = category + args.spread * table.std() * torch.randn(category.shape, generator=generator)
    channels = 4
    inputs = {
        "concept_ids": ids(args.placeholder),
        "reference_ids": ids(args.category),
        "concept_embedding": embedding.detach(),
        "latents": torch.randn(args.batch, channels, args.latent_size, args.latent_size, generator=generator),
        "timesteps": torch.randint(0, 1000, (args.batch,), generator=generator),
    }
    save_file({k: v.contiguous() for k, v in inputs.items()}, args.out)


def context_positions(concept_ids, reference_ids, placeholder_id):
    """Start token through the first end-of-text token, without the concept's position."""
    concept_ids, reference_ids = concept_ids[0].tolist(), reference_ids[0].tolist()
    end = concept_ids.index(END_OF_TEXT)
    assert reference_ids.index(END_OF_TEXT) == end
    differ = [i for i, (a, b) in enumerate(zip(concept_ids, reference_ids)) if a != b]
    assert len(differ) == 1 and concept_ids[differ[0]] == placeholder_id, differ
    return torch.tensor([i for i in range(end + 1) if i != differ[0]])


def embedding_loss(concept, reference, kept, variant):
    concept, reference = concept[:, kept], reference[:, kept]  # [1, K, D]
    if variant == "reference":
        # One cosine per hidden channel, taken along the token axis.
        return 1 - F.cosine_similarity(concept, reference, dim=1).mean()
    # Paper Eq. 3: one cosine per token over the features.
    return (1 - F.cosine_similarity(concept, reference, dim=2)).mean()


def attention_loss(concept_maps, reference_maps, kept, variant):
    if variant == "reference":
        per_layer = [
            ((c[:, kept] - r[:, kept]) ** 2).mean(dim=1).sum()  # MSE per sample, summed
            for c, r in zip(concept_maps, reference_maps)
        ]
        return torch.stack(per_layer).mean()
    # Paper Eq. 4: average over layers first.
    concept = torch.stack(concept_maps).mean(dim=0)[:, kept]
    reference = torch.stack(reference_maps).mean(dim=0)[:, kept]
    return ((concept - reference) ** 2).mean()


def losses(args):
    from diffusers import UNet2DConditionModel

    inputs = load_file(args.inputs)
    encoder = load_text_encoder(args.model)
    placeholder_id = encoder.config.vocab_size
    encoder.resize_token_embeddings(placeholder_id + 1, mean_resizing=False)
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[placeholder_id] = inputs["concept_embedding"]
    table.requires_grad_(True)

    unet = UNet2DConditionModel.from_pretrained(
        os.path.join(args.model, "unet"), variant=unet_variant(args.model), torch_dtype=torch.float32
    ).eval()
    unet.requires_grad_(False)
    recorded = []
    unet.set_attn_processor(
        {
            name: CrossAttentionRecorder(recorded) if "attn2" in name else processor
            for name, processor in unet.attn_processors.items()
        }
    )

    concept_ids, reference_ids = inputs["concept_ids"], inputs["reference_ids"]
    kept = context_positions(concept_ids, reference_ids, placeholder_id)
    latents, timesteps = inputs["latents"], inputs["timesteps"]
    batch = latents.shape[0]

    concept_hidden = encoder(concept_ids).last_hidden_state
    recorded.clear()
    unet(latents, timesteps, encoder_hidden_states=concept_hidden.repeat(batch, 1, 1))
    concept_maps = list(recorded)
    with torch.no_grad():
        reference_hidden = encoder(reference_ids).last_hidden_state
        recorded.clear()
        unet(latents, timesteps, encoder_hidden_states=reference_hidden.repeat(batch, 1, 1))
        reference_maps = list(recorded)
    assert len(concept_maps) == len(reference_maps) == 16

    loss_emb = embedding_loss(concept_hidden, reference_hidden, kept, args.variant)
    loss_attn = attention_loss(concept_maps, reference_maps, kept, args.variant)
    (args.lambda_emb * loss_emb + args.lambda_attn * loss_attn).backward()
    save_file(
        {
            "loss_emb": loss_emb.detach().float(),
            "loss_attn": loss_attn.detach().float(),
            "grad_emb": table.grad[placeholder_id].float().contiguous(),
        },
        args.out,
    )


def main():
    parser = argparse.ArgumentParser(prog="core_reference")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-inputs")
    make.add_argument("--model", required=True)
    make.add_argument("--template", required=True)
    make.add_argument("--placeholder", default="<concept>")
    make.add_argument("--category", required=True)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--spread", type=float, default=0.5, help="noise added to the category's embedding, in units of the table's std")
    make.add_argument("--batch", type=int, default=2)
    make.add_argument("--latent-size", type=int, default=8)
    make.add_argument("--out", required=True)
    run = sub.add_parser("losses")
    run.add_argument("--model", required=True)
    run.add_argument("--inputs", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--variant", choices=["reference", "paper"], default="reference")
    run.add_argument("--lambda-emb", type=float, default=LAMBDA_EMB)
    run.add_argument("--lambda-attn", type=float, default=LAMBDA_ATTN)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.command == "make-inputs":
        make_inputs(args)
    else:
        losses(args)


if __name__ == "__main__":
    main()
