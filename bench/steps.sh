#!/usr/bin/env bash
# Seconds per CoRe stage-1 and stage-2 step and peak memory on the `small` random
# model on the CPU: the Rust stages (shared/examples/step_bench.rs) next to the Python
# reference (tests/reference/bench_reference.py) doing the same steps on the same
# recorded inputs. Each side runs in its own process, so each peak RSS is its own.
# Prints markdown tables and writes them to target/bench/steps.md. See bench/README.md.
#
# Settings (environment): STAGE1_BATCH (6), STAGE2_BATCH (4), RESOLUTION (512, the
# paper's; 256 for a run four times quicker), WARMUP (1), STEPS (3, timed per
# process), ROUNDS (2: Rust and Python alternate this many times per stage, so that a
# change in the machine's load hits both), THREADS (the core count), SEED (0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The exact variables the build uses elsewhere, so that torch-sys does not rebuild.
export LIBTORCH_USE_PYTORCH=1 VIRTUAL_ENV="$ROOT/.venv" PATH="$ROOT/.venv/bin:$PATH"

STAGE1_BATCH="${STAGE1_BATCH:-6}"
STAGE2_BATCH="${STAGE2_BATCH:-4}"
RESOLUTION="${RESOLUTION:-512}"
WARMUP="${WARMUP:-1}"
STEPS="${STEPS:-3}"
ROUNDS="${ROUNDS:-2}"
# Both libtorch and torch default to the core count; passing it to both makes the
# comparison explicit rather than relying on the two defaults agreeing.
THREADS="${THREADS:-$(nproc)}"
SEED="${SEED:-0}"

OUT="$ROOT/target/bench"
MODEL="$OUT/small-model"
PYTHON="$ROOT/.venv/bin/python"
mkdir -p "$OUT"
rm -f "$OUT"/stage*.json

cargo build --release -p coreg --features bench --bin coreg --example step_bench
if [[ ! -f "$MODEL/model_index.json" ]]; then
    "$ROOT/target/release/coreg" model init --size small --seed 0 --out "$MODEL"
fi

# Other work on the machine skews the timings: the table reports the load around them.
cut -d' ' -f1-3 /proc/loadavg > "$OUT/load.before"
for stage in 1 2; do
    batch_var="STAGE${stage}_BATCH"
    record="$OUT/stage$stage.record.safetensors"
    for round in $(seq 1 "$ROUNDS"); do
        run="stage$stage.round$round"
        echo "$run: rust" >&2
        "$ROOT/target/release/examples/step_bench" --model "$MODEL" --stage "$stage" \
            --batch "${!batch_var}" --resolution "$RESOLUTION" --warmup "$WARMUP" \
            --steps "$STEPS" --seed "$SEED" --threads "$THREADS" \
            --record "$record" --out "$OUT/$run.rust.json" 2> "$OUT/$run.rust.log"
        echo "$run: python" >&2
        (cd "$ROOT/tests/reference" && "$PYTHON" -m bench_reference --model "$MODEL" \
            --stage "$stage" --record "$record" \
            --prompts "$ROOT/shared/assets/prompts/animate.txt" --placeholder '<concept>' \
            --category dog --warmup "$WARMUP" --threads "$THREADS" \
            --out "$OUT/$run.python.json") > "$OUT/$run.python.log" 2>&1
    done
    rm -f "$record"
done
cut -d' ' -f1-3 /proc/loadavg > "$OUT/load.after"

"$PYTHON" - "$OUT" "$ROUNDS" <<'EOF' | tee "$OUT/steps.md"
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


