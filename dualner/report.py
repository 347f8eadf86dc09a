"""Side-by-side F1 tables of finished runs (their results.json).

    python -m dualner.report runs/quickstart runs/quickstart_stage2 [--split test]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dualner.errors import DataFormatError, MissingPathError
from dualner.run_layout import RunLayout


def side_by_side(runs: dict[str, dict], split: str) -> str:
    languages: list[str] = []
    for results in runs.values():
        for language in results.get(split, {}).get("per_language", {}):
            if language not in languages:
                languages.append(language)
    names = list(runs)
    lines = [f"| {split} F1 | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for language in languages:
        cells = [runs[n].get(split, {}).get("per_language", {}).get(language) for n in names]
        lines.append(f"| {language} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    averages = [runs[n].get(split, {}).get("average") for n in names]
    lines.append("| **average** | " + " | ".join("-" if a is None else f"**{a:.2f}**" for a in averages) + " |")
    return "\n".join(lines)


def results_problem(results) -> str | None:
    """What keeps `results` (a parsed results.json) from being reported, or None."""
    if not isinstance(results, dict):
        return f"a JSON {type(results).__name__}, not an object"
    for split in ("dev", "test"):
        section = results.get(split)
        if section is None:
            continue
        if not isinstance(section, dict) or not isinstance(section.get("per_language", {}), dict):
            return f'"{split}" is not {{"per_language": {{...}}, "average": ...}}'
        scores = [*section.get("per_language", {}).values(), section.get("average")]
        if not all(score is None or isinstance(score, (int, float)) for score in scores):
            return f'"{split}" holds a score that is not a number'
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dualner report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", choices=["dev", "test"], default="test")
    args = parser.parse_args(argv)
    runs = {}
    names = [run.name for run in args.runs]
    for run in args.runs:
        path = RunLayout(run).results
        if not run.exists():
            raise MissingPathError(f"{run}: no such run folder")
        if not run.is_dir():
            raise MissingPathError(f"{run}: a file, not a run folder")
        if not path.is_file():
            stopped = RunLayout(run).stopped
            if stopped.is_file():
                raise MissingPathError(f"{run}: the run stopped before its last step ({stopped.name}); run its "
                                       f"command again to finish it, then report")
            if not RunLayout(run).config.is_file():
                raise MissingPathError(f"{run}: not a DualNER run folder (no config.yaml, no results.json)")
            raise MissingPathError(f"{path}: no results yet: the run has not finished (or is still running)")
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataFormatError(f"{path}: not a readable results file ({error}); rerun the run to rewrite "
                                  f"it") from None
        problem = results_problem(results)
        if problem:
            raise DataFormatError(f"{path}: not a results file of a run ({problem}); rerun the run to rewrite it")
        runs[run.name if names.count(run.name) == 1 else str(run)] = results  # two runs/x: one column each
    print(side_by_side(runs, args.split))


if __name__ == "__main__":
    from dualner.errors import run_entry_point
    run_entry_point(main)
