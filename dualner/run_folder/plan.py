"""The resume choice: what a training job does with its run folder, decided reading only (the table
of dualner.run_folder), before anything is written and again once the run lock is held."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from dualner import backend
from dualner.backend import comm
from dualner.checkpoint import completion_record, is_complete, read_best, recorded_best, step_dirs, verify
from dualner.config import Config, config_to_dict
from dualner.errors import CheckpointError, ConfigError, RunLockedError, UserError
from dualner.run_folder.lock import RunLock
from dualner.run_layout import STEP_DIR, RunLayout, aside_name

# Config sections whose change means "a different run", not "the same run continued".
RUN_IDENTITY = ("model", "data", "stage2")
# ... except these, which say how to run it, not what it is: a resume may change them (another
# number of loader workers after a requeue, a higher bad-record limit after a stop).
OPERATIONAL = {"data": ("loader_workers", "max_bad_records"), "stage2": ("sample_log", "teacher_placement")}


def run_identity(config: dict, section: str):
    values = config.get(section)
    if not isinstance(values, dict):
        return values
    return {key: value for key, value in values.items() if key not in OPERATIONAL.get(section, ())}
# Keys that say where and how a job starts, not how the model is trained: never "a change".
_NOT_SETTINGS = {"run.output_dir", "run.resume", "run.overwrite"}


@dataclass
class FolderPlan:
    resume_from: str | None = None  # the step-N folder this job continues from; None: a new run
    aside: str | None = None  # move the earlier run's files there first (a rewind: its newer work)
    rewind: bool = False  # resume_from is older than the run's newest work, which goes to `aside`
    best: dict | None = None  # best.json as this job starts (a resume; stage 2's teacher)
    changes: dict = field(default_factory=dict)  # dotted key -> [previous job's value, this job's]
    job: int = 1  # this job's number in the run (config_history.jsonl)

    @property
    def start_step(self) -> int:
        """The step this job starts after (0: a new run)."""
        return step_of(self.resume_from)

    def decision(self) -> tuple:
        """What the job does with the folder (not when, nor the settings it records)."""
        return self.resume_from, self.aside is not None, self.rewind, self.best


def run_entries(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    found = [run_dir / name for name in RunLayout.ENTRIES if (run_dir / name).exists()]
    for pattern in RunLayout.ENTRY_PATTERNS:
        found += sorted(run_dir.glob(pattern))
    return found


def holds_a_run(layout: RunLayout) -> bool:
    """A complete checkpoint or the results of a run are in the folder."""
    return any(is_complete(path) for _, path in step_dirs(layout.checkpoints)) or layout.results.is_file()


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; an empty mapping adds nothing (it equals no key)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: the run's saved config cannot be read ({str(error).splitlines()[0]}); "
                          f"set run.overwrite=true to start a new run there, or choose another run.output_dir") from None


def _history(run_dir: Path) -> list[dict]:
    path = RunLayout(run_dir).config_history
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: the others still tell the story
    return entries


def _run_summary(layout: RunLayout) -> str:
    steps = [path.name for _, path in step_dirs(layout.checkpoints) if is_complete(path)]
    finished = layout.results.is_file()
    return (("a finished run" if finished else "an unfinished run")
            + (f" (checkpoints {', '.join(steps)})" if steps else ""))


def resolve_resume(resume: str, layout: RunLayout) -> Path:
    """`run.resume=step-N` (a checkpoint of this run) or a path to a step-N folder, checked."""
    path = layout.checkpoints / resume if STEP_DIR.match(resume) else Path(resume)
    if path.is_dir() and not STEP_DIR.match(path.name):
        raise CheckpointError(f"run.resume={resume}: not a checkpoint folder (a checkpoint is a "
                              f"<run>/checkpoints/step-N folder); name one, or use run.resume=auto")
    if not path.is_dir():
        steps = [p.name for _, p in step_dirs(layout.checkpoints) if is_complete(p)]
        raise CheckpointError(f"run.resume={resume}: no such step; the run has "
                              f"{', '.join(steps) if steps else 'no complete checkpoint'}"
                              + ("; use one of them or run.resume=auto" if steps else ""))
    problem = verify(path)
    if problem:
        raise CheckpointError(f"run.resume={resume}: {problem}; use another checkpoint or run.resume=auto")
    return path


def newer_work(layout: RunLayout, step: int) -> list[str]:
    """What continuing the run from `step` would overwrite: its complete checkpoints after `step`, and
    the results of a run that finished after it."""
    found = [path.name for number, path in step_dirs(layout.checkpoints) if number > step and is_complete(path)]
    finished = finished_after(layout.root, step)
    return found + ([finished] if finished else [])


def finished_after(run_dir: Path, step: int) -> str | None:
    """`results.json (...)` when the run's results are of a step after `step` (or unreadable: never
    overwritten unasked), else None."""
    results = RunLayout(run_dir).results
    if not results.is_file():
        return None
    try:
        finished = json.loads(results.read_text(encoding="utf-8"))["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return "results.json (unreadable)"
    if not isinstance(finished, int):
        return "results.json (unreadable)"
    return f"results.json (a run finished at step {finished})" if finished > step else None


def _best_after_rewind(resume: str, chosen: Path, layout: RunLayout) -> dict | None:
    """best.json as it stood at checkpoint `chosen` (a rewind puts it back); refused when the
    checkpoint it names is gone, since the final test and stage 2's teacher read it."""
    best, step = read_best(layout.checkpoints), step_of(str(chosen))
    if best is None or best["step"] <= step:
        return best
    earlier = recorded_best(chosen)
    if earlier is not None and is_complete(layout.checkpoints / earlier["path"]):
        return earlier
    why = (f"it does not record which checkpoint was best at step {step} (written before 2026-12)" if earlier is None
           else f"the checkpoint that was best at step {step}, {earlier['path']}, was removed by train.keep_last")
    raise CheckpointError(f"run.resume={resume}: cannot continue from {chosen.name}: best.json names "
                          f"{best['path']}, after it, and {why}; continue from {best['path']} or later, or start a "
                          f"new run (another run.output_dir)")


