"""What a checkpoint is: its files, their COMPLETE record (each file's size and CRC-32) and how it is
saved, verified, chosen and loaded; a run's CheckpointManager (the save interval, keep-last, the best
model) and its Checkpointer (what a checkpoint holds). The folder they live in, its lock and the
choice of the checkpoint a job resumes from: dualner.run_folder.

Where the files are: dualner.run_layout. A step-N folder holds the engine's files and COMPLETE,
written after every rank finished; it lists each file's size and CRC-32, so a checkpoint damaged
later is detected.

A crash at any moment leaves the previous complete checkpoint loadable: a folder without COMPLETE is
never loaded (and is cleared on resume), and one whose files no longer match their COMPLETE record is
skipped for the newest one that does, naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zlib
from pathlib import Path
from typing import Protocol

import torch

from dualner.backend import comm
from dualner.errors import CheckpointError, ConfigError, MissingPathError, describe_os_error
from dualner.run_layout import BEST_POINTER, COMPLETE_MARKER, STEP_DIR, RunLayout, step_name

_CHUNK = 1 << 24


def write_json_atomic(path: Path, value) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(temporary, path)


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir()
             if (match := STEP_DIR.match(path.name)) and path.is_dir()]
    return sorted(found)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def best_record(step: int, scores: dict) -> dict:
    """What best.json holds: the best step, its folder and its dev scores."""
    return {"step": step, "path": step_name(step), **scores}


def read_best(root: Path) -> dict | None:
    pointer = root / BEST_POINTER  # root: a checkpoints folder, whatever its name
    if not pointer.is_file():
        return None
    try:
        best = json.loads(pointer.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:  # written atomically: damaged or edited by hand
        best, problem = None, str(error)
    else:
        problem = "it names no step and step-N path"
    if not (isinstance(best, dict) and isinstance(best.get("step"), int) and isinstance(best.get("path"), str)
            and STEP_DIR.match(best["path"])):
        raise CheckpointError(f"{pointer}: unreadable ({problem}); remove it to use the newest complete checkpoint, "
                              f"or name a step-N folder")
    return best


def completion_record(path: Path) -> dict:
    """A checkpoint's COMPLETE record ({} when it cannot be read)."""
    try:
        record = json.loads((path / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def recorded_best(path: Path) -> dict | None:
    """best.json as it stood when checkpoint `path` was written (its COMPLETE record); None when the
    run had no best yet or the checkpoint predates the record (2026-12)."""
    best = completion_record(path).get("best")
    usable = isinstance(best, dict) and isinstance(best.get("step"), int) and isinstance(best.get("path"), str)
    return best if usable else None


def prunable(root: Path, keep_last: int) -> list[Path]:
    """The complete checkpoints retention may remove: never the best one (best.json), never the
    newest complete one, never one of the newest `keep_last`."""
    best = read_best(root)
    best_path = root / best["path"] if best else None
    complete = [path for _, path in step_dirs(root) if is_complete(path)]
    kept = set(complete[-max(1, keep_last):])
    return [path for path in complete if path not in kept and path != best_path]


# -- integrity -----------------------------------------------------------------------------------
def _crc32(path: Path) -> int:
    value = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def file_manifest(folder: Path) -> dict[str, list[int]]:
    """{relative path: [size, CRC-32]} of every file under `folder` (the marker excluded)."""
    return {str(path.relative_to(folder)): [path.stat().st_size, _crc32(path)]
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != COMPLETE_MARKER}


def verify(path: Path, checksums: bool = True) -> str | None:
    """None when `path` is a complete checkpoint whose files match its COMPLETE record, else what is
    wrong (naming the file)."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return f"{path}: incomplete checkpoint (no {COMPLETE_MARKER} marker)"
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{marker}: unreadable completion record"
    for name, (size, crc) in (record.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{file}: missing (listed in {marker.name})"
        if file.stat().st_size != size:
            return f"{file}: {file.stat().st_size} bytes, {size} when it was written (truncated or damaged)"
        if checksums and _crc32(file) != crc:
            return f"{file}: content changed since it was written (CRC-32 mismatch)"
    return None


def select_checkpoint(path: Path) -> tuple[Path, str]:
    """(the step-N folder to read for `path`, why that one), unchecked."""
    if STEP_DIR.match(path.name):
        return path, "the checkpoint named"
    root = RunLayout(path).checkpoints if RunLayout(path).checkpoints.is_dir() else path
    best = read_best(root)
    complete = [p for _, p in step_dirs(root) if is_complete(p)]
    if best and is_complete(root / best["path"]):
        return root / best["path"], "its best checkpoint (best.json)"
    if not complete:
        raise CheckpointError(f"{path}: holds no complete step-N checkpoint")
    why = (f"best.json names {best['path']}, which is gone" if best else "the run has no best.json")
    return complete[-1], f"its newest complete checkpoint: {why}"


def resolve_checkpoint(path: str | Path) -> Path:
    """A step-N folder, a checkpoints folder or a run folder -> the step-N folder to read (the best
    one where a best is recorded, else the newest complete one), checked against its record."""
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file, not a checkpoint; name a run folder, its checkpoints/ folder "
                              f"or one of its step-N folders")
    chosen, _ = select_checkpoint(path)
    problem = verify(chosen)
    if problem:
        raise CheckpointError(f"{problem}; use another checkpoint")
    return chosen


def checkpoint_choice(path: str | Path) -> str:
    """Which checkpoint `resolve_checkpoint(path)` reads and why, for the user to see."""
    chosen, why = select_checkpoint(Path(path))
    return f"{chosen.name} of {RunLayout.of_checkpoint(chosen).root}: {why}" if why != "the checkpoint named" else str(chosen)


def choice_without_best(path: str | Path) -> str | None:
    """checkpoint_choice(path) when a run folder is read without a usable best.json (its newest
    complete checkpoint is taken), else None: the reader should hear which step it gets."""
    if not Path(path).is_dir() or STEP_DIR.match(Path(path).name):
        return None
    try:
        _, why = select_checkpoint(Path(path))
    except CheckpointError:
        return None  # no checkpoint there (an exported folder): nothing to choose between
    return checkpoint_choice(path) if why.startswith("its newest") else None


def load_model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights from a checkpoint of any engine, in one process, reading no code."""
    from dualner.backend import consolidated_state_dict
    try:
        return consolidated_state_dict(checkpoint)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{checkpoint}: cannot read its weights ({str(error).splitlines()[0][:200]})") from error


# -- the manager -----------------------------------------------------------------------------------
class CheckpointManager:
    """When a run saves, what it keeps and which checkpoint is best. Collective methods are called by
    every rank; rank 0 writes the markers and best.json."""

    def __init__(self, run_dir: Path, keep_last: int, save_every: int):
        self.layout = RunLayout(Path(run_dir))
        self.root = self.layout.checkpoints
        self.keep_last, self.save_every = keep_last, save_every
        self.info = comm.current()

    # -- policy -----------------------------------------------------------------------------------
    def due(self, step: int, *, last: bool, improved: bool, job_done: bool) -> bool:
        return improved or last or job_done or step % self.save_every == 0

    # -- writing ----------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, best: dict | None = None) -> Path:
        """Every rank writes its files; rank 0 writes the COMPLETE record (each file's size and CRC-32,
        and `best`: best.json as of this step, which a rewind to it restores) after all ranks are
        done, then drops the checkpoints beyond keep_last."""
        tag, path = step_name(step), self.layout.step(step)
        if self.info.is_main and path.exists():  # a half-written leftover of a crashed run
            shutil.rmtree(path)
        comm.barrier()
        try:
            engine.save(self.root, tag, client_state)
        except Exception as error:  # noqa: BLE001 (only a full disk or the like becomes a user error)
            problem = describe_os_error(error)
            if problem is None:
                raise
            raise CheckpointError(f"checkpoint {tag} ({path}) not saved: {problem}; the rerun resumes from "
                                  f"the newest complete checkpoint") from error
        comm.barrier()
        if self.info.is_main:
            write_json_atomic(path / COMPLETE_MARKER, {"step": step, **engine.checkpoint_record(), "best": best,
                                                       "files": file_manifest(path)})
        comm.barrier()
        self.prune()
        return path

    def mark_best(self, best: dict) -> None:
        """Record `best` (best_record) in best.json, prune, and let no rank read the old best.json (or
        load a pruned checkpoint) before rank 0 is done."""
        if self.info.is_main:
            write_json_atomic(self.layout.best_pointer, best)
        self.prune()
        comm.barrier()

    def prune(self) -> None:
        """Drop the complete checkpoints that are neither the best, nor the newest complete one, nor
        among the newest `keep_last` (so `keep_last=0` keeps the best and the newest only)."""
        if not self.info.is_main:
            return
        for path in prunable(self.root, self.keep_last):
            shutil.rmtree(path, ignore_errors=True)

    def mark_stopped(self, step: int, reason: str) -> None:
        if self.info.is_main:
            write_json_atomic(self.layout.stopped, {"step": step, "reason": reason})

    def clear_stopped(self) -> None:
        if self.info.is_main:
            self.layout.stopped.unlink(missing_ok=True)

    # -- reading ----------------------------------------------------------------------------------
    def best(self) -> dict | None:
        """best.json, the same answer on every rank."""
        return comm.broadcast_object(read_best(self.root) if self.info.is_main else None)

    def load(self, engine, path: Path, world_size: int | None = None) -> dict:
        if not is_complete(path):
            raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE_MARKER} marker)")
        return engine.load(path, world_size)


