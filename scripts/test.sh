#!/usr/bin/env bash
# The whole test suite (installs what it needs first). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$PYTHON" -m pytest -q --durations=15 "$@"
