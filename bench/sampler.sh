#!/usr/bin/env bash
# Denoising steps per second, seconds per image and test-time optimization seconds
# per prompt, and peak memory, on the `small` random model on the CPU: the Rust
# sampler (sampler/examples/sample_bench.rs) next to diffusers
# (tests/reference/sample_bench_reference.py) doing the same work on the same inputs.
# Each side runs in its own process per measure, so each peak RSS is its own. Prints a
# markdown table and writes it to target/bench/sampler.md. See bench/README.md.
#
# Settings (environment): RESOLUTION (512; 256 for a run about four times quicker),
# STEPS (10 denoising steps per image), IMAGES (2 timed images per process), WARMUP
# (1 untimed image, or test-time run of one step, per process first), TTO_STEPS (10)
# and TTO_BATCH (6), the paper's test-time optimization, TTO_PROMPTS (1 timed
# test-time optimization per process), ROUNDS (2: Rust and Python alternate this many
# times per measure, so that a change in the machine's load hits both), THREADS (the
# core count), SEED (0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The exact variables the build uses elsewhere, so that torch-sys does not rebuild.
export LIBTORCH_USE_PYTORCH=1 VIRTUAL_ENV="$ROOT/.venv" PATH="$ROOT/.venv/bin:$PATH"

RESOLUTION="${RESOLUTION:-512}"
STEPS="${STEPS:-10}"
IMAGES="${IMAGES:-2}"
WARMUP="${WARMUP:-1}"
TTO_STEPS="${TTO_STEPS:-10}"
TTO_BATCH="${TTO_BATCH:-6}"
TTO_PROMPTS="${TTO_PROMPTS:-1}"
ROUNDS="${ROUNDS:-2}"
# Both libtorch and torch default to the core count; passing it to both makes the
# comparison explicit rather than relying on the two defaults agreeing.
THREADS="${THREADS:-$(nproc)}"
SEED="${SEED:-0}"

OUT="$ROOT/target/bench"
MODEL="$OUT/small-model"
PYTHON="$ROOT/.venv/bin/python"
mkdir -p "$OUT"
rm -f "$OUT"/sampler.*.json

cargo build --release -p coreg --bin coreg
cargo build --release -p coreg-sampler --features bench --example sample_bench
if [[ ! -f "$MODEL/model_index.json" ]]; then
    "$ROOT/target/release/coreg" model init --size small --seed 0 --out "$MODEL"
fi

