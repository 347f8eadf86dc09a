"""The stage-2 loader: every corpus read once per pass across all ranks and loader workers, mixed
as configured by one global plan, tokenized on the fly (or read tokenized from a prepared corpus),
and resumable exactly, in O(1) of the position, on any number of ranks and workers. This module
plans which reader reads what and runs the readers behind a DataLoader; the streams' sources are
dualner.data.source (one class per kind: source_kinds), a range is read by range_reading and a
reader's pools and micro batches are made by pools.

The mix (dualner.data.mix). Which stream (the labeled source, a target language's text, a
language's translations) supplies global sample k is a pure function of the streams' weights and k,
every prefix within about one sample of the weights. The plan is cut into pools of `pool` samples;
reader r of R (ranks x workers) makes pools r, r + R, r + 2R, ... . Nothing of this depends on how
many readers there are or where the data lies, and a reader waits for the stream its pool asks for:
the mix never changes with the cluster.

Shares (dualner.data.shares). Every reader holds an equal share of every stream: equal spans of its
uncompressed bytes or prepared positions (a share may span files), and a stride of every piece that
cannot be split (a compressed file of one block, a hub shard: reader r keeps records r, r + R, ...).
A share is a list of ranges, each with its pass and cursor; a reader walks its ranges of a stream
lowest pass first, in an order drawn anew for every pass. Since every reader is asked for the same
number of records of each stream and holds the same amount of it, all ranges go through their
passes at the same rate: every sentence of a stream is drawn equally often, and a stream's pass is
its ranges' pass.

Pools (dualner.data.pools). A reader reads the records its pool's plan asks for, tokenizes them together, shuffles them
(padded rows: sorts them by length) with a seed of its own, and cuts them into micro batches of
whole units. A pool is described by its segments (dualner.data.range_state.Segment), enough to
read it again anywhere.

Position (dualner.data.position). The main process of each rank sees which micro batches were
trained (every batch carries its pool's description and its index in the pool) and keeps: each of
its readers' ranges (pass and cursor, past every pool it has seen), the pools seen only in part, and
how many pools each reader made. A checkpoint saves the ranks' positions, which together form one
global position. On the same number of readers the run continues exactly as if never stopped. On
another number, each stream's ranges are split at their cursors and cut into equal shares again
(what is left of the current pass on its own), pools seen in part go to readers that read them
again and skip the micro batches already trained, and the plan goes on at the first pool no reader
made: nothing is replayed and nothing repeats or goes missing within a pass.
"""

from __future__ import annotations

import collections
import time
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dualner.data.encoding import WindowTokenizer
from dualner.data.mix import MixPlan
from dualner.data.packing import Collator
from dualner.data.pools import Cut, ReaderPlan, Stage2Reader
from dualner.data.position import GlobalPosition, RankPosition
from dualner.data.prepared import BLOCK as PREPARED_BLOCK
from dualner.data.range_reading import StreamCursor
from dualner.data.range_state import RangeState
from dualner.data.shares import equal_shares, reshare, unsplit_pieces
from dualner.data.stream_spec import StreamSpec

DEFAULT_RANGE_BYTES = 64 << 20
DEFAULT_RANGE_SENTENCES = 1 << 16


def global_ranges(streams: Sequence[StreamSpec], position: GlobalPosition | None, readers: int,
                  limits: dict[str, int], log=None) -> dict[str, list[list[RangeState]]]:
    """Every stream's ranges for each of `readers` readers (dualner.data.shares): the checkpoint's
    own where the readers are the same, its ranges shared out again where they are not, else
    equal shares from the start."""
    ranges: dict[str, list[list[RangeState]]] = {}
    for spec in streams:
        saved = position.ranges.get(spec.name) if position else None
        if saved is not None and position.identity.get(spec.name) != spec.identity():
            if log is not None:
                log.warning("stage 2: the files of %s changed since the checkpoint (names, sizes or modification "
                            "times): its positions start over", spec.name)
            saved = None
        if saved is None:
            ranges[spec.name] = equal_shares(spec.sources, readers, limits)
        elif position.readers == readers:
            ranges[spec.name] = [[] for _ in range(readers)]
            for reader, state in saved:
                ranges[spec.name][reader].append(state)
        else:
            ranges[spec.name] = reshare([state for _, state in saved], spec.sources, readers, limits)
    return ranges


class _ReaderFactory:
    """What a loader worker needs to build its reader (picklable without the loader itself)."""

    def __init__(self, streams, plans, mix, encoder, collate, cut, pool, seed, one_pass, rank, readers_per_rank):
        self.streams, self.plans, self.mix, self.encoder, self.collate = streams, plans, mix, encoder, collate
        self.cut, self.pool, self.seed, self.one_pass = cut, pool, seed, one_pass
        self.rank, self.readers_per_rank = rank, readers_per_rank
        self.built: list[Stage2Reader] = []

    def __call__(self, local: int) -> Stage2Reader:
        reader = Stage2Reader(self.streams, self.plans[self.rank * self.readers_per_rank + local], self.mix,
                              self.encoder, self.collate, self.cut, self.pool, self.seed, self.one_pass)
        self.built.append(reader)
        return reader


