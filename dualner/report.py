"""Side-by-side F1 tables of finished runs (their results.json).

    python -m dualner.report runs/quickstart runs/quickstart_stage2 [--split test]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

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
    if any(" - " in line for line in lines[2:]):
        lines.append(f"\n-: no {split} score: that run had no data.{split} set for the language (or none at all); "
                     f"its average is over its own languages")
    return "\n".join(lines)


def rerun_remedy(run: Path, damaged: Path) -> str:
    """A remedy that works for a run whose results.json cannot be read: without it, the run's own
    command resumes at its newest checkpoint (the last step) and writes the results again; with it,
    the run refuses to train over results it cannot read."""
    stage = "1"
    try:
        saved = yaml.safe_load(RunLayout(run).config.read_text(encoding="utf-8"))
        stage = "2" if ((saved or {}).get("stage2") or {}).get("init_from") else "1"
    except (OSError, yaml.YAMLError, AttributeError):
        pass  # the command below then names the problem with config.yaml
    return (f"move it aside (mv {damaged} {damaged}.damaged) and run `python -m dualner stage{stage} --config "
            f"{RunLayout(run).config} run.output_dir={run}`: it resumes at the newest checkpoint and writes "
            f"results.json again")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dualner report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--split", choices=["dev", "test"], default="test")
    args = parser.parse_args(argv)
    runs = {}
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
            raise DataFormatError(f"{path}: not a readable results file ({error}); {rerun_remedy(run, path)}") from None
        check_results(results, path, run)
        runs[column_name(run, args.runs)] = results
    if not any(args.split in results for results in runs.values()):
        raise DataFormatError(f"no {args.split} results in {', '.join(map(str, args.runs))} (the runs had no "
                              f"data.{args.split} sets){'; try --split dev' if args.split == 'test' else ''}")
    print(side_by_side(runs, args.split))


def column_name(run: Path, runs: list[Path]) -> str:
    """A run's column: its folder name, or the path as given where two runs share the name."""
    return run.name if sum(other.name == run.name for other in runs) == 1 else str(run)


def check_results(results: object, path: Path, run: Path) -> None:
    """The shape the table reads (dualner.train writes it): an object whose `dev` and `test` entries,
    where present, hold a `per_language` object of F1 numbers and an `average` number."""
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    problem = None
    if not isinstance(results, dict):
        problem = f"a results file is a JSON object, found a {type(results).__name__}"
    else:
        for split in ("dev", "test"):
            entry = results.get(split)
            if entry is None:
                continue
            scores = entry.get("per_language") if isinstance(entry, dict) else None
            if not isinstance(scores, dict) or not number(entry.get("average")):
                problem = f"'{split}' lacks its per_language scores or its average"
            elif (bad := next((language for language, f1 in scores.items() if not number(f1)), None)) is not None:
                problem = f"'{split}.per_language.{bad}' is {scores[bad]!r}, not a number"
            if problem:
                break
    if problem:
        raise DataFormatError(f"{path}: not a DualNER results file: {problem}; {rerun_remedy(run, path)}")


if __name__ == "__main__":
    from dualner.errors import run_entry_point
    run_entry_point(main)
