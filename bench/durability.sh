#!/usr/bin/env bash
# What SD 2.1-sized state costs to store: a stage-2 checkpoint (10.4 GB) and a
# concept's exact U-Net delta (3.4 GB), both streamed in parts as the trainer does, with the `full` model
# shape and random weights; the peak resident-set growth of each write next to the
# data's size; and the share of a stage 2 the default checkpoint cadence spends
# checkpointing. Writes target/bench/durability.json. See bench/README.md.
#
# PROFILE=dev builds with the test profile (dependencies at opt-level 2, which is
# where the time goes: libtorch copies, SHA-256, the HTTP client) instead of release.
#
# Needs about 12 GB of memory and 15 GB of disk. Both go to a `file://` folder;
# STORE=s3 sends the delta to moto_server instead (207 parts; about 10 GB of moto's
# memory, since it assembles a completed upload in memory, which rules the 10.4 GB
# checkpoint out here) and skips the read-back, since moto copies the whole object
# for every ranged GET (about 3 s per 4 MiB chunk of the delta).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export LIBTORCH_USE_PYTORCH=1 VIRTUAL_ENV="$ROOT/.venv" PATH="$ROOT/.venv/bin:$PATH"

OUT="$ROOT/target/bench"
STORE_DIR="$OUT/durability-store"
mkdir -p "$OUT"
rm -rf "$STORE_DIR"

PROFILE="${PROFILE:-release}"
if [[ "$PROFILE" == release ]]; then
    cargo build --release -p coreg --features bench --example durability_bench
    BENCH="$ROOT/target/release/examples/durability_bench"
else
    cargo build -p coreg --features bench --example durability_bench
    BENCH="$ROOT/target/debug/examples/durability_bench"
fi

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$ROOT/.venv/bin/moto_server" -H 127.0.0.1 -p "$PORT" >"$OUT/durability-moto.log" 2>&1 &
MOTO=$!
trap 'kill $MOTO 2>/dev/null; rm -rf "$STORE_DIR"' EXIT
for _ in $(seq 100); do
    curl -s "http://127.0.0.1:$PORT" >/dev/null && break
    sleep 0.1
done
python3 -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:$PORT', \
aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\
.create_bucket(Bucket='bench')"

READ_BACK=()
if [[ "${STORE:-file}" == s3 ]]; then
    CONCEPT_STORE="s3://bench"
    READ_BACK=(--no-read-back)
else
    CONCEPT_STORE="file://$STORE_DIR/concept"
fi
OPTIONS="aws_endpoint=http://127.0.0.1:$PORT,aws_access_key_id=test,aws_secret_access_key=test,aws_region=us-east-1,aws_allow_http=true"
"$BENCH" \
    --checkpoint-store "file://$STORE_DIR" \
    --concept-store "$CONCEPT_STORE" \
    --options "$OPTIONS" "${READ_BACK[@]}" | tee "$OUT/durability.json"
