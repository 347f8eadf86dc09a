"""Length-bucketed, rank-sharded, resumable batch plans for in-memory (stage-1) training data.

The plan is a pure function of (lengths, seed, epoch, world size), identical on every rank, so a
position is just (epoch, step) and resuming replays nothing and skips nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


def bucketed_micro_batches(lengths: Sequence[int], micro_batch_size: int, seed: int, epoch: int,
                           pool_batches: int) -> list[list[int]]:
    """Shuffle, sort by length within pools of `pool_batches` micro batches, cut, shuffle batches.

    Sorting inside a pool keeps rows of similar length together (little padding) while pools and
    batch order stay random from epoch to epoch."""
    rng = np.random.default_rng([seed, epoch])
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    pool_size = micro_batch_size * max(1, pool_batches)
    batches: list[list[int]] = []
    for start in range(0, len(order), pool_size):
        pool = order[start:start + pool_size]
        pool = pool[np.argsort(lengths[pool], kind="stable")]
        batches += [pool[i:i + micro_batch_size].tolist() for i in range(0, len(pool), micro_batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class BatchPlan:
    lengths: Sequence[int]
    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    seed: int
    pool_batches: int = 50
    _cached_epoch: int | None = field(default=None, init=False, repr=False)
    _cached_batches: list = field(default_factory=list, init=False, repr=False)

    @property
    def micro_batches_per_step(self) -> int:
        return self.accumulation_steps * self.world_size

    def steps_per_epoch(self) -> int:
        micro_batches = -(-len(self.lengths) // self.micro_batch_size)
        steps = micro_batches // self.micro_batches_per_step
        if steps == 0:
            raise ValueError(
                f"{len(self.lengths)} training rows do not fill one optimizer step of "
                f"{self.micro_batches_per_step} micro batches of {self.micro_batch_size}")
        return steps

    def rank_step(self, epoch: int, step_in_epoch: int, rank: int) -> list[list[int]]:
        """The micro batches (row indices) that `rank` runs for one optimizer step.

        Micro batch j of the step goes to rank j % world_size, so with bucketing every rank gets a
        similar mix of lengths."""
        if self._cached_epoch != epoch:  # the plan is computed once per epoch
            self._cached_batches = bucketed_micro_batches(
                self.lengths, self.micro_batch_size, self.seed, epoch, self.pool_batches)
            self._cached_epoch = epoch
        batches = self._cached_batches
        first = step_in_epoch * self.micro_batches_per_step
        step = batches[first:first + self.micro_batches_per_step]
        return step[rank::self.world_size]

