#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite on CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
HF_HUB_OFFLINE=1 python -m pytest -q "$@"
