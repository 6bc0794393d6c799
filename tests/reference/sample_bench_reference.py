"""Python side of the sampler benchmark (`bench/sampler.sh`): diffusers doing what
`sampler/examples/sample_bench.rs` times, on the inputs it recorded.

Run with cwd `tests/reference`:

  --mode images|tto --model DIR --record RECORD.safetensors --prompt TEXT
  --placeholder TOKEN --category WORD --warmup W --out OUT.json [--threads N]
  images: [--steps N] [--guidance-scale G] [--resolution PX] [--rust-latents FILE]

`images`: diffusers' `StableDiffusionPipeline` from DIR (`generate_reference.load_pipeline`)
with `DPMSolverMultistepScheduler.from_config` of the folder's scheduler config (the
Rust sampler's DPM-Solver++ 2M) and RECORD's `embedding` [D] loaded as a textual
inversion for TOKEN. Image k starts from RECORD's `image.{k}.noise` (the noise the
Rust side drew from its seed) with the empty negative prompt (diffusers' default)
and guidance G, both halves in one U-Net call per step. The first W images are
warm-up. An image's seconds cover the pipeline call (prompt encoding, every step, the
VAE decode, post-processing to PIL) and the PNG encoding of the result, as the Rust
sampler returns PNG bytes; step times are taken between consecutive
`callback_on_step_end` calls, as the Rust side takes them between progress reports,
and the time from the last one to the end (the decode's and the PNG's) too.
With `--rust-latents` (the Rust side's final latents, `image.{k}`), the JSON also gives
the largest absolute difference from this side's final latents and their largest
magnitude: a check that both ran the same sampler on the same model.

`tto`: test-time optimization as `replay_reference.py`'s `tto` mode does it (its
`Models`, `context_losses`, `adamw`; λ_emb 1.5e-4, λ_attn 0.05, AdamW lr 5e-4, the
reference loss variant): for every recorded run p, from `embedding`, one AdamW step
per recorded `run.{p}.step.{i}.*` batch (`latent_indices` into `latents`, `noise`,
`timesteps`) with TEXT as the only template. The first W runs are warm-up. A run's
inputs are read from RECORD before its timer starts.

OUT is JSON in the Rust side's layout: `all_seconds` (timed runs), `warmup_seconds`,
`all_cpu_seconds` (user + system, all threads), `all_step_seconds` and
`all_tail_seconds` (images: from the last step's callback to the PNG),
`peak_rss_bytes` (getrusage's ru_maxrss: the process's peak, including the
interpreter, torch, diffusers and transformers), `baseline_rss_bytes` (VmRSS just
before the first run), `threads` and `losses` (tto: every run's per-step totals).
"""

import argparse
import io
import json
import resource
import statistics
import time

import torch
from safetensors import safe_open

import replay_reference as ref


def resident_bytes():
    """VmRSS of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no VmRSS in /proc/self/status")


def cpu_seconds():
    """User plus system CPU seconds of this process, all threads, from /proc/self/stat
    as the Rust side reads them (utime and stime, in USER_HZ = 100 ticks a second)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def count(record, prefix):
    """How many `{prefix}{i}.` groups RECORD holds."""
    return len({k[len(prefix) :].split(".")[0] for k in record.keys() if k.startswith(prefix)})


