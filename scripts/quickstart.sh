#!/usr/bin/env bash
# The main job on the embedded sample: stage 1 on English, stage 2 (dual teaching with the target
# languages' unlabeled text), then the per-language F1 table of both side by side.
# Extra arguments are config overrides for both stages, e.g. `bash scripts/quickstart.sh train.max_steps=50`.
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$PYTHON" -m dualner.encoders.e5 >/dev/null  # builds the offline encoder once per machine
"$PYTHON" launchers/stage1.py --config configs/quickstart.yaml "$@"
"$PYTHON" launchers/stage2.py --config configs/quickstart_stage2.yaml "$@"
echo
echo "Test F1 per language: stage 1 (MLT, runs/quickstart) and stage 2 (DualNER + TRGGold, runs/quickstart_stage2)"
"$PYTHON" -m dualner report runs/quickstart runs/quickstart_stage2 --split test
