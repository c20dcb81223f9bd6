#!/usr/bin/env bash
# Sets up .venv (with the PyTorch extras) and runs the test suite.
# TensorFlow and PyTorch cannot share a process, so the PyTorch parity tests run in
# a second pytest process. pytest's exit code 5 (no tests ran) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TORCH=1 bash scripts/setup.sh
.venv/bin/python -m pytest -q tests --ignore=tests/torch "$@"
.venv/bin/python -m pytest -q tests/torch "$@"