# -- the loader ------------------------------------------------------------------------------------------
def _as_made(batch: dict) -> dict:
    """The loader's collate step: the readers made the tensors already (torch's default would walk
    every list of the batch's metadata)."""
    return batch


class _ReaderDataset(IterableDataset):
    """The readers of one rank: its loader worker w (or the rank itself) runs one of them."""

    def __init__(self, factory: _ReaderFactory, readers_per_rank: int, rotation: int):
        self.factory, self.readers_per_rank, self.rotation = factory, readers_per_rank, rotation

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else info.id
        # the worker whose batch came next when the checkpoint was written comes first again
        yield from self.factory((worker + self.rotation) % self.readers_per_rank)


class Stage2Stream:
    """One rank's stream of stage-2 micro batches: its readers behind a DataLoader, and the position
    of what it trained. `state_dict()` is this rank's part of the global position; `load_state_dict`
    takes every rank's part of a checkpoint (written by any number of ranks and workers). Which
    reader reads what is planned once, when first needed: from the checkpoint's position when
    `load_state_dict` comes first, else from the start (at the first batch)."""

    def __init__(self, streams: Sequence[StreamSpec], encoder: WindowTokenizer, micro_batch_size: int,
                 seed: int, rank: int, world_size: int, collate: Collator, pool: int = 2048, workers: int = 0,
                 repeat: bool = True, pin_memory: bool = False, range_bytes: int = DEFAULT_RANGE_BYTES,
                 range_sentences: int = DEFAULT_RANGE_SENTENCES, log=None):
        streams = [spec for spec in streams if spec.weight > 0 and spec.sources]
        if not streams:
            raise ValueError("stage 2 has no data to read (every stream is empty or has weight 0)")
        self.streams, self.encoder, self.collate, self.seed = list(streams), encoder, collate, seed
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.readers_per_rank = max(1, workers)
        self.readers = world_size * self.readers_per_rank
        self.pool, self.one_pass, self.pin_memory, self.log = pool, not repeat, pin_memory, log
        self.range_bytes, self.range_sentences = range_bytes, range_sentences
        # pool 0: micro batches in stream order (a pool of one micro batch, not shuffled)
        self.cut = Cut(micro_batch_size, collate.rows, collate.row_length, sort=pool > 0 and not collate.packed)
        total = sum(spec.weight for spec in self.streams)
        self.mix = {spec.name: spec.weight / total for spec in self.streams}
        # which stream supplies each sample; plan blocks of whole pools, so that a pool's counts have
        # a closed form (benchmarks simulate whole passes with it)
        chunk = pool if pool > 0 else micro_batch_size
        self.mix_plan = MixPlan([spec.weight for spec in self.streams],
                                block=chunk * -(-4 * len(self.streams) // chunk))
        self._position: RankPosition | None = None  # None: not planned yet
        self._caught_up: collections.deque = collections.deque()  # (batch, waited) made by catch_up

    @property
    def position(self) -> RankPosition:
        """What this rank trained so far (planning from the start if nothing was planned yet)."""
        if self._position is None:
            self._plan(None)
        return self._position

    def _plan(self, position: GlobalPosition | None) -> None:
        limits = {"bytes": self.range_bytes, "sentences": min(self.range_sentences, PREPARED_BLOCK)}
        ranges = global_ranges(self.streams, position, self.readers, limits, self.log)
        same_readers = position is not None and position.readers == self.readers
        leftover = position.pools if position is not None else []
        handed: dict[int, list] = {}
        for index, pool in enumerate(leftover):
            handed.setdefault(pool["reader"] if same_readers else index % self.readers, []).append(pool)
        # pool numbers (seeds) go on where they stopped; after a change of readers, above every old one
        fresh = 1 + max([pool["number"] for pool in leftover] + [-1])
        base = (position.chunk_base if same_readers else position.next_chunk()) if position is not None else 0
        mine = range(self.rank * self.readers_per_rank, (self.rank + 1) * self.readers_per_rank)
        owned = {reader: {spec.name: ranges[spec.name][reader] for spec in self.streams} for reader in mine}
        self.plans = {reader: ReaderPlan(reader, self.readers, owned[reader], handed.get(reader, []),
                                         position.pools_made.get(reader, 0) if same_readers else fresh, base)
                      for reader in mine}
        self._report_unsplit()
        if position is not None:
            self._report_catch_up()
        rotation = position.next_worker.get(self.rank, 0) if same_readers else 0
        self._position = RankPosition(
            self.rank, self.readers_per_rank, self.readers, [spec.name for spec in self.streams], owned,
            [pool for reader in mine for pool in handed.get(reader, [])],
            {reader: self.plans[reader].pools_made for reader in mine},
            {spec.name: spec.identity() for spec in self.streams},
            dict(position.bad) if position is not None else {}, rotation, base)
        self.factory = _ReaderFactory(self.streams, self.plans, self.mix_plan, self.encoder, self.collate, self.cut,
                                      self.pool if self.pool > 0 else self.cut.micro_batch_size, self.seed,
                                      self.one_pass, self.rank, self.readers_per_rank)
        # A generator of its own: creating an iterator draws a base seed, and drawing it from the
        # global RNG would shift the dropout masks of a resumed run.
        self.loader = DataLoader(_ReaderDataset(self.factory, self.readers_per_rank, rotation), batch_size=None,
                                 num_workers=self.workers, pin_memory=self.pin_memory, collate_fn=_as_made,
                                 prefetch_factor=4 if self.workers else None,
                                 generator=torch.Generator().manual_seed(self.seed + self.rank))
        self._iterator = None
        self._caught_up.clear()

    def _report_unsplit(self) -> None:
        """What a piece that cannot be split costs: every reader reads all of it to keep its share."""
        if self.log is None or self.rank != 0 or self.readers == 1:
            return
        for spec in self.streams:
            pieces = unsplit_pieces(spec.sources)
            if pieces:
                self.log.warning(
                    "stage 2: %s has %d piece(s) that cannot be split (a compressed file of one block, or a hub "
                    "dataset's shard): each of the %d readers (ranks x loader workers) reads all of it to keep 1 "
                    "record in %d, so this stream reads and decompresses about %dx slower than a splittable one "
                    "(and a resume decompresses up to its position). Run `python -m dualner prepare` on it, or "
                    "give it uncompressed or as a splittable (multi-block) file", spec.name, len(pieces),
                    self.readers, self.readers, self.readers)

    def catch_up_estimate(self) -> dict[str, tuple[int, float, str]]:
        """What this rank's resume must decompress and throw away before its first micro batch, per
        stream: (bytes, estimated seconds, the file), for the reader of this rank with the most
        (a rank's loader workers catch up in parallel)."""
        found: dict[str, tuple[int, float, str]] = {}
        for plan in self.plans.values():
            for index, spec in enumerate(self.streams):
                cursor = StreamCursor(spec, index, plan.ranges.get(spec.name, []), self.seed, self.one_pass)
                pieces = [(spec.sources[segment.file], segment.first) for pool in plan.leftover
                          for segment in pool["segments"] if segment.stream == index]
                state = cursor.next_range()
                if state is not None:
                    pieces.append((spec.sources[state.file], state.cursor))
                skipped = [(source.entry_cost(at), source) for source, at in pieces]
                total = sum(count for count, _ in skipped)
                if total and total > found.get(spec.name, (0,))[0]:
                    seconds = sum(source.entry_seconds(count) for count, source in skipped)
                    found[spec.name] = (total, seconds, max(skipped, key=lambda item: item[0])[1].path)
        return found

    def _report_catch_up(self) -> None:
        """A resume inside pieces that cannot be split: what it costs, and the remedy."""
        if self.log is None or self.rank != 0:
            return
        for name, (skipped, seconds, path) in self.catch_up_estimate().items():
            self.log.warning(
                "stage 2: resuming %s decompresses and discards about %.1f MB of %s up to the checkpoint's position "
                "(about %.0f s on one CPU per reader) before the first step; the ranks wait for each other's "
                "catch-up with a timeout sized for it. Run `python -m dualner prepare` on it, or give it uncompressed "
                "or as a splittable (multi-block) file, and a resume costs O(1)", name, skipped / 1e6, path, seconds)

    def catch_up(self) -> None:
        """A resume's catch-up, done before training: every reader of this rank reads up to its
        positions (decompressing pieces that cannot be split up to them) and makes its first micro
        batch, held for `next_batch`. The caller then waits for the other ranks (comm.PatientBarrier),
        so that no collective of training waits for a rank still catching up."""
        self._start()
        for _ in range(self.readers_per_rank):  # the loader takes its workers' batches in turn
            started = time.perf_counter()
            batch = next(self._iterator, None)
            if batch is None:
                break
            self._caught_up.append((batch, time.perf_counter() - started))

    # -- reading ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def _start(self) -> RankPosition:
        position = self.position  # plans the readers (and makes the loader) if nothing did yet
        if self._iterator is None:
            self._iterator = iter(self.loader)
        return position

    def next_batch(self) -> dict:
        position = self._start()
        if self._caught_up:
            batch, waited = self._caught_up.popleft()
        else:
            started = time.perf_counter()
            batch = next(self._iterator)
            waited = time.perf_counter() - started
        # the wait is charged to the streams where the batch is assembled: a pool's first micro batch
        # waits for its reader to read it (position.stream_waits)
        position.consumed(batch["position"], waited)
        return batch

    def records_read(self) -> int:
        """Records read by this process's readers (workers=0): what a resume costs, for tests."""
        return sum(reader.records_read() for reader in self.factory.built) if self._position is not None else 0

    def take_bad_records(self) -> list[dict]:
        reports, self.position.bad_seen = self.position.bad_seen, []
        return reports

    # -- position ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.position.state_dict()

    def load_state_dict(self, rank_states: Sequence[dict]) -> None:
        """Continue from a checkpoint: every rank's `state_dict()` of it."""
        self._plan(GlobalPosition.merge(rank_states))
