"""Python reference for the stored concept embedding: do other tools read it?

  python -m embedding_reference --model DIR --learned-embeds FILE --a1111 FILE
         --a1111-token TOKEN --out OUT.safetensors

Loads the diffusers model folder DIR as a StableDiffusionPipeline and
- loads FILE (diffusers' `learned_embeds.safetensors` layout) with
  `pipeline.load_textual_inversion`, which takes the token from the file's one key;
- reads the AUTOMATIC1111 export as the web UI does (a single-tensor safetensors file;
  the key `emb_params`) and loads it into the same pipeline under TOKEN.
Writes, for each, the token's id, its row of the text encoder's input embedding
matrix and the ids "a photo of a <token>" tokenizes to, so the Rust test can check
them against what it wrote.
"""

import argparse

import torch
from safetensors.torch import load_file, save_file


def main():
    parser = argparse.ArgumentParser(prog="embedding_reference")
    parser.add_argument("--model", required=True)
    parser.add_argument("--learned-embeds", required=True)
    parser.add_argument("--a1111", required=True)
    parser.add_argument("--a1111-token", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        args.model, safety_checker=None, requires_safety_checker=False
    )
    base_vocab = len(pipeline.tokenizer)

    (token,) = load_file(args.learned_embeds).keys()
    pipeline.load_textual_inversion(args.learned_embeds)

    a1111 = load_file(args.a1111)
    if list(a1111) != ["emb_params"]:
        raise SystemExit(f"AUTOMATIC1111 export has keys {list(a1111)}, expected ['emb_params']")
    emb = a1111["emb_params"]
    if emb.dim() == 1:
        emb = emb.unsqueeze(0)
    # The web UI's loader: one tensor per file, vectors [n, D] in fp32.
    if emb.dtype != torch.float32 or emb.dim() != 2:
        raise SystemExit(f"AUTOMATIC1111 export is {emb.dtype} {tuple(emb.shape)}")
    pipeline.load_textual_inversion(a1111, token=args.a1111_token)

    weight = pipeline.text_encoder.get_input_embeddings().weight.detach()
    outputs = {"base_vocab": torch.tensor([base_vocab])}
    for name, tok in (("learned_embeds", token), ("a1111", args.a1111_token)):
        token_id = pipeline.tokenizer.convert_tokens_to_ids(tok)
        ids = pipeline.tokenizer(
            f"a photo of a {tok}", padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        outputs[f"{name}_token_id"] = torch.tensor([token_id])
        outputs[f"{name}_row"] = weight[token_id].clone().float()
        outputs[f"{name}_prompt_ids"] = ids
    save_file({k: v.contiguous() for k, v in outputs.items()}, args.out)


if __name__ == "__main__":
    main()