def plan_folder(cfg: Config, layout: RunLayout, engine_setup: backend.EngineSetup, log=None) -> FolderPlan:
    """Decide what this job does with its folder, reading only; refusals raise here."""
    run_dir = layout.root
    entries = run_entries(run_dir)
    current = config_to_dict(cfg)
    overwrite, resume = cfg.run.overwrite, cfg.run.resume
    if overwrite and resume in ("auto", "none"):  # a new run
        if not entries:
            return FolderPlan()
        _check_aside_writable(run_dir)
        return FolderPlan(aside=str(aside_name(run_dir)))
    holds_run = holds_a_run(layout)
    chosen = resolve_resume(resume, layout) if resume not in ("auto", "none") else None
    # the run this job continues: the folder's, or the one whose checkpoint run.resume names
    foreign = chosen is not None and chosen.resolve().parent != layout.checkpoints.resolve()
    continued = RunLayout.of_checkpoint(chosen) if foreign else layout
    saved = continued.config
    if (holds_run or foreign) and saved.is_file():
        previous = _read_yaml(saved)
        changed = [name for name in RUN_IDENTITY if run_identity(previous, name) != run_identity(current, name)]
        if changed:
            keys = _differing_keys({n: run_identity(previous, n) for n in changed},
                                   {n: run_identity(current, n) for n in changed}, changed)
            if foreign:
                raise ConfigError(f"run.resume={resume} is a checkpoint of a run whose config.yaml ({saved}) differs "
                                  f"in section(s) {', '.join(changed)}: {keys}; resume it with its own settings")
            raise ConfigError(
                f"run.output_dir={run_dir} holds another run (its config.yaml differs in section(s) "
                f"{', '.join(changed)}: {keys}); choose a new run.output_dir or set run.overwrite=true "
                f"(the old run is then moved to {run_dir.name}.old-<time>)")
    aside, rewind, best = None, False, None
    if resume == "none":
        if holds_run:
            raise ConfigError(
                f"run.resume=none: run.output_dir={run_dir} holds {_run_summary(layout)}; a new run "
                f"would mix with it. Set run.overwrite=true to start a new run (the old one is moved to "
                f"{run_dir.name}.old-<time>), choose another run.output_dir, or run.resume=auto to continue it")
    elif resume == "auto":
        skipped = []  # newer checkpoints that did not verify, named in a refusal below
        for _, path in reversed(step_dirs(layout.checkpoints)):
            if not is_complete(path):
                continue  # half-written: cleared when the job starts
            problem = verify(path)
            if problem is None:
                chosen = path
                break
            skipped.append(problem)
            if log is not None:
                log.warning("skipping a damaged checkpoint: %s", problem)
        if chosen is None and holds_run:
            damaged = any(is_complete(path) for _, path in step_dirs(layout.checkpoints))
            raise CheckpointError(
                f"run.output_dir={run_dir} holds {_run_summary(layout)} but "
                + ("none of its checkpoints verifies (see the warnings above)" if damaged
                   else "no checkpoint to continue from (they were removed)")
                + "; set run.overwrite=true to start a new run (the old one is moved aside), or choose another "
                  "run.output_dir")
        finished = finished_after(run_dir, step_of(str(chosen))) if chosen is not None else None
        if finished:  # its newer checkpoints were removed or damaged: no silent retraining over its results
            raise CheckpointError(
                f"run.output_dir={run_dir} holds {finished}, but its newest usable checkpoint is {chosen.name}"
                + (f" (newer ones are damaged: {'; '.join(skipped)})" if skipped else "") + "; "
                f"continuing would train again over those results. Set run.resume={chosen.name} "
                f"run.overwrite=true to do so (the results and copies of the logs are then moved to "
                f"{run_dir.name}.old-<time>), or choose another run.output_dir")
        best = read_best(layout.checkpoints) if chosen is not None else None
    elif foreign:
        if entries and not overwrite:
            raise ConfigError(
                f"run.resume={resume} is a checkpoint of another run, and run.output_dir={run_dir} holds "
                f"{_run_summary(layout) if holds_run else 'files of an earlier start'}; continuing there "
                f"would mix two runs. Choose a fresh run.output_dir, or set run.overwrite=true as well (the folder's "
                f"run is then moved to {run_dir.name}.old-<time> first)")
        aside = str(aside_name(run_dir)) if entries else None
    else:
        newer = newer_work(layout, step_of(str(chosen)))
        if newer and not overwrite:
            raise CheckpointError(
                f"run.resume={resume}: run.output_dir={run_dir} holds newer work ({', '.join(newer)}) that continuing "
                f"from {chosen.name} would overwrite; set run.overwrite=true as well to continue from {chosen.name} "
                f"anyway (that work and copies of the logs are then moved to {run_dir.name}.old-<time>), or "
                f"run.resume=auto to continue from the newest checkpoint")
        best = _best_after_rewind(resume, chosen, layout) if newer else read_best(layout.checkpoints)
        if newer:
            aside, rewind = str(aside_name(run_dir)), True
    if aside is not None:
        _check_aside_writable(run_dir)
    if chosen is None:  # a new run: leftovers of a start that never checkpointed go aside
        if entries:
            _check_aside_writable(run_dir)
            return FolderPlan(aside=str(aside_name(run_dir)))
        return FolderPlan()
    backend.check_resume(engine_setup, chosen, completion_record(chosen))  # the engine's answer
    history = _history(continued.root)
    if history and isinstance(history[-1].get("config"), dict):
        before = history[-1]["config"]
    else:
        before = _read_yaml(saved) if saved.is_file() else current
    old, new = flatten(before), flatten(current)
    changes = {key: [old.get(key), new.get(key)] for key in sorted(set(old) | set(new))
               if key not in _NOT_SETTINGS and old.get(key) != new.get(key)}
    return FolderPlan(resume_from=str(chosen), aside=aside, rewind=rewind, best=best, changes=changes,
                      job=1 if foreign else (len(history) or 1) + 1)


