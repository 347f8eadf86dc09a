"""Carrying out a folder plan (rank 0, holding the run lock): the earlier run, or a rewind's newer
work, moved aside, the config saved, the job recorded; and the clean-up of half-written checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from dualner.checkpoint import step_dirs, write_json_atomic
from dualner.config import Config, config_to_dict, save_config
from dualner.run_folder.plan import FolderPlan, run_entries, step_of
from dualner.run_layout import COMPLETE_MARKER, RunLayout


def apply_plan(plan: FolderPlan, cfg: Config, run_dir: Path, log=None) -> None:
    """Rank 0, holding the run lock: move the earlier run (or a rewind's newer work) aside, save the
    config, record the job."""
    if plan.rewind:
        _set_newer_work_aside(plan, run_dir, log)
    elif plan.aside:
        aside = Path(plan.aside)
        aside.mkdir(parents=True)
        moved = run_entries(run_dir)
        for entry in moved:
            os.replace(entry, aside / entry.name)
        if log is not None:
            log.warning("run.output_dir=%s: moved the earlier run's files (%s) to %s; this is a new run",
                        run_dir, ", ".join(entry.name for entry in moved), aside)
    config = config_to_dict(cfg)
    saved = RunLayout(run_dir).config
    if plan.resume_from is None or not saved.is_file():
        save_config(cfg, saved)
    for log_file in (RunLayout(run_dir).losses, RunLayout(run_dir).config_history):
        _drop_a_cut_last_line(log_file)
    entry = {"job": plan.job, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
             "from_step": step_of(plan.resume_from), "resumed_from": plan.resume_from,
             "changes": plan.changes, "config": config}
    with RunLayout(run_dir).config_history.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
    if plan.changes and log is not None:
        log.warning("resuming %s with other settings than its previous job: %s (recorded in %s; config.yaml "
                    "keeps the settings the run started with)", run_dir,
                    ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in plan.changes.items()),
                    RunLayout(run_dir).config_history)


def _set_newer_work_aside(plan: FolderPlan, run_dir: Path, log) -> None:
    """A rewind to step N: what the continued run will overwrite goes to `plan.aside`, laid out like
    the run folder (the checkpoints after N and the results are moved, the logs and best.json
    copied); best.json goes back to its state at N and losses.jsonl is cut back to steps <= N."""
    layout, aside, step = RunLayout(run_dir), Path(plan.aside), step_of(plan.resume_from)
    RunLayout(aside).checkpoints.mkdir(parents=True)
    moved = [path for number, path in step_dirs(layout.checkpoints) if number > step]
    moved += [path for path in (layout.results, layout.stopped) if path.is_file()]
    for path in moved:
        os.replace(path, aside / path.relative_to(run_dir))
    copied = [path for path in (layout.best_pointer, layout.losses, layout.config_history, layout.config,
                                *sorted(run_dir.glob(RunLayout.ENTRY_PATTERNS[0]))) if path.is_file()]
    for path in copied:
        shutil.copy2(path, aside / path.relative_to(run_dir))
    if layout.tensorboard.is_dir():  # its events after N are hidden by the resumed job's writer
        shutil.copytree(layout.tensorboard, aside / layout.tensorboard.name)
        copied.append(layout.tensorboard)
    if plan.best is None:
        layout.best_pointer.unlink(missing_ok=True)
    else:
        write_json_atomic(layout.best_pointer, plan.best)
    if layout.losses.is_file():
        kept = [line for line in layout.losses.read_text(encoding="utf-8").splitlines(keepends=True)
                if _logged_step(line) <= step]
        partial = layout.losses.with_name(f".{layout.losses.name}.partial")
        partial.write_text("".join(kept), encoding="utf-8")
        os.replace(partial, layout.losses)
    if log is not None:
        log.warning("run.output_dir=%s: continuing from step %d over newer work: moved %s and copied %s to %s; "
                    "losses.jsonl now ends at step %d", run_dir, step,
                    ", ".join(str(path.relative_to(run_dir)) for path in moved) or "nothing",
                    ", ".join(str(path.relative_to(run_dir)) for path in copied) or "nothing", aside, step)


def _drop_a_cut_last_line(path: Path) -> None:
    """A crash while a line was appended leaves it unterminated, and this job's first line would be
    glued to it (both unreadable). A cut losses.jsonl line is of a step after the checkpoint (a step
    is logged before it is saved), so this job logs it again."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("rb+") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def _logged_step(line: str) -> float:
    """The step of a losses.jsonl line; a line cut short by a crash counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def clear_incomplete(layout: RunLayout) -> None:
    """Half-written step-N folders (no COMPLETE marker) of a crashed save: never loaded, removed."""
    for _, path in step_dirs(layout.checkpoints):
        if not (path / COMPLETE_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
