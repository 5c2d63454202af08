#!/usr/bin/env bash
# The main job, end to end on CPU: set up, train a fusion head over the four 4-bit stand-ins on the
# built-in topics task, save it, reload it with FusionModel.from_pretrained, and print the budget tables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-outputs/quickstart}
rm -rf "$OUT"
accelerate launch --num_processes 1 --cpu scripts/train_fusion.py --output_dir "$OUT"
python scripts/check_head.py "$OUT/head"
python scripts/plan.py --config configs/standins_4llm.yaml
python scripts/plan.py --config configs/fusion_4llm.yaml