# Other work on the machine skews the timings: the table reports the load around them.
cut -d' ' -f1-3 /proc/loadavg > "$OUT/sampler.load.before"
for mode in images tto; do
    record="$OUT/sampler.$mode.record.safetensors"
    runs="$IMAGES"
    [[ "$mode" == tto ]] && runs="$TTO_PROMPTS"
    for round in $(seq 1 "$ROUNDS"); do
        run="sampler.$mode.round$round"
        latents="$OUT/$run.rust.latents.safetensors"
        echo "$run: rust" >&2
        "$ROOT/target/release/examples/sample_bench" --model "$MODEL" --mode "$mode" \
            --resolution "$RESOLUTION" --steps "$STEPS" --tto-steps "$TTO_STEPS" \
            --tto-batch "$TTO_BATCH" --warmup "$WARMUP" --runs "$runs" --seed "$SEED" \
            --threads "$THREADS" --record "$record" --latents-out "$latents" \
            --out "$OUT/$run.rust.json" 2> "$OUT/$run.rust.log"
        # The prompt, token and category the Rust side used.
        mapfile -t concept < <("$PYTHON" -c 'import json, sys
report = json.load(open(sys.argv[1]))
print(report["prompt"], report["placeholder"], report["category"], sep="\n")' "$OUT/$run.rust.json")
        extra=()
        [[ "$mode" == images ]] && extra=(--rust-latents "$latents")
        echo "$run: python" >&2
        (cd "$ROOT/tests/reference" && "$PYTHON" -m sample_bench_reference --mode "$mode" \
            --model "$MODEL" --record "$record" --prompt "${concept[0]}" \
            --placeholder "${concept[1]}" --category "${concept[2]}" --steps "$STEPS" \
            --resolution "$RESOLUTION" --warmup "$WARMUP" --threads "$THREADS" \
            "${extra[@]}" --out "$OUT/$run.python.json") > "$OUT/$run.python.log" 2>&1
        rm -f "$latents"
    done
    rm -f "$record"
done
cut -d' ' -f1-3 /proc/loadavg > "$OUT/sampler.load.after"

"$PYTHON" - "$OUT" "$ROUNDS" <<'EOF' | tee "$OUT/sampler.md"
import json
import platform
import statistics
import sys

out, rounds = sys.argv[1], int(sys.argv[2])
mib = 2**20
cpu_name = next(
    (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
    platform.processor(),
)


def merged(mode, impl):
    """The rounds of one side of one measure as one run: every timed run and step, the
    largest peak, the losses of the first round (all rounds draw the same inputs)."""
    runs = [json.load(open(f"{out}/sampler.{mode}.round{r}.{impl}.json")) for r in range(1, rounds + 1)]
    first = dict(runs[0])
    for run in runs[1:]:
        assert run["losses"] == first["losses"], f"{mode} {impl}: rounds computed different losses"
    for key in ("all_seconds", "all_cpu_seconds", "all_step_seconds", "all_tail_seconds"):
        first[key] = [s for run in runs for s in run[key]]
    first["peak_rss_bytes"] = max(run["peak_rss_bytes"] for run in runs)
    first["max_latent_abs_diff"] = max(run.get("max_latent_abs_diff", 0.0) for run in runs)
    first["max_latent_abs"] = max(run.get("max_latent_abs", 0.0) for run in runs)
    return first


runs = {(mode, impl): merged(mode, impl) for mode in ("images", "tto") for impl in ("rust", "python")}
for mode in ("images", "tto"):
    rust, python = runs[(mode, "rust")], runs[(mode, "python")]
    for key in ("resolution", "threads", "runs", "warmup", "prompt"):
        assert rust[key] == python[key], f"{mode}: {key} differs: {rust[key]} vs {python[key]}"
images, tto = runs[("images", "rust")], runs[("tto", "rust")]
paper = "the paper's" if images["resolution"] == 512 else "not the paper's 512"
load = {when: open(f"{out}/sampler.load.{when}").read().strip() for when in ("before", "after")}
print(
    f"Sampling on the `small` random model, CPU ({cpu_name}), fp32, {images['resolution']} px "
    f"({paper}), DPM-Solver++ 2M, {images['steps']} steps, guidance {images['guidance_scale']} "
    f"(both halves in one U-Net call), 1 image per prompt, prompt {images['prompt']!r}; "
    f"test-time optimization {tto['tto_steps']} steps of batch {tto['tto_batch']}; "
    f"{images['threads']} threads each; {rounds} alternating round(s) per side of "
    f"{images['warmup']} warm-up + {images['runs']} timed image(s) and "
    f"{tto['warmup']} one-step warm-up + {tto['runs']} timed test-time optimization(s); "
    f"load average (1/5/15 min) {load['before']} before, {load['after']} after.\n"
)


def stats(values):
    return statistics.median(values), min(values)


r_img, p_img = runs[("images", "rust")], runs[("images", "python")]
r_tto, p_tto = runs[("tto", "rust")], runs[("tto", "python")]
step = {k: stats(v["all_step_seconds"]) for k, v in (("r", r_img), ("p", p_img))}
image = {k: stats(v["all_seconds"]) for k, v in (("r", r_img), ("p", p_img))}
tail = {k: stats(v["all_tail_seconds"]) for k, v in (("r", r_img), ("p", p_img))}
image_cpu = {k: statistics.median(v["all_cpu_seconds"]) for k, v in (("r", r_img), ("p", p_img))}
prompt = {k: stats(v["all_seconds"]) for k, v in (("r", r_tto), ("p", p_tto))}
prompt_cpu = {k: statistics.median(v["all_cpu_seconds"]) for k, v in (("r", r_tto), ("p", p_tto))}


def peaks(rust, python):
    r, p = rust["peak_rss_bytes"], python["peak_rss_bytes"]
    return f"{r / mib:.0f} | {p / mib:.0f} | {p / r:.2f}"


def timed(name, pair, rust, python):
    (rm, rn), (pm, pn) = pair["r"], pair["p"]
    return (
        f"| {name} | {rm:.3f} ({rn:.3f}) | {pm:.3f} ({pn:.3f}) | {pm / rm:.2f} ({pn / rn:.2f}) "
        f"| {peaks(rust, python)} |"
    )


print(
    "| measure | Rust median (min) | Python median (min) | ratio python/rust median (min) "
    "| Rust peak MiB | Python peak MiB | peak ratio python/rust |"
)
print("|---|---|---|---|---|---|---|")
print(timed("s per denoising step", step, r_img, p_img))
print(
    f"| denoising steps/s | {1 / step['r'][0]:.2f} ({1 / step['r'][1]:.2f}) "
    f"| {1 / step['p'][0]:.2f} ({1 / step['p'][1]:.2f}) "
    f"| {step['p'][0] / step['r'][0]:.2f} ({step['p'][1] / step['r'][1]:.2f}) | {peaks(r_img, p_img)} |"
)
print(timed(f"s per image ({images['steps']} steps)", image, r_img, p_img))
print(timed("s after the last step (VAE decode, PNG)", tail, r_img, p_img))
print(
    f"| CPU s per image | {image_cpu['r']:.2f} | {image_cpu['p']:.2f} "
    f"| {image_cpu['p'] / image_cpu['r']:.2f} | {peaks(r_img, p_img)} |"
)
print(timed(f"TTO s per prompt ({tto['tto_steps']}×{tto['tto_batch']})", prompt, r_tto, p_tto))
print(
    f"| TTO CPU s per prompt | {prompt_cpu['r']:.2f} | {prompt_cpu['p']:.2f} "
    f"| {prompt_cpu['p'] / prompt_cpu['r']:.2f} | {peaks(r_tto, p_tto)} |"
)

loss_diff = max(
    abs(r - p) / max(abs(p), 1e-12)
    for rl, pl in zip(r_tto["losses"], p_tto["losses"])
    for r, p in zip(rl, pl)
)
assert [len(l) for l in r_tto["losses"]] == [len(l) for l in p_tto["losses"]], "TTO step counts differ"
print(
    f"\nSame work: the final latents differ by at most {p_img['max_latent_abs_diff']:.1e} "
    f"(largest magnitude {p_img['max_latent_abs']:.2f}); the test-time losses by at most "
    f"{loss_diff:.1e} relative."
)
print(
    "\nRatios > 1: Rust is faster or smaller (for steps/s, Rust's rate over Python's). Step: "
    "the time between two consecutive step-end reports (U-Net on both halves, guidance, "
    "solver update), steps 2 to N of every timed image. Image: prompt and negative-prompt "
    "encoding, every step, VAE decode and PNG encoding; after the last step: from the last "
    "step-end report to the PNG. TTO: every test-time step (both "
    "context losses, backward, AdamW) for one prompt. CPU: user + system time of all "
    "threads. Peak: the whole process's peak resident set, the images process for the "
    "image rows and the test-time process for the TTO rows (Python's includes the "
    "interpreter, torch, diffusers and transformers; Rust's the sampler's untouched copy "
    "of the base U-Net)."
)
EOF
