"""Python side of the step benchmark (`bench/steps.sh`): the reference doing the same
CoRe training steps as `shared/examples/step_bench.rs`, on the inputs it recorded.

Run with cwd `tests/reference`:

  --model DIR --stage 1|2 --record RECORD.safetensors --prompts FILE
  --placeholder TOKEN --category WORD --warmup W --out OUT.json [--threads N]

RECORD holds every step's inputs in the replay layout (`stage{1,2}.{i}.*`, see
`replay_reference.py`); the first W steps are warm-up, the rest are timed. Each step
is `replay_reference.stage1_step` (S* from the super-category's input embedding,
AdamW lr 5e-3, both context losses) or `replay_reference.stage2_step` (every U-Net
parameter, AdamW lr 2e-6, fp32): the code the replay parity test checks against the
Rust stages. A step's inputs are read from RECORD before its timer starts.

OUT is JSON: `seconds_per_step` (median of the timed steps), `all_seconds`,
`warmup_seconds`, `cpu_seconds_per_step` and `all_cpu_seconds` (user + system CPU
time of all threads, per timed step), `peak_rss_bytes` (getrusage's ru_maxrss: the process's peak,
including the interpreter, torch, diffusers and transformers), `baseline_rss_bytes`
(VmRSS just before the first step), `threads` (torch's intra-op threads) and
`losses` (every step's loss: the total for stage 1, the diffusion loss for stage 2).
"""

import argparse
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


def main():
    parser = argparse.ArgumentParser(prog="bench_reference")
    ref.hyperparameter_flags(parser)
    ref.training_flags(parser)
    parser.add_argument("--stage", type=int, choices=[1, 2], required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    models = ref.Models(args.model, args.placeholder, args.category)
    with open(args.prompts) as f:
        templates = [line.strip() for line in f if line.strip()]
    stage = f"stage{args.stage}"
    # Opened lazily so that only the current step's inputs are resident, as in Rust.
    record = safe_open(args.record, framework="pt")
    names = [k for k in record.keys() if k.startswith(stage + ".")]
    count = len({k.split(".")[1] for k in names})
    if count <= args.warmup:
        raise SystemExit(f"{args.record} holds {count} {stage} steps, not more than --warmup {args.warmup}")

    def inputs(i):
        prefix = f"{stage}.{i}."
        return {k[len(prefix) :]: record.get_tensor(k) for k in names if k.startswith(prefix)}

    vector = models.table.weight[models.category_id].detach().clone()
    if args.stage == 1:
        vector.requires_grad_(True)
        optimizer = ref.adamw([vector], args, args.stage1_lr)

        def step(i, batch):
            template = templates[int(batch["template_index"].item())]
            return ref.stage1_step(models, args, vector, optimizer, batch, template, i + 1)[3]

    else:
        optimizer, hidden = ref.stage2_start(models, args, vector)

        def step(i, batch):
            return ref.stage2_step(models, optimizer, batch, hidden, i + 1)

    baseline = resident_bytes()
    seconds, cpu, losses = [], [], []
    for i in range(count):
        batch = inputs(i)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        losses.append(step(i, batch))
        seconds.append(time.perf_counter() - start)
        cpu.append(cpu_seconds() - cpu_start)
        print(f"step {i + 1}: {seconds[-1]:.3f} s", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    timed = seconds[args.warmup :]
    report = {
        "impl": "python",
        "stage": args.stage,
        "steps": len(timed),
        "warmup": args.warmup,
        "batch": int(inputs(0)["pixels"].shape[0]),
        "resolution": int(inputs(0)["pixels"].shape[-1]),
        "threads": torch.get_num_threads(),
        "seconds_per_step": statistics.median(timed),
        "all_seconds": timed,
        "warmup_seconds": seconds[: args.warmup],
        "cpu_seconds_per_step": statistics.median(cpu[args.warmup :]),
        "all_cpu_seconds": cpu[args.warmup :],
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "losses": losses,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(
        f"python stage {args.stage}: {report['seconds_per_step']:.3f} s/step (median of {len(timed)}), "
        f"peak RSS {peak / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
