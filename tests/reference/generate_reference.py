"""Python reference for the denoising loop: diffusers' StableDiffusionPipeline.

Run with cwd `tests/reference` as

  python -m generate_reference --model DIR --cases CASES.json --inputs IN.safetensors --out OUT.safetensors

DIR is a diffusers model folder (e.g. from `model_reference make-model`). CASES.json is
a list of generation cases:

  {"name": str, "sampler": "dpm++2m" | "ddim" | "euler", "prompts": [str, ...],
   "negative_prompt": str | null, "steps": int, "guidance_scale": float,
   "height": int, "width": int, "noise": key in IN, "embedding": path | null}

`noise` names the initial latents [B, 4, H/8, W/8] in IN, given to the pipeline as
`latents`. `embedding` is a safetensors file `{token: [1, D]}` loaded with
`load_textual_inversion`, so its token can appear in the prompts. For every case OUT
receives `<name>.latents` (the final latents, `output_type="latent"`), `<name>.decoded`
(the VAE's unclamped decode of them, as the pipeline decodes) and `<name>.images` (the
pipeline's image processor's `output_type="pt"` post-processing of that decode, in
[0, 1]).

The scheduler of each case is built with `from_config` from the model folder's own
scheduler config, as a user switching samplers in diffusers would. This file is
written from diffusers' public API, independently of the Rust code it checks.
"""

import argparse
import json

import torch
from safetensors.torch import load_file, save_file

SCHEDULERS = {
    "dpm++2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
}


def load_pipeline(model_dir, embedding):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    if embedding is not None:
        pipe.load_textual_inversion(embedding)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def run_case(pipe, base_scheduler_config, case, inputs):
    import diffusers

    scheduler_class = getattr(diffusers, SCHEDULERS[case["sampler"]])
    pipe.scheduler = scheduler_class.from_config(base_scheduler_config)
    noise = inputs[case["noise"]]
    prompts = case["prompts"]
    negative = case["negative_prompt"]
    common = dict(
        prompt=prompts,
        # One negative prompt for every image; diffusers wants it the prompts' type.
        negative_prompt=None if negative is None else [negative] * len(prompts),
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance_scale"],
        height=case["height"],
        width=case["width"],
    )
    latents = pipe(**common, latents=noise.clone(), output_type="latent").images
    # What the pipeline does after the loop for output_type="pt", without running the
    # loop a second time.
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    images = pipe.image_processor.postprocess(decoded, output_type="pt", do_denormalize=[True] * len(decoded))
    return {"latents": latents, "images": images, "decoded": decoded}


def main():
    parser = argparse.ArgumentParser(prog="generate_reference")
    parser.add_argument("--model", required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)

    with open(args.cases) as f:
        cases = json.load(f)
    inputs = load_file(args.inputs)
    pipelines = {}
    outputs = {}
    for case in cases:
        embedding = case.get("embedding")
        if embedding not in pipelines:
            pipe = load_pipeline(args.model, embedding)
            pipelines[embedding] = (pipe, dict(pipe.scheduler.config))
        pipe, base_config = pipelines[embedding]
        for key, value in run_case(pipe, base_config, case, inputs).items():
            outputs[f"{case['name']}.{key}"] = value.float().contiguous()
    save_file(outputs, args.out)


if __name__ == "__main__":
    main()
