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

build: setup
	cargo build --workspace --all-targets

lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test: build lint
	cargo test --workspace

demo: build
	cargo run --quiet -p coreg --bin coreg -- model init --size tiny --seed 0 --out target/demo/model
	@echo "demo model written to target/demo/model"

# Seconds per stage-1/stage-2 step and peak memory, Rust beside the Python reference
# (a benchmark, not a test: see bench/README.md).
bench: build
	bench/steps.sh

clean-setup:
	rm -rf $(VENV) $(STAMP)