# -- what a checkpoint holds -------------------------------------------------------------------------
class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state) -> None: ...


class Checkpointer:
    """Told once what a checkpoint holds (torchtitan's checkpointer): the engine's files, the state
    of each `shared` component (the same on every rank: saved once, under its name) and of each
    `per_rank` component (every rank's own: gathered into `ranks`, a list by rank, and handed back
    whole on load, so a component resumes on another number of ranks as it sees fit)."""

    def __init__(self, manager: CheckpointManager, engine, shared: dict[str, Stateful],
                 per_rank: dict[str, Stateful]):
        self.manager, self.engine, self.shared, self.per_rank = manager, engine, shared, per_rank

    def save(self, step: int, best: dict | None = None) -> Path:
        """Collective: every rank calls it. `best`: best.json as of this step (recorded with it)."""
        mine = {name: component.state_dict() for name, component in self.per_rank.items()}
        client_state = {name: component.state_dict() for name, component in self.shared.items()}
        client_state["ranks"] = comm.all_gather_objects(mine)
        return self.manager.save(self.engine, step, client_state, best)

    def load(self, path: str | Path) -> None:
        """Collective: the engine and every component back to the state of `path`."""
        path = Path(path)
        client_state = self.manager.load(self.engine, path, comm.current().world_size)
        if "trainer" not in client_state or "ranks" not in client_state:
            raise ConfigError(f"{path}: not a DualNER checkpoint of this version (no trainer/rank state); "
                              f"start a new run.output_dir or set run.overwrite=true")
        for name, component in self.shared.items():
            # checkpoints written before 2026-11-30 kept the recipe's keys at the top level
            component.load_state_dict(client_state[name] if name in client_state else client_state)
        ranks = client_state["ranks"]
        for name, component in self.per_rank.items():
            component.load_state_dict([rank[name] for rank in ranks])
