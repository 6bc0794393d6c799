"""The real CLIP BPE vocabulary, as transformers' CLIPTokenizer files, built from the
`bpe_simple_vocab_16e6.txt.gz` that open_clip ships (no download needed).

The layout follows open_clip's SimpleTokenizer, which transformers' CLIP conversion
reproduces: 256 byte-level symbols, the same with `</w>`, one token per merge, then
`<|startoftext|>` and `<|endoftext|>` (ids 49406, 49407).
"""

import gzip
import json
import os

import open_clip.tokenizer as oct


def vocab_and_merges():
    with gzip.open(oct.default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(oct.bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(out_dir, pad_token="!"):
    """Writes an SD 2.x tokenizer folder (pad token `!`) that CLIPTokenizer loads."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(
        os.path.join(out_dir, "vocab.json"),
        os.path.join(out_dir, "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )
    tokenizer.save_pretrained(out_dir)
