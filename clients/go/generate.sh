#!/usr/bin/env bash
# Generates the Go gRPC stubs for the coreg.v1 contracts from proto/coreg/v1/*.proto
# into clients/go/gen/coreg/v1 (package coregv1), with protoc-gen-go and
# protoc-gen-go-grpc at the pinned versions below.
#
# Usage: generate.sh [--check] [OUT_DIR]
#   OUT_DIR   the module root the `gen/coreg/v1` folder goes under; default
#             clients/go (the committed stubs). A relative path is taken relative to
#             the repository root.
#   --check   generate into a temporary folder and compare it with the committed
#             stubs; exit 1 (with a diff) when they differ, i.e. when proto/ changed
#             and the stubs were not regenerated.
# Environment:
#   COREG_PYTHON  the interpreter holding grpcio-tools, whose bundled protoc (and
#                 well-known types) this uses; default .venv/bin/python.
#   GOBIN_DIR     where the plugins are installed; default target/tools/bin.
#
# The plugins are fetched through the Go module proxy (`go install …@version`) the
# first time, or when the installed ones are not the pinned versions.
set -euo pipefail

PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2
MODULE=github.com/coreg/coreg/clients/go
GO_PACKAGE="$MODULE/gen/coreg/v1;coregv1"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo_root"

check=0
if [[ "${1:-}" == "--check" ]]; then
  check=1
  shift
fi
python="${COREG_PYTHON:-.venv/bin/python}"
bin_dir="${GOBIN_DIR:-target/tools/bin}"
mkdir -p "$bin_dir"
bin_dir="$(cd "$bin_dir" && pwd)"

if ! "$python" -c "import grpc_tools.protoc" 2>/dev/null; then
  echo "generate.sh: $python cannot import grpc_tools (pip install -r tests/reference/requirements.txt)" >&2
  exit 1
fi
if ! command -v go >/dev/null; then
  echo "generate.sh: no \`go\` on PATH (the Go client needs Go 1.26 or newer, as grpc-go v1.85 does)" >&2
  exit 1
fi

# Installs `package@version` into $bin_dir unless the binary there is that version.
install_plugin() {
  local name="$1" package="$2" version="$3"
  local have=""
  if [[ -x "$bin_dir/$name" ]]; then
    have="$("$bin_dir/$name" --version 2>/dev/null | awk '{print $NF}')"
  fi
  # protoc-gen-go prints "v1.36.12", protoc-gen-go-grpc "1.6.2".
  if [[ "v${have#v}" != "$version" ]]; then
    echo "generate.sh: installing $package@$version into $bin_dir" >&2
    GOBIN="$bin_dir" go install "$package@$version"
  fi
}
install_plugin protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO_VERSION"
install_plugin protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION"

# Generates into module root $1.
generate() {
  local out="$1"
  # The protos name `github.com/coreg/coreg/gen/go/...` as their go_package; M maps
  # them into this module instead, and module= strips the module path so the files
  # land in $out/gen/coreg/v1.
  local maps=()
  for proto in proto/coreg/v1/*.proto; do
    maps+=("M${proto#proto/}=$GO_PACKAGE")
  done
  local go_opts=("module=$MODULE" "${maps[@]}")
  local args=(-I proto
    --plugin=protoc-gen-go="$bin_dir/protoc-gen-go"
    --plugin=protoc-gen-go-grpc="$bin_dir/protoc-gen-go-grpc"
    --go_out="$out" --go-grpc_out="$out")
  local opt
  for opt in "${go_opts[@]}"; do
    args+=(--go_opt="$opt" --go-grpc_opt="$opt")
  done
  # Regenerate from scratch so stubs of a deleted or renamed proto do not linger.
  rm -rf "$out/gen/coreg"
  mkdir -p "$out"
  "$python" -m grpc_tools.protoc "${args[@]}" proto/coreg/v1/*.proto
}

if [[ $check == 1 ]]; then
  committed="${1:-clients/go}"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  generate "$tmp"
  if ! diff -ru "$committed/gen/coreg" "$tmp/gen/coreg"; then
    echo "generate.sh: the Go stubs in $committed/gen are not current with proto/;" \
      "run clients/go/generate.sh and commit the result" >&2
    exit 1
  fi
  echo "generate.sh: the Go stubs in $committed/gen are current" >&2
else
  generate "${1:-clients/go}"
fi
