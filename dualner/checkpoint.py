"""Checkpoints: `step-N/` folders holding DeepSpeed's files, the trainer state in the client state,
and a completion marker written last, so a crash at any moment leaves the previous one loadable.

Layout of a run directory:
    config.yaml                  the resolved configuration
    model/                       tokenizer, encoder config, label set (what inference needs)
    checkpoints/step-N/          DeepSpeed files + COMPLETE (written after every rank finished)
    checkpoints/best.json        which step scored best on dev, and its scores
    tensorboard/
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from dualner import faults
from dualner.backend.comm import barrier, current, is_main_process
from dualner.backend.deepspeed_engine import CheckpointError, consolidated_state_dict

COMPLETE_MARKER = "COMPLETE"
BEST_POINTER = "best.json"
MODEL_ASSETS = "model"
ASSETS_FILE = "dualner.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def write_json_atomic(path: Path, value) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(temporary, path)


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir()
             if (match := _STEP_DIR.match(path.name)) and path.is_dir()]
    return sorted(found)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def latest_complete(root: Path) -> Path | None:
    complete = [path for _, path in step_dirs(root) if is_complete(path)]
    return complete[-1] if complete else None


def read_best(root: Path) -> dict | None:
    pointer = root / BEST_POINTER
    return json.loads(pointer.read_text(encoding="utf-8")) if pointer.is_file() else None


def save_checkpoint(engine, root: Path, step: int, client_state: dict) -> Path:
    """Every rank calls this; the marker is written by rank 0 after all ranks have written."""
    tag = f"step-{step}"
    path = root / tag
    if is_main_process() and path.exists():  # a half-written leftover of a crashed run
        shutil.rmtree(path)
    barrier()
    engine.save(root, tag, client_state)
    faults.kill_if_due("kill_in_save", current().rank, step)
    barrier()
    if is_main_process():
        write_json_atomic(path / COMPLETE_MARKER, {"step": step})
    barrier()
    return path


def mark_best(root: Path, step: int, scores: dict) -> None:
    if is_main_process():
        write_json_atomic(root / BEST_POINTER, {"step": step, "path": f"step-{step}", **scores})


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints and the best one; drop the rest."""
    if not is_main_process():
        return
    best = read_best(root)
    best_path = root / best["path"] if best else None
    complete = [path for _, path in step_dirs(root) if is_complete(path)]
    for path in complete[:-keep_last] if keep_last > 0 else complete:
        if path != best_path:
            shutil.rmtree(path, ignore_errors=True)


def remove_incomplete(root: Path) -> None:
    """Half-written folders are never loaded; clear them before a resumed run writes again."""
    if is_main_process():
        for _, path in step_dirs(root):
            if not is_complete(path):
                shutil.rmtree(path, ignore_errors=True)
    barrier()


def load_checkpoint(engine, path: Path, world_size: int | None = None) -> dict:
    """Load a complete `path` into the engine (on another number of ranks than wrote it too)."""
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    return engine.load(path, world_size)


def resolve_checkpoint(path: str | Path) -> Path:
    """A step-N folder, a checkpoints folder or a run folder -> the step-N folder to read
    (the best one where a best is recorded, else the newest complete one)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _STEP_DIR.match(path.name):
        if not is_complete(path):
            raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE_MARKER} marker)")
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    best = read_best(root)
    if best and is_complete(root / best["path"]):
        return root / best["path"]
    newest = latest_complete(root)
    if newest is None:
        raise CheckpointError(f"{path}: holds no complete step-N checkpoint")
    return newest


def model_assets_dir(checkpoint: Path) -> Path:
    return checkpoint.parent.parent / MODEL_ASSETS


def load_model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights from a checkpoint of any ZeRO stage, in one process."""
    return consolidated_state_dict(checkpoint)
