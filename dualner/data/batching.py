"""Batch arithmetic and the rank-sharded, resumable micro-batch plans of in-memory (stage-1) data.

A plan is a pure function of (window lengths, seed, epoch, world size), identical on every rank, so
a position is just (epoch, step) and resuming replays nothing and skips nothing. Micro batches are
lists of window indices; dualner.data.packing turns each into tensors.

- Sentence batches (the paper's unit): `micro_batch_size` windows each. Packed, they are drawn at
  random (packing removes the padding that length bucketing was for); unpacked, they are length-
  bucketed within pools of `pool_batches` micro batches.
- Token batches (`train.batch_unit=tokens`): windows in a random order fill micro batches of a fixed
  `rows x row_length` shape; sentences per step vary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from dualner.config import TrainConfig, batch_split
from dualner.errors import ConfigError
from dualner.data.packing import cut_micro_batches


@dataclass(frozen=True)
class BatchLayout:
    """global = micro x accumulation x world, in the batch unit (windows, or tokens)."""
    global_batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    unit: str = "sentences"


def derive_batch_layout(train: TrainConfig, world_size: int) -> BatchLayout:
    """Keep the global batch whatever the world size: global = micro x accumulation x world."""
    micro, accumulation = batch_split(train, world_size)  # refuses what does not divide (config.validate)
    return BatchLayout(train.global_batch_size, micro, accumulation, world_size, train.batch_unit)


def bucketed_micro_batches(lengths: Sequence[int], micro_batch_size: int, seed: int, epoch: int,
                           pool_batches: int) -> list[list[int]]:
    """Shuffle, sort by length within pools of `pool_batches` micro batches, cut, shuffle batches.

    Sorting inside a pool keeps rows of similar length together (little padding) while pools and
    batch order stay random from epoch to epoch. `pool_batches=1` gives plain random batches."""
    rng = np.random.default_rng([seed, epoch])
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    pool_size = micro_batch_size * max(1, pool_batches)
    batches: list[list[int]] = []
    for start in range(0, len(order), pool_size):
        pool = order[start:start + pool_size]
        if pool_batches > 1:
            pool = pool[np.argsort(lengths[pool], kind="stable")]
        batches += [pool[i:i + micro_batch_size].tolist() for i in range(0, len(pool), micro_batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def token_micro_batches(lengths: Sequence[int], row_length: int, rows: int, seed: int,
                        epoch: int) -> list[list[int]]:
    """Windows in a random order, each a unit of its own, cut by first fit into micro batches of
    `rows` x `row_length` tokens (`cut_micro_batches`; the last may be partly empty)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths)).tolist()
    return cut_micro_batches([[index] for index in order], [int(n) for n in lengths], 0, rows, row_length)


@dataclass
class BatchPlan:
    lengths: Sequence[int]
    micro_batch_size: int  # windows (sentence batches) or tokens (token batches)
    accumulation_steps: int
    world_size: int
    seed: int
    pool_batches: int = 50
    row_length: int | None = None  # token batches: rows of this length, micro_batch_size // it of them
    _cached_epoch: int | None = field(default=None, init=False, repr=False)
    _cached_batches: list = field(default_factory=list, init=False, repr=False)

    @property
    def micro_batches_per_step(self) -> int:
        return self.accumulation_steps * self.world_size

    def micro_batches(self, epoch: int) -> list[list[int]]:
        if self._cached_epoch != epoch:  # the plan is computed once per epoch
            if self.row_length is None:
                self._cached_batches = bucketed_micro_batches(
                    self.lengths, self.micro_batch_size, self.seed, epoch, self.pool_batches)
            else:
                self._cached_batches = token_micro_batches(
                    self.lengths, self.row_length, self.micro_batch_size // self.row_length, self.seed, epoch)
            self._cached_epoch = epoch
        return self._cached_batches

    def steps_per_epoch(self) -> int:
        """Token batches vary a little in count between epochs; every epoch is cut (or wrapped
        around) to the first epoch's number of steps."""
        steps = len(self.micro_batches(0)) // self.micro_batches_per_step
        if steps == 0:
            raise ConfigError(
                f"{len(self.lengths)} training windows do not fill one optimizer step of "
                f"{self.micro_batches_per_step} micro batches of {self.micro_batch_size}; lower "
                f"train.global_batch_size or give more data")
        return steps

    def rank_step(self, epoch: int, step_in_epoch: int, rank: int) -> list[list[int]]:
        """The micro batches (window indices) that `rank` runs for one optimizer step.

        Micro batch j of the step goes to rank j % world_size, so every rank gets a similar mix."""
        batches = self.micro_batches(epoch)
        first = step_in_epoch * self.micro_batches_per_step
        step = [batches[(first + j) % len(batches)] for j in range(self.micro_batches_per_step)]
        return step[rank::self.world_size]
