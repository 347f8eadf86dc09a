"""The run folder, owned here (README "Run folders"): the lock (`lock`), what a training job does with
the folder it is given, `run.output_dir` (`plan`), carrying that out and clearing half-written
checkpoints (`apply`), and the folder once the job holds it (`RunFolder`). Where each file lives:
dualner.run_layout.

Everything is decided first, reading only (`plan_folder`, rank 0, before anything is written: a
refusal leaves the folder's bytes as they were), then decided again once the run lock is held
(`confirm_plan`: another job may have written the folder in between, e.g. two jobs started together;
a different decision is refused, still writing nothing), then carried out (`apply_plan`):

    folder                                          what the job does
    fresh (no earlier run in it)                    a new run
    a run, same settings, run.resume=auto           continues it from its newest complete checkpoint
    a run, other train/eval/logging settings        continues it; the changes are logged and recorded
                                                    in config_history.jsonl (config.yaml stays the
                                                    config the run was started with)
    a run, other model/data/stage2 settings         refused (run.overwrite=true: a new run)
    a run, run.resume=none                          refused (run.overwrite=true: a new run)
    a run, run.resume=step-N                        continues from that checkpoint of the run
    ... with newer checkpoints or results than N    refused: they would be overwritten. With
                                                    run.overwrite=true ("rewind"): they are moved to
                                                    `<output_dir>.old-<time>` with copies of the
                                                    logs, losses.jsonl is cut back to step N
    a run, run.resume=<another run's step-N>        refused (run.overwrite=true: the folder's run is
                                                    moved aside, the job continues the other run's
                                                    checkpoint there)
    run.overwrite=true                              a new run: the earlier run's files are moved to
                                                    `<output_dir>.old-<time>` first, never resumed
    only leftovers of a start that never            a new run: the leftovers (logs, config) are moved
    checkpointed                                    aside the same way, so one run per losses.jsonl

Only the files a run writes are moved (RunLayout.ENTRIES); anything else in the folder stays.
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Callable

from dualner import backend
from dualner.backend import comm
from dualner.checkpoint import CheckpointManager
from dualner.config import Config
from dualner.errors import UserError
from dualner.run_folder.apply import apply_plan, clear_incomplete
from dualner.run_folder.lock import RunLock, release_lock, take_lock
from dualner.run_folder.plan import FolderPlan, confirm_plan, decide_plan, decided_on_rank0
from dualner.run_layout import RunLayout

__all__ = ["FolderPlan", "RunFolder", "RunLock", "clear_incomplete", "decide_plan"]


class RunFolder:
    """The run folder once this job holds it (`open`): the run lock taken, the folder plan carried
    out (an earlier run moved aside, the config saved, the job recorded in config_history.jsonl) and
    the model assets written. Whatever holds a RunFolder may write in it; its CheckpointManager
    (the run's only one) decides when to save, what to keep and which checkpoint is best."""

    def __init__(self, layout: RunLayout, lock: RunLock, checkpoints: CheckpointManager, plan: FolderPlan):
        self.layout, self.lock, self.checkpoints, self.plan = layout, lock, checkpoints, plan

    @classmethod
    def open(cls, cfg: Config, plan: FolderPlan, engine_setup: backend.EngineSetup, log: logging.Logger,
             write_assets: Callable[[Path], None]) -> RunFolder:
        """Collective. `plan`: what start-up decided (`decide_plan`), decided again under the lock.
        `write_assets(run_dir)` writes what inference needs (rank 0, a new run)."""
        layout = RunLayout(Path(cfg.run.output_dir))
        lock = RunLock(layout.root)
        take_lock(lock, log)
        atexit.register(release_lock, lock)
        try:
            confirmed = decided_on_rank0(lambda: confirm_plan(plan, cfg, layout, engine_setup))
        except UserError:
            release_lock(lock)
            raise
        if comm.current().is_main:
            apply_plan(confirmed, cfg, layout.root, log)
            if confirmed.resume_from is None or not layout.model.is_dir():
                write_assets(layout.root)
        comm.barrier()
        checkpoints = CheckpointManager(layout.root, cfg.train.keep_last, cfg.train.save_every or cfg.train.eval_every)
        return cls(layout, lock, checkpoints, confirmed)

    def close(self) -> None:
        release_lock(self.lock)
