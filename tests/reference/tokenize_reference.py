"""Reference for the tokenizer parity test: transformers' CLIPTokenizer built from a
tokenizer folder that coreg wrote.

    python -m tokenize_reference --tokenizer-dir DIR --prompts PROMPTS.json --out IDS.safetensors
        [--placeholder TOKEN]

Checks first that DIR's vocab.json and merges.txt are exactly the vocabulary
transformers' CLIP files hold, as built independently from open_clip's BPE file
(`clip_vocab.vocab_and_merges`), and that the folder gives an SD 2.x tokenizer (pad
`!` = 0). Then tokenizes every prompt of the JSON list (kept as JSON so that prompts
may hold newlines and tabs) the way Stable Diffusion pipelines do (pad to 77,
truncate), after adding the placeholder token if one is given, and writes
`input_ids` int64 [N, 77] and `lengths` int64 [N], each prompt's token count before
truncation (special tokens included).
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from clip_vocab import vocab_and_merges


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def check_vocabulary(tokenizer_dir):
    want_vocab, want_merges = vocab_and_merges()
    with open(os.path.join(tokenizer_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    if vocab != want_vocab:
        wrong = [t for t in want_vocab if vocab.get(t) != want_vocab[t]][:5]
        fail(f"vocab.json differs from CLIP's vocabulary ({len(vocab)} vs {len(want_vocab)} entries; e.g. {wrong})")
    with open(os.path.join(tokenizer_dir, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines[0] != "#version: 0.2":
        fail(f"merges.txt starts with {lines[0]!r}, not the '#version: 0.2' header")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    if merges != want_merges:
        first = next((i for i, (a, b) in enumerate(zip(merges, want_merges)) if a != b), min(len(merges), len(want_merges)))
        fail(f"merges.txt differs from CLIP's merges at merge {first} ({len(merges)} vs {len(want_merges)} merges)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--placeholder")
    args = parser.parse_args()

    check_vocabulary(args.tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer_dir)
    if (tokenizer.pad_token, tokenizer.pad_token_id, len(tokenizer), tokenizer.model_max_length) != ("!", 0, 49408, 77):
        fail(
            "not an SD 2.x tokenizer: pad "
            f"{tokenizer.pad_token!r} = {tokenizer.pad_token_id}, {len(tokenizer)} tokens, "
            f"model_max_length {tokenizer.model_max_length}"
        )
    if args.placeholder:
        tokenizer.add_tokens(args.placeholder)

    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    lengths = torch.tensor([len(row) for row in tokenizer(prompts).input_ids], dtype=torch.int64)
    save_file({"input_ids": ids.to(torch.int64).contiguous(), "lengths": lengths}, args.out)


if __name__ == "__main__":
    main()
