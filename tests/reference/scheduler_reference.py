"""Python reference for the noise schedule and the samplers: diffusers' schedulers.

Run with cwd `tests/reference` as

  python -m scheduler_reference --cases CASES.json --inputs IN.safetensors --out OUT.safetensors

CASES.json holds two lists, so that one Python start serves every case:

  {"sampling": [{"name": ..., "config": {...}, "sampler": "ddim" | "euler" | "dpm++2m",
                 "steps": N}, ...],
   "training": [{"name": ..., "config": {...}}, ...]}

`config` is a `scheduler_config.json` (any `_class_name`; the sampler's class is built
from it with `from_config`, as a pipeline swapping schedulers does).

IN.safetensors holds `noise` [B, C, H, W], `model_outputs` [N_max, B, C, H, W] (the
U-Net outputs to feed, step by step), and for training `x0`, `train_noise` and
`train_timesteps` [B] (int64).

OUT.safetensors gets, per sampling case, `NAME.timesteps` (float64),
`NAME.init_noise_sigma` [1] (float64), `NAME.scaled` [n, B, C, H, W] (every
`scale_model_input`) and `NAME.prev` [n, B, C, H, W] (every `step(...).prev_sample`),
following StableDiffusionPipeline's loop; per training case `NAME.alphas_cumprod`,
`NAME.noisy` (`add_noise`) and `NAME.velocity` (`get_velocity`) of DDPMScheduler.

This file is the oracle the Rust tests compare against; it is written from diffusers'
public API independently of the Rust code.
"""

import argparse
import json

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from safetensors.torch import load_file, save_file

SAMPLERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
}


def run_sampler(case, noise, model_outputs):
    scheduler = SAMPLERS[case["sampler"]].from_config(dict(case["config"]))
    scheduler.set_timesteps(case["steps"])
    timesteps = scheduler.timesteps
    if len(timesteps) > model_outputs.shape[0]:
        raise SystemExit(f"{case['name']}: {len(timesteps)} steps but only {model_outputs.shape[0]} model outputs")
    init_noise_sigma = float(scheduler.init_noise_sigma)
    latents = noise * scheduler.init_noise_sigma
    scaled, prev = [], []
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        scaled.append(model_input)
        latents = scheduler.step(model_outputs[i], t, latents).prev_sample
        prev.append(latents)
    name = case["name"]
    return {
        f"{name}.timesteps": timesteps.to(torch.float64),
        f"{name}.init_noise_sigma": torch.tensor([init_noise_sigma], dtype=torch.float64),
        f"{name}.scaled": torch.stack(scaled).contiguous(),
        f"{name}.prev": torch.stack(prev).contiguous(),
    }


def run_training(case, x0, noise, timesteps):
    scheduler = DDPMScheduler.from_config(dict(case["config"]))
    name = case["name"]
    return {
        f"{name}.alphas_cumprod": scheduler.alphas_cumprod.clone(),
        f"{name}.noisy": scheduler.add_noise(x0, noise, timesteps).contiguous(),
        f"{name}.velocity": scheduler.get_velocity(x0, noise, timesteps).contiguous(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    with open(args.cases) as f:
        cases = json.load(f)
    inputs = load_file(args.inputs)
    out = {}
    for case in cases.get("sampling", []):
        out.update(run_sampler(case, inputs["noise"], inputs["model_outputs"]))
    for case in cases.get("training", []):
        out.update(run_training(case, inputs["x0"], inputs["train_noise"], inputs["train_timesteps"]))
    save_file(out, args.out)


if __name__ == "__main__":
    main()