def merged(stage, impl):
    """The rounds of one side of one stage as one run: every timed step, the largest
    peak, the losses of the first round (all rounds draw the same inputs)."""
    runs = [json.load(open(f"{out}/stage{stage}.round{r}.{impl}.json")) for r in range(1, rounds + 1)]
    first = dict(runs[0])
    for run in runs[1:]:
        assert run["losses"] == first["losses"], f"stage {stage} {impl}: rounds computed different losses"
    first["all_seconds"] = [s for run in runs for s in run["all_seconds"]]
    first["all_cpu_seconds"] = [s for run in runs for s in run["all_cpu_seconds"]]
    first["peak_rss_bytes"] = max(run["peak_rss_bytes"] for run in runs)
    first["step_rss_bytes"] = max(run["peak_rss_bytes"] - run["baseline_rss_bytes"] for run in runs)
    return first


runs = {(stage, impl): merged(stage, impl) for stage in (1, 2) for impl in ("rust", "python")}
first = runs[(1, "rust")]
paper = "the paper's" if first["resolution"] == 512 else "not the paper's 512"
load = {when: open(f"{out}/load.{when}").read().strip() for when in ("before", "after")}
print(
    f"CoRe training steps on the `small` random model, CPU ({cpu_name}), fp32, "
    f"{first['resolution']} px ({paper}), {first['threads']} threads each; "
    f"{rounds} alternating round(s) of {first['warmup']} warm-up + {first['steps']} timed steps per side; "
    f"load average (1/5/15 min) {load['before']} before, {load['after']} after.\n"
)
print(
    "| stage | batch | rust s/step median (min) | python s/step median (min) "
    "| speed ratio python/rust median (min) | rust CPU s/step | python CPU s/step "
    "| CPU ratio python/rust | max loss rel. diff |"
)
print("|---|---|---|---|---|---|---|---|---|")
for stage in (1, 2):
    rust, python = runs[(stage, "rust")], runs[(stage, "python")]
    for key in ("batch", "resolution", "threads", "steps", "warmup"):
        assert rust[key] == python[key], f"stage {stage}: {key} differs: {rust[key]} vs {python[key]}"
    # The same inputs through the same method give the same losses up to float
    # rounding: a check that both sides did the same work.
    loss_diff = max(abs(r - p) / max(abs(p), 1e-12) for r, p in zip(rust["losses"], python["losses"]))
    wall = {k: (statistics.median(v["all_seconds"]), min(v["all_seconds"])) for k, v in (("r", rust), ("p", python))}
    cpu = {k: statistics.median(v["all_cpu_seconds"]) for k, v in (("r", rust), ("p", python))}
    print(
        f"| {stage} | {rust['batch']} | {wall['r'][0]:.2f} ({wall['r'][1]:.2f}) "
        f"| {wall['p'][0]:.2f} ({wall['p'][1]:.2f}) "
        f"| {wall['p'][0] / wall['r'][0]:.2f} ({wall['p'][1] / wall['r'][1]:.2f}) "
        f"| {cpu['r']:.2f} | {cpu['p']:.2f} | {cpu['p'] / cpu['r']:.2f} | {loss_diff:.1e} |"
    )
print(
    "\n| stage | rust peak MiB | python peak MiB | peak ratio python/rust "
    "| rust step MiB | python step MiB | step ratio python/rust |"
)
print("|---|---|---|---|---|---|---|")
for stage in (1, 2):
    rust, python = runs[(stage, "rust")], runs[(stage, "python")]
    print(
        f"| {stage} | {rust['peak_rss_bytes'] / mib:.0f} | {python['peak_rss_bytes'] / mib:.0f} "
        f"| {python['peak_rss_bytes'] / rust['peak_rss_bytes']:.2f} "
        f"| {rust['step_rss_bytes'] / mib:.0f} | {python['step_rss_bytes'] / mib:.0f} "
        f"| {python['step_rss_bytes'] / rust['step_rss_bytes']:.2f} |"
    )
print(
    "\nRatios > 1: Rust is faster or smaller. s/step: wall clock; CPU s/step: user + system "
    "time of all threads. Peak: the whole process's peak resident set (Python's includes "
    "the interpreter, torch, diffusers and transformers). Step: peak minus the resident "
    "set just before the first step (models loaded), what the steps themselves add."
)
EOF
