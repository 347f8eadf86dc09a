"""Loaders of collated micro batches: worker processes build them (packing included) and pin them,
so the training thread only moves them to the device."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from dualner.data.batching import BatchPlan


def default_workers(configured: int | None, device: torch.device, local_world_size: int) -> int:
    """`data.loader_workers`, or: none on the CPU (the cores train), else up to 4 per GPU rank from
    the cores the node has."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(1, local_world_size) - 1))


class PlannedMicroBatches(Dataset):
    """This rank's micro batches of a BatchPlan from `start_step` to `total_steps`, collated."""

    def __init__(self, windows: Sequence[dict], plan: BatchPlan, rank: int, collate: Callable,
                 steps_per_epoch: int, start_step: int, total_steps: int):
        self.windows, self.plan, self.rank, self.collate = windows, plan, rank, collate
        self.steps_per_epoch, self.start_step = steps_per_epoch, start_step
        self.accumulation = plan.accumulation_steps
        self.length = max(0, total_steps - start_step) * self.accumulation

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        step, micro = divmod(index, self.accumulation)
        epoch, in_epoch = divmod(self.start_step + step, self.steps_per_epoch)
        indices = self.plan.rank_step(epoch, in_epoch, self.rank)[micro]
        return self.collate([self.windows[i] for i in indices])


def micro_batch_loader(dataset: Dataset, workers: int, pin_memory: bool, seed: int) -> DataLoader:
    # A generator of its own: creating an iterator draws a base seed, and drawing it from the global
    # RNG would shift the dropout masks of a resumed run.
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed))
