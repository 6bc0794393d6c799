#!/usr/bin/env bash
# Generates the Python gRPC stubs for the coreg.v1 contracts (messages, service
# stubs and .pyi type hints) from proto/coreg/v1/*.proto.
#
# Usage: generate_stubs.sh [OUT_DIR]
#   OUT_DIR   where the `coreg` package goes; default target/python-stubs. A relative
#             path is taken relative to the repository root, so the script gives the
#             same result from any working directory.
# Environment:
#   COREG_PYTHON  the interpreter holding grpcio-tools; default .venv/bin/python
#                 (relative paths again from the repository root).
#
# With OUT_DIR on sys.path, `from coreg.v1 import trainer_pb2, trainer_pb2_grpc`
# works: protoc writes modules that import each other as `coreg.v1.…`, so the
# script adds the package `__init__.py` files protoc does not write.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$repo_root"

out_dir="${1:-target/python-stubs}"
python="${COREG_PYTHON:-.venv/bin/python}"

if ! "$python" -c "import grpc_tools.protoc" 2>/dev/null; then
  echo "generate_stubs.sh: $python cannot import grpc_tools (pip install -r tests/reference/requirements.txt)" >&2
  exit 1
fi

# Regenerate from scratch so stubs of a deleted or renamed proto do not linger.
rm -rf "$out_dir/coreg"
mkdir -p "$out_dir"

"$python" -m grpc_tools.protoc \
  -I proto \
  --python_out="$out_dir" \
  --grpc_python_out="$out_dir" \
  --pyi_out="$out_dir" \
  proto/coreg/v1/*.proto

touch "$out_dir/coreg/__init__.py" "$out_dir/coreg/v1/__init__.py"
