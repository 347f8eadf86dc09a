"""Where everything of a run lives, in one place (README "Run folders"). Every module that reads or
writes a run folder asks `RunLayout` for the path instead of spelling it; what the folder's files mean
and who may write them: dualner.run_folder.

    <run.output_dir>/
        .dualner.lock                one live run per folder (dualner.run_folder.lock.RunLock)
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


class Entry:
    """A file or folder a run writes at the top of its folder: `layout.<attribute>` is its path.
    `moved_aside`: it belongs to the run, so `run.overwrite` moves it aside with the run."""

    def __init__(self, name: str, moved_aside: bool = True):
        self.name, self.moved_aside = name, moved_aside

    def __get__(self, layout: "RunLayout | None", owner: type) -> "Path | Entry":
        return self if layout is None else layout.root / self.name


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_checkpoint(cls, step_dir: Path) -> "RunLayout":
        """The run a `checkpoints/step-N` folder belongs to."""
        return cls(Path(step_dir).parent.parent)

    lock = Entry(".dualner.lock", moved_aside=False)  # the live job's, released when it ends
    config = Entry("config.yaml")
    config_history = Entry("config_history.jsonl")
    model = Entry("model")
    checkpoints = Entry("checkpoints")
    stopped = Entry("stopped.json")
    tensorboard = Entry("tensorboard")
    losses = Entry("losses.jsonl")
    results = Entry("results.json")
    profile = Entry("profile")
    stage2_data = Entry("stage2_data")
    best_pointer = property(lambda self: self.checkpoints / BEST_POINTER)

    def step(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def samples(self, rank: int) -> Path:
        return self.root / f"samples_rank{rank}.jsonl"

    ENTRY_PATTERNS = ("samples_rank*.jsonl",)  # `samples`: one file per rank


# What a run writes in its folder (the lock aside): what run.overwrite moves aside.
RunLayout.ENTRIES = tuple(entry.name for entry in vars(RunLayout).values()
                          if isinstance(entry, Entry) and entry.moved_aside)
