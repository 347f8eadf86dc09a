"""A training job before it builds anything (`start_job`), from a config already validated and frozen
(dualner.build): the process group, the device, the batch layout, the engine's setup and what the job
will do with its run folder, every one checked and nothing written. dualner.build goes on from it:
the stage's inputs and model, the engine (`Job.build_engine`), the run folder
(dualner.run_folder.RunFolder.open), the data, the recipe and the trainer (dualner.train).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dualner import backend
from dualner.backend import comm
from dualner.backend.placement import pin_memory_wanted
from dualner.checkpoint import completion_record
from dualner.config import Config
from dualner.data.batching import BatchLayout, derive_batch_layout
from dualner.data.loader import default_workers
from dualner.data.packing import Collator, packs_by_default
from dualner.errors import ConfigError
from dualner.logging import get_logger
from dualner.run_folder import FolderPlan, decide_plan


@dataclass(frozen=True)
class Job:
    cfg: Config
    stage_name: str
    info: comm.DistInfo
    device: torch.device
    layout: BatchLayout  # global = micro x accumulation x world: the one source of these numbers
    engine_setup: backend.EngineSetup  # the engine's settings, checked for this layout and device
    folder_plan: FolderPlan  # a new run, or the checkpoint this job continues from (decided again under the lock)
    loader_workers: int
    pin_memory: bool
    log: logging.Logger

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)

    def collator(self, pad_id: int, position_offset: int | None, **extra) -> Collator:
        return training_collator(self.cfg, self.device, pad_id, position_offset, **extra)

    def build_engine(self, model: torch.nn.Module, total_steps: int) -> backend.TrainingEngine:
        """The student's engine (builds no files: the run folder is opened after it)."""
        return self.engine_setup.build(model, self.cfg.train, total_steps, compile_encoder=self.cfg.model.compile,
                                       fixed_shapes=self.cfg.train.batch_unit == "tokens")


def start_job(cfg: Config, stage: int) -> Job:
    info = comm.init_distributed()
    log = get_logger()
    run_dir = Path(cfg.run.output_dir)
    check_output_dir(run_dir)
    seed_everything(cfg.run.seed, info.rank)
    layout = derive_batch_layout(cfg.train, info.world_size)
    device = comm.accelerator_device(info.local_rank)
    engine_setup = backend.prepare_engine(cfg, layout, device)
    folder_plan = decide_plan(cfg, engine_setup, log)  # refusals: nothing written yet
    if folder_plan.resume_from:  # the engine continues as the checkpoint was trained (its precision)
        checkpoint = Path(folder_plan.resume_from)
        engine_setup = engine_setup.continuing(checkpoint, completion_record(checkpoint))
    workers = default_workers(cfg.data.loader_workers, device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return Job(cfg, f"stage {stage}", info, device, layout, engine_setup, folder_plan, workers,
               pin_memory_wanted(device), log)


def training_collator(cfg: Config, device: torch.device, pad_id: int, position_offset: int | None,
                      **extra) -> Collator:
    """Packed rows when the config asks for them and the encoder family allows it (the config's own
    rules on packing and row lengths: dualner.config.rules)."""
    packing = cfg.data.packing
    if packing == "auto":
        packing = cfg.train.batch_unit == "tokens" or packs_by_default(device)
    packed = packing and position_offset is not None
    if cfg.train.batch_unit == "tokens" and not packed:  # the encoder's family decides this one
        raise ConfigError("train.batch_unit=tokens needs packed rows (data.packing=true and an "
                          "encoder family dualner.attention knows)")
    row_length = cfg.data.pack_length or cfg.data.max_length
    rows = cfg.train.micro_batch_size // row_length if cfg.train.batch_unit == "tokens" else None
    return Collator(pad_id=pad_id, packed=packed, row_length=row_length,
                    position_offset=position_offset or 0, rows=rows, **extra)


def seed_everything(seed: int, rank: int) -> None:
    # Each rank draws different dropout masks, reproducibly.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def check_output_dir(path: Path) -> None:
    """Before anything is written: the run folder must be a folder we can write in."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run.output_dir={path} is a file; choose a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.output_dir={path}: cannot write in {existing} (read-only or no permission); "
                          f"choose another run.output_dir")
