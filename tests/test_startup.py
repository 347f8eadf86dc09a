"""`--help` answers at once: every command parses its arguments before importing torch,
transformers, DeepSpeed or seqeval (bench/RESULTS.md "CLI start-up" has the times)."""

import subprocess
import sys

import pytest

from dualner.cli import COMMANDS
from tests.conftest import REPO, child_env

HEAVY = ("torch", "transformers", "deepspeed", "seqeval", "sklearn", "datasets")
HELPS = ([["-m", "dualner", "--help"]] + [["-m", "dualner", command, "--help"] for command in COMMANDS]
         + [[str(path.relative_to(REPO)), "--help"] for path in sorted((REPO / "launchers").glob("*.py"))])


def imported_modules(importtime_log: str) -> set[str]:
    """Module names from `python -X importtime`'s lines ("import time: self | cumulative | name")."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


@pytest.mark.parametrize("args", HELPS, ids=[" ".join(args[-2:]) for args in HELPS])
def test_help_imports_nothing_heavy(args):
    result = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=REPO, capture_output=True, text=True,
                            env=child_env(PYTHONPATH=str(REPO)), timeout=120)
    assert result.returncode == 0 and "dualner" in result.stdout, result.stdout + result.stderr[-2000:]
    modules = imported_modules(result.stderr)
    assert "dualner.cli" in modules  # the log was read
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
