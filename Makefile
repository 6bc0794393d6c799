# The two commands a user needs: `make demo` and `make test`. Both set up what is
# missing first (a Python venv holding torch 2.11.0, whose libtorch tch links, and
# the reference packages the parity tests compare against) and are fast when done.

SHELL := /bin/bash
VENV := $(CURDIR)/.venv
STAMP := $(CURDIR)/.setup

# tch finds libtorch through the venv's torch; the build scripts add an rpath to it.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)
export VIRTUAL_ENV := $(VENV)
export COREG_PYTHON := $(VENV)/bin/python
# Python stubs generated from proto/ with grpcio-tools, for the Python client tests.
PY_STUBS := $(CURDIR)/target/python-stubs
export COREG_PYTHON_STUBS := $(PY_STUBS)

.PHONY: setup build test lint demo bench clean-setup

setup: $(STAMP)/venv $(PY_STUBS)/.stamp

$(STAMP)/venv: tests/reference/requirements.txt
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/reference/requirements.txt
	@mkdir -p $(STAMP) && touch $@

$(PY_STUBS)/.stamp: $(STAMP)/venv $(wildcard proto/coreg/v1/*.proto) tests/clients/python/generate_stubs.sh
	tests/clients/python/generate_stubs.sh $(PY_STUBS)
	@touch $@

# The Go client (clients/go): installs protoc-gen-go and protoc-gen-go-grpc at pinned
# versions through the Go module proxy into target/tools/bin, checks that the
# committed stubs in clients/go/gen match proto/, and vets the module.
GO_STAMP := $(STAMP)/go-client
setup: $(GO_STAMP)

$(GO_STAMP): $(STAMP)/venv $(wildcard proto/coreg/v1/*.proto) clients/go/generate.sh clients/go/go.mod clients/go/go.sum $(shell find clients/go -name '*.go' 2>/dev/null)
	clients/go/generate.sh --check
	@cd clients/go && unformatted="$$(gofmt -l .)" && if [ -n "$$unformatted" ]; then \
	  echo "clients/go: not gofmt-formatted (run gofmt -w): $$unformatted" >&2; exit 1; fi
	cd clients/go && go vet ./...
	@mkdir -p $(STAMP) && touch $@

# The Python client package (clients/python, `coreg_client`): checks that its
# committed stubs match proto/ (generate.sh --check), then installs it editable into
# the venv with pytest, for tests/e2e/tests/integration/python_client.rs (which reruns the check).
PY_CLIENT_STAMP := $(STAMP)/python-client
setup: $(PY_CLIENT_STAMP)

$(PY_CLIENT_STAMP): $(STAMP)/venv $(wildcard proto/coreg/v1/*.proto) clients/python/generate.sh clients/python/pyproject.toml clients/python/requirements-test.txt $(wildcard clients/python/coreg_client/_proto/coreg/v1/*)
	clients/python/generate.sh --check
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-build-isolation -e clients/python -r clients/python/requirements-test.txt
	@mkdir -p $(STAMP) && touch $@

# toxiproxy, the fault-injecting TCP proxy the trainer's chaos test puts in front of
# the S3 API (latency, throttling, reset connections, partitions), built at a pinned
# version through the Go module proxy into target/tools/bin.
TOXIPROXY_VERSION := v2.5.0
export COREG_TOXIPROXY := $(CURDIR)/target/tools/bin/toxiproxy-server
setup: $(COREG_TOXIPROXY)

$(COREG_TOXIPROXY):
	@mkdir -p $(STAMP)/toxiproxy
	GOBIN=$(STAMP)/toxiproxy GOFLAGS=-buildvcs=false go install github.com/Shopify/toxiproxy/v2/cmd/server@$(TOXIPROXY_VERSION)
	@mkdir -p $(dir $@) && mv $(STAMP)/toxiproxy/server $@

# The binaries (the demo runs them). Tests, examples and benches are built by the
# commands that use them: each links libtorch (~400 MB), so none is linked twice.
build: setup
	cargo build --workspace

# Formatting, clippy on every target (examples and benches included, without linking
# them), the API docs with warnings denied (broken intra-doc links), and no module
# cycles inside a crate (tests/lint/module_cycles.py).
lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --all-features -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items --quiet
	python3 tests/lint/module_cycles.py shared/src trainer/src sampler/src serving/src

# Every test but the slow lane: one integration-test binary per crate plus the
# cross-service crate (tests/e2e), each linking libtorch once.
test: build lint test-deploy
	cargo test --workspace

# The slow lane: tests marked `#[ignore = "slow lane: …"]` (the full default
# schedule, 300 + 1000 steps, on file:// and S3). Not part of `make test`.
.PHONY: test-slow
test-slow: build
	cargo test --workspace -- --ignored

# deploy/ checked offline (deploy/validate.py): every overlay rendered by kustomize,
# every manifest validated against the Kubernetes schemas, cross-references and the
# trainer's exit codes checked, checkov finding nothing unexplained. Its tools live
# apart from the reference venv: checkov's dependencies cannot disturb those pins.
DEPLOY_VENV := $(CURDIR)/.venv-deploy
TOOLS := $(CURDIR)/target/tools/bin
KUSTOMIZE_VERSION := v5.5.0

.PHONY: test-deploy setup-deploy
test-deploy: setup-deploy
	KUSTOMIZE=$(TOOLS)/kustomize VIRTUAL_ENV=$(DEPLOY_VENV) $(DEPLOY_VENV)/bin/python deploy/validate.py

setup-deploy: $(STAMP)/deploy-venv $(TOOLS)/kustomize

$(STAMP)/deploy-venv: tests/deploy/requirements.txt
	@test -x $(DEPLOY_VENV)/bin/python || python3 -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/deploy/requirements.txt
	@mkdir -p $(STAMP) && touch $@

# kustomize built from source through the Go module proxy. Without Go, validate.py
# falls back to a kustomize or kubectl (`kubectl kustomize`) found on PATH.
$(TOOLS)/kustomize:
	@if command -v go >/dev/null; then \
	  GOBIN=$(TOOLS) GOFLAGS=-buildvcs=false go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION); \
	else echo "go not found: deploy/validate.py will look for kustomize or kubectl on PATH"; fi

# Both services on loopback with the tiny random model (made under target/demo/model),
# a concept trained from demo/photos/, PNGs with and without test-time optimization
# under target/demo/images/ (see demo/README.md; COREG_DEMO_MODEL for real weights).
demo: build
	demo/run.sh

# Seconds per stage-1/stage-2 step and peak memory, Rust beside the Python reference
# (a benchmark, not a test: see bench/README.md), after the sampler's.
bench: build bench-sampler
	bench/steps.sh

# Denoising steps/s, seconds per image and test-time optimization seconds per prompt,
# the Rust sampler beside diffusers (a benchmark, not a test: see bench/README.md).
.PHONY: bench-sampler
bench-sampler: build
	bench/sampler.sh

clean-setup:
	rm -rf $(VENV) $(DEPLOY_VENV) $(STAMP)
