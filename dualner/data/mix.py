"""The global mix of stage 2: which stream supplies global sample k, as a pure function of the
streams' weights and k, the same on every rank and loader worker and for any number of them.

Megatron's `build_blending_indices` gives sample k to the stream with the largest deficit
w_d * (k + 1) - count_d, which keeps every prefix of the order within one sample of the weights but
has to be replayed from sample 0. Here the order is cut into blocks of `block` samples and each
stream's cumulative count at a block boundary has a closed form, so any block is computed alone in
O(block) (a resume at sample 10^10 costs what one at sample 0 does):

- the *sparse* streams (too small to get a sample every block: w_d * (block - 2 * streams) < 1) as
  one group get ceil(W * k - 1/2) of the first k samples (W their total weight: at most 1/2 from
  W * k at every k), shared among them by a plan of their own (the same construction, recursively);
- the *dense* streams share the other samples by largest remainder (Hamilton): each gets
  floor or ceil of its share of them, and a dense stream's count never falls from one block
  boundary to the next (it gains at least one sample a block, which rules out Alabama paradoxes).

Inside a block the greedy above orders the block's samples, each stream limited to its count for the
block. Every prefix of the plan is within 2 samples of the weights, about 1 in practice (tests:
property tests over random weights).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np

MIN_BLOCK = 4096


class MixPlan:
    """The stream of every global sample for weights `weights` (any positive numbers)."""

    def __init__(self, weights: Sequence[float], block: int | None = None):
        total = float(sum(weights))
        if not weights or total <= 0 or min(weights) <= 0:
            raise ValueError(f"stream weights must be positive, got {list(weights)}")
        self.weights = np.array([w / total for w in weights], dtype=np.float64)
        streams = len(self.weights)
        self.block = block or max(MIN_BLOCK, 4 * streams)
        if self.block < 4 * streams:
            raise ValueError(f"a plan block of {self.block} samples is too small for {streams} streams")
        self.sparse = self.weights * (self.block - 2 * streams) < 1
        dense = self.weights[~self.sparse]
        self._dense_share = dense / dense.sum()
        # the sparse streams as one group, its samples shared among them by a plan of their own (their
        # rounding errors then cancel instead of adding up)
        self._sparse_total = float(self.weights[self.sparse].sum())
        sparse = self.weights[self.sparse]
        self._inner = MixPlan(list(sparse), block=4 * len(sparse) + 1) if len(sparse) > 1 else None
        self._block_order = lru_cache(maxsize=8)(self._order_of_block)

    def cumulative(self, sample: int | np.ndarray) -> np.ndarray:
        """How many of the samples [0, sample) each stream supplies; `sample` a multiple of the block
        (else the counts at the block boundary before it), or an array of them (a row each)."""
        samples = np.asarray(sample, dtype=np.int64)
        samples = (samples - samples % self.block).reshape(-1, 1)
        counts = np.zeros((len(samples), len(self.weights)), dtype=np.int64)
        group = np.maximum(0, np.ceil(self._sparse_total * samples[:, 0] - 0.5)).astype(np.int64)
        if self._inner is None:
            counts[:, self.sparse] = group[:, None]
        else:
            counts[:, self.sparse] = np.stack([self._inner.prefix_counts(int(taken)) for taken in group])
        left = samples[:, 0] - counts[:, self.sparse].sum(axis=1)
        targets = self._dense_share * left[:, None]
        dense = np.floor(targets).astype(np.int64)
        seats = left - dense.sum(axis=1)
        # the largest remainders take the seats left, ties to the lower stream index
        rank = np.argsort(np.argsort(-(targets - dense), axis=1, kind="stable"), axis=1, kind="stable")
        counts[:, ~self.sparse] = dense + (rank < seats[:, None])
        return counts[0] if np.ndim(sample) == 0 else counts

    def prefix_counts(self, sample: int) -> np.ndarray:
        """How many of the samples [0, sample) each stream supplies, for any `sample`."""
        start = sample - sample % self.block
        return self.cumulative(start) + self.counts(start, sample - start)

    def _order_of_block(self, block: int) -> np.ndarray:
        start = block * self.block
        counts = self.cumulative(start).astype(np.float64)
        quota = self.cumulative(start + self.block) - counts.astype(np.int64)
        order = np.empty(self.block, dtype=np.int32)
        for offset in range(self.block):
            deficit = self.weights * (start + offset + 1) - counts
            deficit[quota == 0] = -math.inf
            stream = int(np.argmax(deficit))
            order[offset] = stream
            counts[stream] += 1
            quota[stream] -= 1
        return order

    def streams(self, start: int, count: int) -> np.ndarray:
        """The stream index of each sample in [start, start + count)."""
        parts, sample, end = [], start, start + count
        while sample < end:
            block, offset = divmod(sample, self.block)
            take = min(end - sample, self.block - offset)
            parts.append(self._block_order(block)[offset:offset + take])
            sample += take
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def counts(self, start: int, count: int) -> np.ndarray:
        """How many of the samples [start, start + count) each stream supplies."""
        return np.bincount(self.streams(start, count), minlength=len(self.weights))

    def counts_between(self, start: int, end: int) -> np.ndarray:
        """The same for any long span, in O(streams + 2 blocks) (benchmarks, whole passes)."""
        first = -(-start // self.block) * self.block
        last = end - end % self.block
        if first >= last:
            return self.counts(start, end - start)
        return (self.counts(start, first - start) + self.cumulative(last) - self.cumulative(first)
                + self.counts(last, end - last))
