#!/usr/bin/env bash
# Sets up .venv and runs the test suite. pytest's exit code 5 (no tests ran) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q tests "$@"
