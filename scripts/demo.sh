#!/usr/bin/env bash
# Sets up .venv and runs the embedded demo (digits, 90% sparsity). Extra flags pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m jackpot_jax.main --workdir=runs/demo "$@"
