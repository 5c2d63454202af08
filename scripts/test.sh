#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite on CPU, offline: one pytest worker per core
# (FUSION_TEST_WORKERS, default 2), one torch thread each (more threads on shared cores are much slower).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m pytest -q -n "${FUSION_TEST_WORKERS:-2}" "$@"
