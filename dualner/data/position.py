"""Where stage 2's loader stands (dualner.data.streaming): every reader's ranges (pass and cursor of
each), the pools seen only in part, how many pools each reader made and where the readers' pools
lie in the global plan (dualner.data.mix). Each rank keeps its part, from the micro batches it
trains; a checkpoint's parts together are one global position, which resumes on any number of
ranks and loader workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from dualner.data.range_state import RangeState, Segment
from dualner.errors import DataFormatError

# the layout of `state_dict()`: ranges and segments as lists (RangeState.saved, Segment.saved), as
# every version-2 position has kept them
POSITION_VERSION = 2


def stream_waits(waited: float, read_seconds: Sequence[float]) -> list[float]:
    """The part of a wait for a pool's first micro batch that each stream caused: the seconds the
    pool's reader spent reading each stream, scaled down to the wait when the wait was shorter
    (loader workers read ahead, hiding the rest). What is left of the wait (tokenizing, collating)
    is no stream's."""
    total = sum(read_seconds)
    scale = min(1.0, waited / total) if total > 0 else 0.0
    return [seconds * scale for seconds in read_seconds]


class RankPosition:
    """One rank's part of the global position, updated from the micro batches it trains: the range
    states its readers own, the pools seen in part, the pools each of its readers made."""

    def __init__(self, rank: int, readers_per_rank: int, readers: int, names: list[str], owned: dict,
                 leftover: list, pools_made: dict, identity: dict, known_bad: dict, next_worker: int,
                 chunk_base: int):
        self.rank, self.readers_per_rank, self.readers, self.names = rank, readers_per_rank, readers, names
        self.owned = owned  # reader -> stream name -> [range state, ...] (this rank's readers')
        self._index = {(reader, name, r.key()): r for reader, streams in owned.items()
                       for name, states in streams.items() for r in states}
        self.pools = {(p["reader"], p["number"]): dict(p) for p in leftover}
        self.pools_made = dict(pools_made)
        self.identity, self.next_worker, self.chunk_base = identity, next_worker, chunk_base
        # Bad records are counted once each, however many passes read them: those of earlier jobs
        # (every rank knows them; rank 0 counts them) and the new ones this rank's readers found,
        # each (file, byte) -> [file, byte, line, reason].
        self.known_bad: dict[tuple, list] = known_bad
        self.new_bad: dict[tuple, list] = {}
        self.bad_seen: list[dict] = []  # reports the recipe has not taken yet
        self.read_seconds = dict.fromkeys(names, 0.0)  # per stream, this rank's new pools, not yet taken
        self.wait_seconds = dict.fromkeys(names, 0.0)  # per stream, what the training step waited, not yet taken

    def consumed(self, position: dict, waited: float = 0.0) -> None:
        """A micro batch was trained; `waited`: the seconds the training step waited for it."""
        key = (position["reader"], position["number"])
        pool = self.pools.get(key)
        reader = position["reader"]
        if pool is None:  # a new pool: its records are taken from their ranges
            for segment in position["segments"]:
                state = self._index.get((reader, self.names[segment.stream], segment.range_key()))
                if state is not None:  # None: a pool handed over on a resume (its ranges are elsewhere)
                    state.advance(segment.pass_, segment.after, segment.done)
            pool = {"reader": reader, "number": position["number"], "segments": position["segments"],
                    "seed": position["seed"], "chunk": position["chunk"]}
            read = position["read_seconds"] or [0.0] * len(self.names)
            for name, seconds, stream_wait in zip(self.names, read, stream_waits(waited, read)):
                self.read_seconds[name] += seconds
                self.wait_seconds[name] += stream_wait
            self.pools[key] = pool
            self.pools_made[reader] = max(self.pools_made.get(reader, 0), position["number"] + 1)
        pool.update(cut=position["cut"], skip=position["skip"], consumed=position["index"] + 1)
        if pool["consumed"] >= position["batches"]:
            del self.pools[key]
        for report in position["bad"]:
            key = (report["path"], report["byte"])
            if key not in self.known_bad and key not in self.new_bad:
                self.new_bad[key] = [report["path"], report["byte"], report["line"], report["reason"]]
                self.bad_seen.append(report)
        local = reader - self.rank * self.readers_per_rank
        if 0 <= local < self.readers_per_rank:
            self.next_worker = (local + 1) % self.readers_per_rank

    def state_dict(self) -> dict:
        return {"version": POSITION_VERSION, "rank": self.rank, "readers": self.readers,
                "ranges": {name: [[reader, *state.saved()] for reader, streams in self.owned.items()
                                  for state in streams.get(name, []) if not state.spent] for name in self.names},
                "identity": self.identity, "pools": [_saved_pool(p) for p in self.pools.values()],
                "pools_made": {str(k): v for k, v in self.pools_made.items()},
                "next_worker": self.next_worker, "chunk_base": self.chunk_base,
                "bad": sorted((self.new_bad | (self.known_bad if self.rank == 0 else {})).values(),
                              key=lambda entry: entry[:2])}

    def take_read_seconds(self) -> dict[str, float]:
        """Seconds this rank's readers spent reading each stream for the pools trained since the last
        call (a stream that cannot keep up shows here: the plan waits for it)."""
        taken, self.read_seconds = self.read_seconds, dict.fromkeys(self.names, 0.0)
        return taken

    def take_wait_seconds(self) -> dict[str, float]:
        """Seconds the training step waited for each stream's records since the last call."""
        taken, self.wait_seconds = self.wait_seconds, dict.fromkeys(self.names, 0.0)
        return taken

    @property
    def bad_records(self) -> int:
        """This rank's share of the distinct bad records: summed over ranks, the run's count."""
        return len(self.new_bad) + (len(self.known_bad) if self.rank == 0 else 0)


