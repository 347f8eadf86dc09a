#!/usr/bin/env bash
# The main job on the embedded sample: stage 1 on English, then the per-language F1 table.
# Extra arguments are config overrides, e.g. `bash scripts/quickstart.sh train.max_steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/install.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
"$PYTHON" -m dualner.encoders.e5 >/dev/null  # builds the offline encoder once per machine
"$PYTHON" launchers/stage1.py --config configs/quickstart.yaml "$@"