def confirm_plan(first: FolderPlan, cfg: Config, layout: RunLayout,
                 engine_setup: backend.EngineSetup) -> FolderPlan:
    """Rank 0, holding the run lock: decide again, since another job may have written the folder
    after `first` was decided (two jobs started together). The same decision: the plan, with its
    recorded settings brought up to date; another: refused, nothing written."""
    again = plan_folder(cfg, layout, engine_setup)
    if again.decision() != first.decision():
        raise RunLockedError(
            f"run.output_dir={layout.root} changed while this job was starting (another job wrote "
            f"{_run_summary(layout)} there); this job wrote nothing. Run it again to continue "
            f"that run (run.resume=auto), or choose another run.output_dir")
    return again


def decided_on_rank0(decide: Callable[[], FolderPlan]) -> FolderPlan:
    """`decide()` on rank 0 (which reads the folder); every rank gets its plan, or raises its refusal."""
    outcome = None
    if comm.current().is_main:
        try:
            outcome = ("ok", decide())
        except UserError as error:
            outcome = ("refused", error)
    outcome = comm.broadcast_object(outcome)
    if outcome[0] == "refused":
        raise outcome[1]
    return outcome[1]


def decide_plan(cfg: Config, engine_setup: backend.EngineSetup, log) -> FolderPlan:
    """What this job does with its folder, decided by rank 0 reading only (a live run holding the
    folder is refused before its files are judged); every rank gets the answer, or raises the same
    refusal."""
    layout = RunLayout(Path(cfg.run.output_dir))

    def decide() -> FolderPlan:
        RunLock(layout.root).probe()
        return plan_folder(cfg, layout, engine_setup, log)
    return decided_on_rank0(decide)


def _differing_keys(previous: dict, current: dict, sections: list[str]) -> str:
    old = flatten({name: previous.get(name) or {} for name in sections})
    new = flatten({name: current.get(name) or {} for name in sections})
    keys = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def _check_aside_writable(run_dir: Path) -> None:
    parent = run_dir.resolve().parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"run.output_dir={run_dir}: the earlier run's files would be moved to "
                          f"{run_dir.name}.old-<time> beside it, but {parent} is not writable; "
                          f"choose another run.output_dir")


def step_of(path: str | None) -> int:
    match = STEP_DIR.match(Path(path).name) if path else None
    return int(match.group(1)) if match else 0