@dataclass
class GlobalPosition:
    """Every reader's ranges, the pools seen in part, the pools each reader made, bad records."""

    ranges: dict = field(default_factory=dict)  # stream name -> [(reader, RangeState), ...]
    identity: dict = field(default_factory=dict)  # stream name -> its files' identities
    pools: list = field(default_factory=list)
    pools_made: dict = field(default_factory=dict)  # reader -> pools made
    readers: int = 0
    chunk_base: int = 0  # the plan chunk of reader 0's first pool since the readers were last planned
    next_worker: dict = field(default_factory=dict)  # rank -> the worker whose batch comes next
    bad: dict = field(default_factory=dict)  # (file, byte) -> [file, byte, line, reason] of every bad record

    @staticmethod
    def merge(rank_states: Sequence[dict]) -> "GlobalPosition":
        """The global position from every rank's `RankPosition.state_dict()` of one checkpoint."""
        merged = GlobalPosition()
        for state in rank_states:
            if not isinstance(state, dict) or state.get("version") != POSITION_VERSION:
                raise DataFormatError("the checkpoint's stream position was written by another DualNER version; "
                                      "resume it with that version, or start stage 2 in a new run.output_dir")
            for name, ranges in state["ranges"].items():
                merged.ranges.setdefault(name, []).extend(ranges)
            merged.identity.update(state["identity"])
            merged.pools += [_loaded_pool(pool) for pool in state["pools"]]
            merged.pools_made.update({int(k): v for k, v in state["pools_made"].items()})
            merged.readers, merged.chunk_base = state["readers"], state["chunk_base"]
            merged.next_worker[int(state["rank"])] = state["next_worker"]
            merged.bad |= {(entry[0], entry[1]): list(entry) for entry in state["bad"]}
        for name, ranges in merged.ranges.items():
            merged.ranges[name] = [(saved[0], RangeState.from_saved(saved[1:])) for saved in sorted(ranges)]
        merged.pools.sort(key=lambda pool: (pool["reader"], pool["number"]))
        return merged

    def next_chunk(self) -> int:
        """The first plan chunk no reader of the checkpoint made: where other readers go on."""
        made = [self.chunk_base + (count - 1) * self.readers + reader
                for reader, count in self.pools_made.items() if count > 0]
        return max(made, default=self.chunk_base - 1) + 1


def _saved_pool(pool: dict) -> dict:
    return {**pool, "segments": [segment.saved() for segment in pool["segments"]]}


def _loaded_pool(pool: dict) -> dict:
    return {**pool, "segments": [Segment.from_saved(segment) for segment in pool["segments"]]}
