"""Python reference for personalized generation: a stored concept on diffusers'
StableDiffusionPipeline, optionally after test-time optimization of its token.

Run with cwd `tests/reference` as

  python -m personalized_reference --model DIR --store STORE --cases CASES.json
      --inputs IN.safetensors --out OUT.safetensors

DIR is a diffusers model folder (e.g. from `model_reference make-model`); STORE is the
root folder of a `file://` concept store. Each concept is read from the store files
alone, following their documented layout:

- `concepts/<name>/<version>/manifest.json` holds the placeholder `token`, the
  `super_category` and, under `blobs`, per role (`embedding`, `unet_delta`,
  `training_latents`, ...) a `{"path", "size", "sha256"}` reference; `path` is
  relative to STORE. Every blob read is checked against its size and SHA-256.
- `embedding` is diffusers' `learned_embeds.safetensors`, `{token: vector}`; it is
  given to `load_textual_inversion` as a state dict.
- `unet_delta` is a safetensors file over the U-Net's `state_dict()` names: a dense
  Δ (fp32, the parameter's shape) under the parameter's own name, with optional
  `<name>.exact_index` (i64 flat indices) and `<name>.exact_value` (fp32) that
  overwrite elements of base + Δ; or a factored Δ as `<name>.lora_up` [out, r] and
  `<name>.lora_down` [r, rest], reshaped to the shape the header's `shapes` metadata
  (JSON, name -> shape) records. Parameters it does not name keep the base weights.
- `training_latents` is a safetensors file with one fp32 tensor `latents`
  [N, 4, h, w], already scaled by the VAE's scaling factor.

CASES.json is a list of generation cases:

  {"name": str, "concept": str, "version": str,
   "sampler": "dpm++2m" | "ddim" | "euler", "prompts": [str, ...],
   "negative_prompt": str | null, "steps": int, "guidance_scale": float,
   "height": int, "width": int, "noise": key in IN,
   "tto": null | {"template": str, "batches": prefix in IN, "lr": float,
                  "beta1": float, "beta2": float, "eps": float, "weight_decay": float,
                  "lambda_emb": float, "lambda_attn": float,
                  "variant": "reference" | "paper"}}

The prompts name the concept by its token. `noise` names the initial latents
[B, 4, H/8, W/8] given to the pipeline as `latents`; the scheduler is built with
`from_config` from the model folder's scheduler config. For every case OUT receives
`<name>.latents` (final latents, `output_type="latent"`), `<name>.decoded` (the VAE's
unclamped decode) and `<name>.images` (the image processor's `output_type="pt"`
post-processing of it, in [0, 1]), as `generate_reference` computes them.

With `tto`, the concept's vector is first adapted by test-time optimization on the
fine-tuned U-Net (base + delta), with the template (the prompt, holding `{}` or the
token) as the only template and the concept's training latents, replaying the given
batches: for every `<batches>.step.{i}.*` in IN (`latent_indices` i64 [B], `noise`
[B, 4, h, w], `timesteps` i64 [B]), one `torch.optim.AdamW` step of
λ_emb·L_emb + λ_attn·L_attn, the losses of `replay_reference`. The case then
generates with the adapted vector, and OUT also receives `<name>.tto_embedding` [D]
and `<name>.tto_losses` [N, 3] (L_emb, L_attn, total).

Written from diffusers' public API and the documented formats, independently of the
Rust code it checks.
"""

import argparse
import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import generate_reference
import replay_reference

LORA_UP = ".lora_up"
LORA_DOWN = ".lora_down"
EXACT_INDEX = ".exact_index"
EXACT_VALUE = ".exact_value"


