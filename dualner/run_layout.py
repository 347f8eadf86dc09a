"""Where everything of a run lives, in one place (README "Run folders"). Every module that reads or
writes a run folder asks `RunLayout` for the path instead of spelling it:

    <run.output_dir>/
        .dualner.lock                one live run per folder (dualner.checkpoint.RunLock)
        config.yaml                  the resolved configuration the run was started with
        config_history.jsonl         one line per job: its changes to the operational settings
        model/                       tokenizer, encoder config, label set (what inference needs)
        checkpoints/step-N/          the engine's files + COMPLETE (each file's size and CRC-32)
        checkpoints/best.json        which step scored best on dev, and its scores
        stopped.json                 present while the run is stopped before its last step
        tensorboard/  losses.jsonl  results.json  profile/
        stage2_data/                 stage 2's labeled source as JSONL (with src_id)
        samples_rank<R>.jsonl        stage2.sample_log: which samples each step read

This module imports nothing heavy: the command line and the job scripts read it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

COMPLETE_MARKER = "COMPLETE"  # a folder is finished (a checkpoint, a universal conversion) only with it
BEST_POINTER = "best.json"  # in a checkpoints folder: which step scored best
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    return f"step-{step}"


def aside_name(path: Path) -> Path:
    """Where files that would be replaced are kept: `<path>.old-<time>` beside `path`, never an
    existing name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}.old-{stamp}")
    number = 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.old-{stamp}-{number}")
    return candidate


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_checkpoint(cls, step_dir: Path) -> "RunLayout":
        """The run a `checkpoints/step-N` folder belongs to."""
        return cls(Path(step_dir).parent.parent)

    lock = property(lambda self: self.root / ".dualner.lock")
    config = property(lambda self: self.root / "config.yaml")
    config_history = property(lambda self: self.root / "config_history.jsonl")
    model = property(lambda self: self.root / "model")
    checkpoints = property(lambda self: self.root / "checkpoints")
    best_pointer = property(lambda self: self.checkpoints / BEST_POINTER)
    stopped = property(lambda self: self.root / "stopped.json")
    tensorboard = property(lambda self: self.root / "tensorboard")
    losses = property(lambda self: self.root / "losses.jsonl")
    results = property(lambda self: self.root / "results.json")
    profile = property(lambda self: self.root / "profile")
    stage2_data = property(lambda self: self.root / "stage2_data")

    def step(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def samples(self, rank: int) -> Path:
        return self.root / f"samples_rank{rank}.jsonl"

    # What a run writes in its folder (besides the lock): what run.overwrite moves aside.
    ENTRIES = ("config.yaml", "config_history.jsonl", "model", "checkpoints", "tensorboard", "losses.jsonl",
               "results.json", "stopped.json", "stage2_data")
    ENTRY_PATTERNS = ("samples_rank*.jsonl",)
