"""A reader of stage 2 (a rank's loader worker, or the rank itself): pools of records drawn as the
global plan says (dualner.data.mix) from its ranges, tokenized together, shuffled (padded rows:
sorted by length) with a seed of its own and cut into micro batches of whole units. A pool is
described by its segments (dualner.data.range_state.Segment), enough to read it again anywhere."""

from __future__ import annotations

import bisect
import json
import random
import time
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

from dualner.data.corpus import BadRecord, CorpusFile, open_corpus, skip_to
from dualner.data.encoding import WindowTokenizer
from dualner.data.mix import MixPlan
from dualner.data.packing import Collator, cut_micro_batches
from dualner.data.range_reading import StreamCursor, read_segment
from dualner.data.range_state import RangeState, Segment
from dualner.data.stream_spec import StreamSpec


@dataclass
class Cut:
    """How a pool becomes micro batches: saved with a pool so it can be cut again the same way."""

    micro_batch_size: int
    rows: int | None
    row_length: int
    sort: bool  # padded rows: units sorted by length, then the micro batches shuffled

    def key(self) -> list:
        return [self.micro_batch_size, self.rows, self.row_length, self.sort]


@dataclass
class ReaderPlan:
    reader: int
    readers: int
    ranges: dict[str, list[RangeState]]  # stream name -> its ranges
    leftover: list[dict]  # pools seen in part before the resume: finished first
    pools_made: int  # the number of this reader's next pool (its seed)
    chunk_base: int  # pool n of this reader is plan chunk chunk_base + n x readers + reader


