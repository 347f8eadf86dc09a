"""Wall time of `--help` for every command and launcher (median of N runs, each a fresh interpreter):
what a user waits for before any work starts (issue 19). Prints a Markdown table.

    python bench/cli_startup.py [--repeats 5] [--repo PATH]   (PATH: another checkout, for a before/after)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ["stage1", "stage2", "evaluate", "export", "predict", "report", "config", "prepare"]


def seconds(command: list[str], repo: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    started = time.perf_counter()
    subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    cases = ([("python -m dualner --help", ["-m", "dualner", "--help"])]
             + [(f"python -m dualner {c} --help", ["-m", "dualner", c, "--help"]) for c in COMMANDS]
             + [(f"python launchers/{p.name} --help", [f"launchers/{p.name}", "--help"])
                for p in sorted((args.repo / "launchers").glob("*.py"))])
    print("| command | median of %d (s) |\n|---|---|" % args.repeats)
    for label, command in cases:
        times = [seconds([sys.executable, *command], args.repo) for _ in range(args.repeats)]
        print(f"| `{label}` | {statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()
