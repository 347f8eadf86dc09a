"""Reading a stream's ranges (dualner.data.range_state): the records of one range from a cursor, a
stride of a piece that cannot be split, a translation paired with its source sentence, a pool's
segment read again, and one stream as one reader walks it (its ranges lowest pass first, in an order
drawn anew for every pass)."""

from __future__ import annotations

import itertools
import json
import zlib
from functools import lru_cache
from typing import Iterator

from dualner.data.corpus import describe_file
from dualner.data.file_source import iter_sentences
from dualner.data.range_state import RangeState, Segment
from dualner.data.stream_spec import KIND_SOURCE, StreamSpec


def read_range(spec: StreamSpec, state: RangeState, cursor: int, counter: list[int] | None = None,
               skip: int | None = None) -> Iterator[tuple[int, int, object]]:
    """(record position, next cursor, unit or BadRecord or None) of a range from `cursor` (-1: its
    start), passing over `skip` records (default: the state's) and then keeping one in the range's
    step. A unit is a list of members: sentence dicts to tokenize, or prepared window lists."""
    source = spec.sources[state.file]
    strided = _strided(state.skip if skip is None else skip, state.step)
    for position, after, record in source.records(state.start, state.end, state.pass_, cursor, spec.seed_key):
        if counter is not None:
            counter[0] += 1
        if not strided():
            continue
        unit = source.unit(record, spec.language, spec.kind, state.pass_, spec.labeled)
        if isinstance(unit, list):
            unit = _with_pair(unit, spec, source.pairing_id(unit), state.pass_)
        yield position, after, unit


def _strided(skip: int, step: int):
    """A test of each record in turn: pass over `skip`, then keep one in `step` (a stride share)."""
    left = [skip]

    def keep() -> bool:
        if left[0] > 0:
            left[0] -= 1
            return False
        left[0] = step - 1
        return True
    return keep


def _with_pair(unit: list, spec: StreamSpec, src_id: str, pass_: int) -> list:
    """stage2.mse=parallel: a translation travels with its labeled source sentence (by src_id)."""
    if spec.pair_with and src_id:
        paired = _source_by_id(spec.pair_with).get(src_id)
        if paired is not None:
            unit.append({**paired, "kind": KIND_SOURCE, "pass": pass_})
    return unit


@lru_cache(maxsize=4)
def _source_by_id(path: str) -> dict[str, dict]:
    """The labeled source by src_id (it is small: labeled by hand); one dict per loader process.
    Read record by record like every corpus, so its sample ids are the stream's (`file@byte`)."""
    return {sentence["src_id"]: {**sentence, "language": sentence["language"] or ""}
            for sentence in iter_sentences(describe_file(path, "data.train"), "", True)}


def read_segment(spec: StreamSpec, segment: Segment, counter: list[int] | None = None) -> list:
    """The records of a pool's segment, read again (units, None, BadRecord), in order."""
    items = []
    for _, _, unit in read_range(spec, segment.range_to_read_again(), segment.first, counter, skip=0):
        items.append(unit)  # the first record is kept: skip=0
        if len(items) == segment.records:
            break
    return items


class StreamCursor:
    """One stream as one reader sees it: its ranges in this pass's order, and the open one."""

    def __init__(self, spec: StreamSpec, index: int, ranges: list[RangeState], seed: int, one_pass: bool):
        self.spec, self.index, self.ranges, self.seed, self.one_pass = spec, index, ranges, seed, one_pass
        self.counter = [0]  # records read (tests: resume reads O(1) records)
        self._open: tuple[RangeState, Iterator] | None = None
        self.segment: Segment | None = None
        self._empty_ends = 0  # ranges ended in a row without a record: a share with none at all

    def _order(self, state: RangeState) -> tuple[int, int]:
        return state.pass_, zlib.crc32(json.dumps([self.seed, self.index, state.file, state.start,
                                                   state.offset, state.pass_]).encode())

    def _live(self) -> list[RangeState]:
        return [state for state in self.ranges if not state.spent]

    @property
    def exhausted(self) -> bool:
        live = self._live()
        return (not live or self._empty_ends > len(live)
                or (self.one_pass and all(r.pass_ >= 1 for r in live)))

    def next_range(self) -> RangeState | None:
        """The range to read next (None: none is left)."""
        if self.exhausted:
            return None
        state = min(self._live(), key=self._order)
        return None if self.one_pass and state.pass_ >= 1 else state

    def _open_next(self) -> bool:
        """Open the range to read next (False: none is left)."""
        state = self.next_range()
        if state is None:
            return False
        self._open = (state, read_range(self.spec, state, state.cursor, self.counter))
        self.segment = None
        return True

    def catch_up(self) -> None:
        """Where entering the range to read next reads what comes before its cursor (a piece that
        cannot be split, decompressed up to there), open it and read up to its first record now: a
        resume's catch-up happens here, not in whichever pool first asks for this stream."""
        state = self.next_range() if self._open is None else None
        if (state is not None and self.spec.sources[state.file].reads_before(state.cursor)
                and self._open_next()):
            state, records = self._open
            first = next(records, StopIteration)
            self._open = (state, iter(()) if first is StopIteration else itertools.chain([first], records))

    def next(self, segments: list[Segment]) -> tuple[RangeState, object] | None:
        """(range state, unit / BadRecord / None) of the next record, the segment list updated."""
        while True:
            if self._open is None and not self._open_next():
                return None
            state, records = self._open
            item = next(records, StopIteration)
            if item is StopIteration:  # the range's pass is done
                if self.segment is not None:
                    self.segment.done = True
                else:
                    self._empty_ends += 1
                state.advance(state.pass_, -1, True)
                self._open, self.segment = None, None
                continue
            self._empty_ends = 0
            position, after, unit = item
            if self.segment is None:
                self.segment = Segment.opened(self.index, state, position)
                segments.append(self.segment)
            self.segment.records += 1
            self.segment.after = after
            state.advance(state.pass_, after, False)
            return state, unit

    def close_segment(self) -> None:
        self.segment = None
