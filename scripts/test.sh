#!/usr/bin/env bash
# The whole test suite (installs what it needs first). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
# Two worker processes, each taking whole test files (module fixtures are built once): the tests
# mostly wait on launchers and ranks, so two files at a time fit 2 cores. DUALNER_TEST_WORKERS=0 runs
# everything in one process. Files go out in collection order, the longest first (tests/conftest.py).
"$PYTHON" -m pytest -q --durations=15 -n "${DUALNER_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
