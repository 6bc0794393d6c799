#!/usr/bin/env bash
# The coreg demo: both services on loopback, a concept trained from the photos in
# demo/photos/, images generated with it for three prompts, without and with CoRe
# test-time optimization. `make demo` runs this after building; see demo/README.md.
#
# By default it uses the tiny random model (made under target/demo/model when
# missing) and a short schedule: a few minutes on 2 CPU cores. The images of a
# random model are noise; the point is the whole path, end to end.
#
# Everything it writes goes under target/demo/:
#   model/                 the tiny random model (kept between runs)
#   trainer.toml, sampler.toml   the services' configurations
#   trainer.log, sampler.log     their logs
#   store/                 the file:// object store both services share (fresh each run)
#   images/plain/*.png, images/tto/*.png, images/summary.json
#
# Environment:
#   COREG_DEMO_MODEL     a diffusers folder of real SD 2.1 weights
#                        (stable-diffusion-2-1-base: 512 px, or stable-diffusion-2-1:
#                        768 px); the tiny random model when unset
#   COREG_DEMO_SCHEDULE  quick (default with the tiny model) or paper (the paper's
#                        defaults at the model's native size; default with
#                        COREG_DEMO_MODEL)
#   COREG_DEMO_DEVICE    cpu (default with the tiny model), auto (default with
#                        COREG_DEMO_MODEL), cuda or cuda:N
#   COREG_DEMO_PHOTOS    a folder of 3-10 photos of your own concept (default
#                        demo/photos)
#   COREG_DEMO_CATEGORY  its category word, a single CLIP token (default toy)
#   COREG_DEMO_BIN       the folder holding coreg, coreg-trainer, coreg-sampler
#                        (default target/debug, what `make build` makes)
#   COREG_DEMO_ARGS      more options for demo/demo.py, e.g. "--stage1-steps 200"
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

demo="$repo/target/demo"
bin="${COREG_DEMO_BIN:-$repo/target/debug}"
python="${COREG_PYTHON:-$repo/.venv/bin/python}"
stubs="${COREG_PYTHON_STUBS:-$repo/target/python-stubs}"
photos="${COREG_DEMO_PHOTOS:-$repo/demo/photos}"
category="${COREG_DEMO_CATEGORY:-toy}"

die() {
  echo "demo: $*" >&2
  exit 1
}

for program in coreg coreg-trainer coreg-sampler; do
  [[ -x "$bin/$program" ]] || die "no $bin/$program: run \`make demo\` (or \`make build\` first)"
done
[[ -x "$python" ]] || die "no Python at $python: run \`make demo\` (or \`make setup\`)"
[[ -f "$stubs/coreg/v1/sampler_pb2.py" ]] ||
  die "no Python stubs in $stubs: run \`make demo\` (or \`make setup\`)"
[[ -d "$photos" ]] || die "no photo folder $photos"

mkdir -p "$demo"
if [[ -n "${COREG_DEMO_MODEL:-}" ]]; then
  model="$(cd "$COREG_DEMO_MODEL" && pwd)" || die "COREG_DEMO_MODEL=$COREG_DEMO_MODEL is not a folder"
  [[ -f "$model/model_index.json" ]] ||
    die "$model has no model_index.json: COREG_DEMO_MODEL names a diffusers folder of SD 2.1"
  schedule="${COREG_DEMO_SCHEDULE:-paper}"
  device="${COREG_DEMO_DEVICE:-auto}"
else
  model="$demo/model"
  if [[ ! -f "$model/model_index.json" ]]; then
    echo "demo: making the tiny random model in $model"
    rm -rf "$model"
    "$bin/coreg" model init --size tiny --seed 0 --out "$model"
  fi
  schedule="${COREG_DEMO_SCHEDULE:-quick}"
  device="${COREG_DEMO_DEVICE:-cpu}"
  # The tiny model's operations are too small to gain from more threads, and
  # libtorch's spinning threads slow everything down when the cores are shared
  # (1 thread: about 0.3 s a step at 128 px on 2 cores, also when they are busy).
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
echo "demo: model $model on $device"

# A fresh store and fresh images each run: the same job and the same images every
# time.
store="$demo/store"
images="$demo/images"
rm -rf "$store" "$images"
mkdir -p "$store" "$images"

cat >"$demo/trainer.toml" <<EOF
# Written by demo/run.sh. Start by hand with:
#   $bin/coreg-trainer serve --config $demo/trainer.toml
listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
poll_milliseconds = 200

[model]
path = "$model"
device = "$device"

[store]
url = "file://$store"
EOF

cat >"$demo/sampler.toml" <<EOF
# Written by demo/run.sh. Start by hand with:
#   $bin/coreg-sampler serve --config $demo/sampler.toml
listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"

[model]
path = "$model"
device = "$device"

[store]
url = "file://$store"
EOF

pids=()
stop_services() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  pids=()
}
trap stop_services EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts `coreg-$1 serve` in the background, logging to target/demo/$1.log.
start() {
  : >"$demo/$1.log"
  # COREG_ variables of the caller's shell would override the TOML: leave them out.
  # shellcheck disable=SC2046 # one `-u NAME` pair per variable.
  env $(env | sed -n 's/^\(COREG_[A-Z_]*\)=.*/-u \1/p' | grep -v -e COREG_PYTHON -e COREG_DEMO) \
    "$bin/coreg-$1" serve --config "$demo/$1.toml" >>"$demo/$1.log" 2>&1 &
  pids+=("$!")
}

# The address `coreg-$1` listens on, from its log, once it says so.
address_of() {
  local name=$1 pid=$2 deadline=$((SECONDS + 300)) line
  while ((SECONDS < deadline)); do
    line="$(grep -m1 '^listening on ' "$demo/$name.log" || true)"
    if [[ -n "$line" ]]; then
      echo "${line#listening on }"
      return
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "demo: coreg-$name exited; the end of $demo/$name.log:" >&2
      tail -20 "$demo/$name.log" >&2
      return 1
    fi
    sleep 0.2
  done
  echo "demo: coreg-$name did not listen within 300 s; see $demo/$name.log" >&2
  return 1
}

start trainer
start sampler
trainer="$(address_of trainer "${pids[0]}")"
sampler="$(address_of sampler "${pids[1]}")"
echo "demo: coreg-trainer on $trainer, coreg-sampler on $sampler (logs: $demo/*.log)"

# In the background and waited for, so that a SIGTERM to this script stops the
# client and the services at once rather than after the client ends.
# shellcheck disable=SC2086 # COREG_DEMO_ARGS is a list of options.
"$python" "$repo/demo/demo.py" \
  --trainer "$trainer" --sampler "$sampler" --stubs "$stubs" \
  --photos "$photos" --category "$category" --model "$model" \
  --out "$images" --schedule "$schedule" ${COREG_DEMO_ARGS:-} &
client=$!
pids=("$client" "${pids[@]}")
status=0
wait "$client" || status=$?
pids=("${pids[@]:1}")
((status == 0)) || exit "$status"

stop_services
echo "demo: done; the services are stopped. Images: $images/{plain,tto}/"
