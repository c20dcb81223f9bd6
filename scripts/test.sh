#!/usr/bin/env bash
# Sets up .venv (with the PyTorch extras) and runs the test suite.
# TensorFlow and PyTorch cannot share a process, so the PyTorch parity tests run in
# a second pytest process. pytest's exit code 5 (no tests ran) fails.
#
# The tests run in TEST_WORKERS pytest-xdist processes (default 2), a test file per
# worker at a time, and share one XLA compilation cache for the run: a computation
# that several tests compile (or a launcher subprocess, or a notebook kernel) is
# compiled once. The cache starts empty and is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TORCH=1 bash scripts/setup.sh
JAX_COMPILATION_CACHE_DIR="$(mktemp -d -t jackpot_jax_xla_cache.XXXXXX)"
trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
export JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
WORKERS=(-n "${TEST_WORKERS:-2}" --dist loadfile)
.venv/bin/python -m pytest -q "${WORKERS[@]}" tests --ignore=tests/torch "$@"
.venv/bin/python -m pytest -q "${WORKERS[@]}" tests/torch "$@"