def images(args, record):
    """Times every image; returns (runs, report extras)."""
    import diffusers

    from generate_reference import load_pipeline

    pipe = load_pipeline(args.model, None)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.load_textual_inversion({args.placeholder: record.get_tensor("embedding")[None]})
    total = count(record, "image.")

    def image(k):
        noise = record.get_tensor(f"image.{k}.noise")
        marks, final = [], {}

        def on_step_end(pipe, step, timestep, kwargs):
            marks.append(time.perf_counter())
            final["latents"] = kwargs["latents"]
            return kwargs

        start, cpu_start = time.perf_counter(), cpu_seconds()
        picture = pipe(
            prompt=[args.prompt],
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            height=args.resolution,
            width=args.resolution,
            latents=noise,
            output_type="pil",
            callback_on_step_end=on_step_end,
        ).images[0]
        png = io.BytesIO()
        picture.save(png, format="PNG")
        end = time.perf_counter()
        seconds, cpu = end - start, cpu_seconds() - cpu_start
        if len(marks) != args.steps:
            raise SystemExit(f"{len(marks)} step callbacks for {args.steps} steps")
        steps = [b - a for a, b in zip(marks, marks[1:])]
        print(f"image {k + 1}: {seconds:.3f} s, median step {statistics.median(steps):.3f} s", flush=True)
        return {"seconds": seconds, "cpu": cpu, "steps": steps, "tail": end - marks[-1], "latents": final["latents"][0]}

    baseline = resident_bytes()
    runs = [image(k) for k in range(total)]
    extras = {}
    if args.rust_latents:
        with safe_open(args.rust_latents, framework="pt") as rust:
            diffs = [(rust.get_tensor(f"image.{k}") - run["latents"]).abs().max().item() for k, run in enumerate(runs)]
        extras["max_latent_abs_diff"] = max(diffs)
        extras["max_latent_abs"] = max(run["latents"].abs().max().item() for run in runs)
    return runs, baseline, extras


def tto(args, record):
    """Times every test-time optimization run; returns (runs, report extras)."""
    models = ref.Models(args.model, args.placeholder, args.category)
    template = args.prompt.replace(args.placeholder, "{}")
    latents = record.get_tensor("latents")
    embedding = record.get_tensor("embedding")

    def run(p):
        prefix = f"run.{p}.step."
        batches = [
            {name: record.get_tensor(f"{prefix}{i}.{name}") for name in ("latent_indices", "noise", "timesteps")}
            for i in range(count(record, prefix))
        ]
        start, cpu_start = time.perf_counter(), cpu_seconds()
        # replay_reference.tto's loop, on batches in memory rather than a file.
        vector = embedding.detach().clone().requires_grad_(True)
        optimizer = ref.adamw([vector], args, args.tto_lr)
        losses = []
        for i, batch in enumerate(batches):
            timesteps = batch["timesteps"]
            noisy = models.scheduler.add_noise(latents[batch["latent_indices"]], batch["noise"], timesteps)
            l_emb, l_attn = models.context_losses(template, vector, noisy, timesteps, args.variant, True, True)
            total = args.lambda_emb * l_emb + args.tto_lambda_attn * l_attn
            ref.check_finite(f"test-time loss at step {i + 1}", total)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses.append(total.item())
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        print(f"test-time optimization {p + 1} ({len(batches)} steps): {seconds:.3f} s", flush=True)
        return {"seconds": seconds, "cpu": cpu, "steps": [], "losses": losses}

    baseline = resident_bytes()
    return [run(p) for p in range(count(record, "run."))], baseline, {}


def main():
    parser = argparse.ArgumentParser(prog="sample_bench_reference")
    ref.hyperparameter_flags(parser)
    parser.add_argument("--mode", choices=["images", "tto"], required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--rust-latents", default=None)
    parser.add_argument("--tto-lr", type=float, default=5e-4)
    parser.add_argument("--tto-lambda-attn", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    record = safe_open(args.record, framework="pt")
    runs, baseline, extras = (images if args.mode == "images" else tto)(args, record)
    if len(runs) <= args.warmup:
        raise SystemExit(f"{args.record} holds {len(runs)} runs, not more than --warmup {args.warmup}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    timed = runs[args.warmup :]
    seconds = [r["seconds"] for r in timed]
    report = {
        "impl": "python",
        "mode": args.mode,
        "resolution": args.resolution if args.mode == "images" else 8 * record.get_tensor("latents").shape[-1],
        "warmup": args.warmup,
        "runs": len(timed),
        "threads": torch.get_num_threads(),
        "prompt": args.prompt,
        "seconds_per_run": statistics.median(seconds),
        "all_seconds": seconds,
        "warmup_seconds": [r["seconds"] for r in runs[: args.warmup]],
        "all_cpu_seconds": [r["cpu"] for r in timed],
        "all_step_seconds": [s for r in timed for s in r["steps"]],
        "all_tail_seconds": [r.get("tail", 0.0) for r in timed],
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "losses": [r.get("losses", []) for r in runs],
        **extras,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(
        f"python {args.mode}: {report['seconds_per_run']:.3f} s per run (median of {len(timed)}), "
        f"peak RSS {peak / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