class Stage2Reader:
    """What one reader (a rank's loader worker, or the rank itself) makes: pools of its ranges, then
    micro batches; the pools it was handed to finish first."""

    def __init__(self, streams: Sequence[StreamSpec], plan: ReaderPlan, mix: MixPlan, encoder: WindowTokenizer,
                 collate: Collator, cut: Cut, pool: int, seed: int, one_pass: bool):
        self.streams, self.plan, self.mix, self.encoder, self.collate = streams, plan, mix, encoder, collate
        self.cut, self.pool, self.seed, self.one_pass = cut, max(1, pool), seed, one_pass
        # the reader reads ahead of what is trained: its own copy of the range states
        self.cursors = [StreamCursor(spec, index, [r.copy() for r in plan.ranges.get(spec.name, [])], seed, one_pass)
                        for index, spec in enumerate(streams)]
        self._reports: list[dict] = []  # bad records not yet sent with a micro batch
        self._lines: dict[str, LineIndex | None] = {}  # line numbers of bad records, per file
        self._reread = [0]  # records of pools read again

    def records_read(self) -> int:
        return self._reread[0] + sum(cursor.counter[0] for cursor in self.cursors)

    def __iter__(self) -> Iterator[dict]:
        plan = self.plan
        # A resume's whole catch-up before the first micro batch (the pools seen in part read again,
        # every stream's next range read up to its cursor), so that the rank waits for it once,
        # before training's first collective (Stage2Stream.catch_up), never in the middle of a step.
        leftover = [(pool, self._read_again(pool)) for pool in plan.leftover]
        for cursor in self.cursors:
            cursor.catch_up()
        for pool, items in leftover:
            yield from self._micro_batches(pool, items)
        number = plan.pools_made
        while not all(cursor.exhausted for cursor in self.cursors):
            drawn = self._draw(number)
            number += 1
            if drawn is not None:  # None: every stream this chunk asks for is used up (one pass)
                yield from self._micro_batches(*drawn)

    def _draw(self, number: int) -> tuple[dict, list] | None:
        """Pool `number` of this reader: plan chunk base + number x readers + reader, read as the
        global plan says (which stream supplies each of its records)."""
        plan = self.plan
        chunk = plan.chunk_base + number * plan.readers + plan.reader
        rng = random.Random(zlib.crc32(json.dumps([self.seed, plan.reader, number]).encode()))
        segments: list[Segment] = []
        drawn_into: dict[int, list] = {}
        seconds = [0.0] * len(self.cursors)  # how long each stream kept the pool waiting
        for stream in self.mix.streams(chunk * self.pool, self.pool):
            cursor = self.cursors[stream]
            started = time.perf_counter()
            step = cursor.next(segments)
            seconds[stream] += time.perf_counter() - started
            if step is not None:
                drawn_into.setdefault(id(cursor.segment), []).append(step[1])
        for cursor in self.cursors:
            cursor.close_segment()
        if not segments:
            return None
        # the pool's canonical order is segment by segment, as reading the segments again gives it
        items = [item for segment in segments for item in drawn_into.get(id(segment), [])]
        description = {"reader": plan.reader, "number": number, "chunk": chunk, "segments": segments,
                       "seed": rng.getrandbits(32), "cut": self.cut.key(), "skip": [], "consumed": 0,
                       "read_seconds": seconds}
        return description, items

    def _read_again(self, pool: dict) -> list:
        return [item for segment in pool["segments"]
                for item in read_segment(self.streams[segment.stream], segment, self._reread)]

    def _micro_batches(self, pool: dict, items: list) -> Iterator[dict]:
        """The pool's micro batches from the first one not yet trained. Units are numbered in the
        pool's canonical order; `skip` lists those trained under an earlier micro-batch shape."""
        if pool["consumed"] == 0:
            self._reports += [self._report(item) for item in items if isinstance(item, BadRecord)]
        skip = set(pool["skip"])
        units = [(number, unit) for number, unit in enumerate(item for item in items if isinstance(item, list))
                 if number not in skip]
        windows, unit_windows = self._encode([unit for _, unit in units])
        lengths = [len(window["input_ids"]) for window in windows]
        ordered = [indices for indices in unit_windows if indices]
        micro, rows, row_length, sort = pool["cut"]
        shuffle = random.Random(pool["seed"]).shuffle
        if sort:
            ordered.sort(key=lambda unit: sum(lengths[i] for i in unit))
        else:
            shuffle(ordered)
        chunks = cut_micro_batches(ordered, lengths, micro, rows, row_length)
        if sort:
            shuffle(chunks)
        first = pool["consumed"]
        if list(pool["cut"]) != self.cut.key():
            # the micro-batch shape changed since this pool was cut (another number of ranks): what
            # was trained is known under the old shape; the rest is a pool of its own, cut anew
            unit_of_window = {w: number for (number, _), indices in zip(units, unit_windows) for w in indices}
            trained = sorted(skip | {unit_of_window[w] for chunk in chunks[:first] for w in chunk})
            yield from self._micro_batches({**pool, "cut": self.cut.key(), "skip": trained, "consumed": 0}, items)
            return
        for index in range(first, len(chunks)):
            batch = self.collate([windows[i] for i in chunks[index]])
            reports, self._reports = self._reports, []
            batch["position"] = {"reader": pool["reader"], "number": pool["number"], "index": index,
                                 "batches": len(chunks), "segments": pool["segments"], "seed": pool["seed"],
                                 "chunk": pool["chunk"], "read_seconds": pool.get("read_seconds"),
                                 "cut": pool["cut"], "skip": pool["skip"], "bad": reports}
            yield batch

    def _report(self, bad: BadRecord) -> dict:
        line = bad.line
        if line is None:  # a record read from the middle of a file: count its line (rare: bad records only)
            if bad.path not in self._lines:
                found = [s.corpus_file() for spec in self.streams for s in spec.sources
                         if s.path == bad.path and s.corpus_file() is not None]
                self._lines[bad.path] = LineIndex(found[0]) if found else None
            index = self._lines[bad.path]
            line = index.line_of(bad.byte) if index is not None else None
        return {"path": bad.path, "byte": bad.byte, "line": line, "reason": bad.reason}

    def _encode(self, units: list) -> tuple[list[dict], list[list[int]]]:
        """Windows of every unit (raw sentences tokenized in one batch, prepared ones as stored)
        and each unit's window indices."""
        raw = [member for unit in units for member in unit if isinstance(member, dict)]
        windows_of_member: dict[int, list[dict]] = {}
        if raw:
            columns = {name: [member[name] for member in raw]
                       for name in ("words", "language", "src_id", "sample_id", "kind", "pass")}
            columns["tags"] = [member.get("tags") or [] for member in raw]
            columns["_member"] = list(range(len(raw)))
            encoded = self.encoder.encode_batch(columns)
            names = [name for name in encoded if name != "_member"]
            for row, member in enumerate(encoded["_member"]):
                windows_of_member.setdefault(member, []).append({name: encoded[name][row] for name in names})
        windows: list[dict] = []
        unit_windows: list[list[int]] = []
        raw_index = 0
        for unit in units:
            indices = []
            for member in unit:
                if isinstance(member, dict):
                    member_windows = windows_of_member.get(raw_index, [])
                    raw_index += 1
                else:  # a prepared sentence: its windows as stored
                    member_windows = member
                for window in member_windows:
                    indices.append(len(windows))
                    windows.append(window)
            unit_windows.append(indices)
        return windows, unit_windows


class LineIndex:
    """The line of a byte of one file, counted from the nearest byte counted before: a reader's bad
    records in one file cost about one reading of it together (forward from the previous one), not
    one reading from byte 0 each."""

    def __init__(self, file: CorpusFile):
        self.file, self.points = file, [(0, 0)]  # (byte, newlines before it), sorted

    def line_of(self, byte: int) -> int:
        start, lines = self.points[bisect.bisect_right(self.points, (byte, 1 << 62)) - 1]
        with open_corpus(self.file) as handle:
            skip_to(handle, self.file, start)
            left = byte - start
            while left > 0:
                chunk = handle.read(min(left, 1 << 24))
                if not chunk:
                    break
                lines += chunk.count(b"\n")
                left -= len(chunk)
        bisect.insort(self.points, (byte, lines))
        return lines + 1