class StoredConcept:
    """A concept version read from a `file://` store folder."""

    def __init__(self, store, name, version):
        self.store = store
        with open(os.path.join(store, "concepts", name, version, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.token = self.manifest["token"]
        self.category = self.manifest["super_category"]
        embedding = load_file(self.blob("embedding"))
        if list(embedding) != [self.token]:
            raise SystemExit(f"the embedding holds {list(embedding)}, not {self.token!r}")
        self.vector = embedding[self.token].float().reshape(-1)
        self.latents = load_file(self.blob("training_latents"))["latents"]

    def blob(self, role):
        """The checked path of the blob with `role`."""
        ref = self.manifest["blobs"][role]
        path = os.path.join(self.store, ref["path"])
        with open(path, "rb") as f:
            content = f.read()
        if len(content) != ref["size"] or hashlib.sha256(content).hexdigest() != ref["sha256"]:
            raise SystemExit(f"blob {role} at {path} does not match the manifest")
        return path

    def tuned_state_dict(self, base):
        """base (a U-Net `state_dict()`) with the stored delta added."""
        path = self.blob("unet_delta")
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        shapes = json.loads(metadata.get("shapes", "{}"))
        deltas = {}
        for name, shape in shapes.items():
            up = tensors.pop(name + LORA_UP)
            down = tensors.pop(name + LORA_DOWN)
            deltas[name] = ((up @ down).reshape(shape), None)
        fixes = {}
        for key in list(tensors):
            if key.endswith(EXACT_INDEX):
                name = key[: -len(EXACT_INDEX)]
                fixes[name] = (tensors.pop(key), tensors.pop(name + EXACT_VALUE))
        for name, delta in tensors.items():
            deltas[name] = (delta, fixes.pop(name, None))
        if fixes:
            raise SystemExit(f"exact fixes without a delta: {sorted(fixes)}")
        unknown = sorted(set(deltas) - set(base))
        if unknown:
            raise SystemExit(f"the delta names parameters the U-Net lacks: {unknown[:5]}")
        tuned = dict(base)
        for name, (delta, fix) in deltas.items():
            value = base[name].float() + delta.float()
            if fix is not None:
                index, exact = fix
                value.view(-1)[index.long()] = exact.float()
            tuned[name] = value.to(base[name].dtype)
        return tuned, len(deltas)


def apply_delta(unet, concept):
    tuned, changed = concept.tuned_state_dict(unet.state_dict())
    unet.load_state_dict(tuned)
    return changed


def test_time_optimize(model_dir, concept, spec, inputs):
    """Test-time optimization of the concept's vector on base + delta; returns the
    adapted vector and the losses [N, 3]."""
    models = replay_reference.Models(model_dir, concept.token, concept.category)
    apply_delta(models.unet, concept)
    template = spec["template"].replace(concept.token, "{}")
    settings = argparse.Namespace(**{k: spec[k] for k in ("beta1", "beta2", "eps", "weight_decay")})
    vector = concept.vector.detach().clone().requires_grad_(True)
    optimizer = replay_reference.adamw([vector], settings, spec["lr"])
    prefix = spec["batches"] + ".step."
    steps = len({key[len(prefix) :].split(".")[0] for key in inputs if key.startswith(prefix)})
    losses = []
    for i in range(steps):
        indices = inputs[f"{prefix}{i}.latent_indices"]
        timesteps = inputs[f"{prefix}{i}.timesteps"]
        noisy = models.scheduler.add_noise(concept.latents[indices], inputs[f"{prefix}{i}.noise"], timesteps)
        l_emb, l_attn = models.context_losses(template, vector, noisy, timesteps, spec["variant"], True, True)
        total = spec["lambda_emb"] * l_emb + spec["lambda_attn"] * l_attn
        replay_reference.check_finite(f"test-time loss at step {i + 1}", total)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        losses.append([l_emb.item(), l_attn.item(), total.item()])
    return vector.detach(), torch.tensor(losses, dtype=torch.float32).reshape(-1, 3)


def personalized_pipeline(model_dir, concept, vector):
    """The pipeline with `vector` loaded under the concept's token and the U-Net
    delta applied."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.load_textual_inversion({concept.token: vector.reshape(1, -1)})
    changed = apply_delta(pipe.unet, concept)
    if changed == 0:
        raise SystemExit("the concept's U-Net delta changes nothing")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    parser = argparse.ArgumentParser(prog="personalized_reference")
    parser.add_argument("--model", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # The tiny test model gains nothing from threads on a loaded machine.
    torch.set_num_threads(1)

    with open(args.cases) as f:
        cases = json.load(f)
    inputs = load_file(args.inputs)
    concepts = {}
    pipelines = {}
    outputs = {}
    for case in cases:
        key = (case["concept"], case["version"])
        if key not in concepts:
            concepts[key] = StoredConcept(args.store, *key)
        concept = concepts[key]
        if case.get("tto") is None:
            if key not in pipelines:
                pipe = personalized_pipeline(args.model, concept, concept.vector)
                pipelines[key] = (pipe, dict(pipe.scheduler.config))
            pipe, scheduler_config = pipelines[key]
        else:
            vector, losses = test_time_optimize(args.model, concept, case["tto"], inputs)
            outputs[f"{case['name']}.tto_embedding"] = vector.contiguous()
            outputs[f"{case['name']}.tto_losses"] = losses
            pipe = personalized_pipeline(args.model, concept, vector)
            scheduler_config = dict(pipe.scheduler.config)
        for name, value in generate_reference.run_case(pipe, scheduler_config, case, inputs).items():
            outputs[f"{case['name']}.{name}"] = value.float().contiguous()
    save_file(outputs, args.out)


if __name__ == "__main__":
    main()
