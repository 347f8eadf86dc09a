"""The stage-2 loader: every corpus read once per pass across all ranks and loader workers, mixed
with configured weights, tokenized on the fly (or read tokenized from a prepared corpus), and
resumable exactly, in O(1) of the position, on any number of ranks and workers.

Pieces (ranges). Each stream (a kind and language: the labeled source, a target language's text,
a language's translations) is cut into ranges: byte ranges of uncompressed files
(dualner.data.corpus: any cut reads every record once), a compressed file whole, or runs of
sentence ids of a prepared corpus (dualner.data.prepared). There are at least as many ranges per
stream as readers (ranks x workers) where the data allows, and each range belongs to one reader:
range j of a stream goes to reader (j + offset) mod readers. A reader's rate therefore does not
depend on how many readers there are, and the file system serves each byte once per pass.

A range has its own pass counter and cursor (the next record's byte, or the next index of the
pass's permutation of a prepared range). A reader walks its ranges in an order drawn anew for
every pass; a range that reaches its end starts its next pass. Within a pass of a range every
record is used exactly once; ranges of one stream may be a pass apart when readers go at
different speeds.

Pools. A reader draws `pool` records at a time, choosing the stream of each by weight (a stream's
weight is scaled by readers / readers holding it, so the global mix stays as configured when a
stream has fewer ranges than readers), tokenizes them together, shuffles them (padded rows: sorts
them by length) with a seed of its own, and cuts them into micro batches of whole units. A pool is
described by its segments: (stream, file, range, pass, first record, records), enough to read it
again anywhere.

Position. The main process of each rank sees which micro batches were trained (every batch carries
its pool's description and its index in the pool) and keeps: each range's pass and cursor (past
every pool it has seen), the pools it has seen only in part (with how many of their micro batches
were trained), and how many pools each reader made. A checkpoint saves the ranks' positions, which
together form one global position. On resume, ranges are assigned to the new readers (re-cut where
more readers than ranges), pools seen in part go to readers that read them again and skip the
micro batches already trained, and readers continue at the range cursors: nothing is replayed and
nothing repeats or goes missing within a pass. On the same number of ranks and workers the
continuation is identical to the uninterrupted run; on another number, the mixing draws a new
order (which record follows which changes; which records a pass holds does not).
"""

from __future__ import annotations

import glob
import json
import random
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dualner.data.corpus import (BadRecord, CorpusFile, RecordReader, describe_file, lines_before,
                                 parse_record)
from dualner.data.encoding import WindowTokenizer
from dualner.data.packing import Collator, cut_micro_batches
from dualner.errors import DataFormatError, MissingPathError

KIND_SOURCE, KIND_TARGET, KIND_TRANSLATION = "source", "target", "translation"
HUB_PREFIX = "hf:"
STREAM_META = ("language", "kind", "sample_id", "src_id", "word_offset", "pass")
POSITION_VERSION = 1
DEFAULT_RANGE_BYTES = 64 << 20
DEFAULT_RANGE_SENTENCES = 1 << 16


# -- the streams and their pieces ------------------------------------------------------------------
def expand_files(pattern: str, key: str) -> list[str]:
    """A path or glob -> sorted files; an error naming the config key when nothing matches.

    `hf:NAME[:CONFIG]@SPLIT` names a `datasets` dataset (a hub name, or a local folder) with a
    `tokens` column, streamed rather than downloaded whole. A folder holding a prepared corpus
    (its manifest.json) is one entry."""
    from dualner.data.prepared import is_prepared
    if pattern.startswith(HUB_PREFIX):
        return [pattern]
    if is_prepared(pattern):
        return [str(pattern)]
    files = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    if not glob.has_magic(pattern) and Path(pattern).is_dir():
        raise MissingPathError(f"{key}: {pattern} is a folder; name a file, a glob (e.g. {pattern}/*.txt) "
                               f"or a prepared corpus folder (python -m dualner prepare)")
    files = [f for f in files if Path(f).is_file()]
    if not files:
        unfinished = Path(f"{pattern}.partial")  # where `prepare` builds it (dualner.data.prepared)
        raise MissingPathError(f"{key}: {pattern!r} matches no file" + (
            f"; {unfinished} holds an unfinished `prepare` of it: run prepare again to finish it"
            if (unfinished / "prepare.json").is_file() else ""))
    return files


@dataclass
class StreamSpec:
    """One stream of stage 2: its files (raw corpus files, hub datasets or one prepared corpus)."""

    name: str  # "target/de"
    kind: str
    language: str
    sources: list  # CorpusFile | HubSource | PreparedCorpus
    weight: float
    pair_with: str = ""  # translations under the parallel MSE: the labeled source JSONL

    @property
    def seed_key(self) -> int:
        return zlib.crc32(self.name.encode())

    def identity(self) -> list:
        return [source.identity() for source in self.sources]


def open_sources(files: Sequence[str], key: str) -> list:
    from dualner.data.prepared import PreparedCorpus, is_prepared
    sources = []
    for path in files:
        if path.startswith(HUB_PREFIX):
            sources.append(HubSource(path))
        elif is_prepared(path):
            sources.append(PreparedCorpus.open(path, key))
        else:
            sources.append(describe_file(path, key))
    return sources


def check_corpus(sources: Sequence, language: str, kind: str, key: str) -> None:
    """The first record of every raw corpus file, before anything is written: a known format,
    UTF-8, and at least one sentence (the rest is read as training streams it)."""
    for source in sources:
        if not isinstance(source, CorpusFile):
            continue
        try:
            first = next((s for s in iter_sentences(source, language, kind == KIND_SOURCE)), None)
        except BadRecord as error:
            raise DataFormatError(f"{key}: {error}") from None
        if first is None:
            raise DataFormatError(f"{key}: {source.path}: " + ("file is empty" if source.size == 0 else "holds no sentence"))


def iter_sentences(file: CorpusFile, language: str, labeled: bool) -> Iterator[dict]:
    """Every sentence of a raw file in order (audits, tests, `prepare`); BadRecord on the first bad one."""
    for record in RecordReader(file, 0, file.end):
        sentence = parse_record(record, file, language, labeled)
        if sentence is not None:
            yield sentence


class HubSource:
    """`hf:NAME[:CONFIG]@SPLIT` streamed with `datasets`: one range per dataset shard; a position is
    a record index in the shard (resuming skips that many records: hub streams replay)."""

    def __init__(self, spec: str):
        self.path = spec
        rest = spec[len(HUB_PREFIX):]
        name, _, split = rest.rpartition("@")
        if not name:
            raise DataFormatError(f"{spec}: expected hf:NAME[:CONFIG]@SPLIT")
        self.name, self.split = name, split

    def identity(self) -> list:
        return [self.path]

    def _stream(self):
        import datasets
        name, config = (self.name, "") if Path(self.name).exists() else self.name.partition(":")[::2]
        return datasets.load_dataset(name, config or None, split=self.split, streaming=True)

    def ranges(self) -> list[tuple[int, int]]:
        shards = max(1, self._stream().num_shards)
        return [(index, shards) for index in range(shards)]

    def read(self, start: int, end: int, cursor: int) -> Iterator[tuple[int, int, dict | BadRecord]]:
        stream = self._stream()
        if end > 1:
            stream = stream.shard(num_shards=end, index=start)
        for index, record in enumerate(stream.skip(max(0, cursor)) if cursor > 0 else stream):
            position = max(0, cursor) + index
            if "tokens" not in record:
                yield position, position + 1, BadRecord(self.path, position, None,
                                                        f"record has no 'tokens' column (columns: {sorted(record)})")
                continue
            yield position, position + 1, {
                "words": list(record["tokens"]), "tags": [], "language": record.get("lang") or "",
                "src_id": str(record.get("src_id") or ""), "sample_id": f"{self.path}#{start}.{position}"}


def initial_ranges(source, range_bytes: int, range_sentences: int) -> list[list[int]]:
    """(start, end) pieces of one source before any reading: bytes, sentence ids, hub shards."""
    from dualner.data.prepared import PreparedCorpus
    if isinstance(source, HubSource):
        return [[start, end] for start, end in source.ranges()]
    if isinstance(source, PreparedCorpus):  # positions in a pass's order, within one block each
        from dualner.data.prepared import BLOCK
        step = min(range_sentences, BLOCK)
        return [[start, min(start + step, source.sentences)] for start in range(0, source.sentences, step)]
    if not source.splittable or source.size == 0:
        return [[0, source.end]]
    return [[start, min(start + range_bytes, source.size)] for start in range(0, source.size, range_bytes)]


# A range's state: [file index, start, end, pass, cursor]; cursor -1: at the start of its pass.
FILE, START, END, PASS, CURSOR = range(5)
_MIN_SPLIT_BYTES = 64


def refine(ranges: list[list[int]], sources: Sequence, readers: int) -> list[list[int]]:
    """Split ranges (the largest remainder first) until there are at least `readers`, where the data
    allows: at the middle of what is left of them (the part before the cursor is done for this
    pass). Byte ranges and prepared ranges (positions in a pass's order) split alike; a compressed
    file or a hub shard does not."""
    from dualner.data.prepared import PreparedCorpus
    ranges = [list(r) for r in ranges]
    while len(ranges) < readers:
        best, best_left = None, 0
        for index, (file, start, end, _, cursor) in enumerate(ranges):
            source = sources[file]
            smallest = 2 if isinstance(source, PreparedCorpus) else 2 * _MIN_SPLIT_BYTES
            splittable = isinstance(source, PreparedCorpus) or (isinstance(source, CorpusFile) and source.splittable)
            left = end - (start if cursor < 0 else cursor) if splittable else 0
            if left >= smallest and left > best_left:
                best, best_left = index, left
        if best is None:
            break
        file, start, end, pass_, cursor = ranges[best]
        begin = start if cursor < 0 else cursor
        middle = begin + (end - begin) // 2
        # the first piece keeps the cursor; the second starts at the middle (a byte range: mid-line,
        # aligned when read) at the same pass
        ranges[best:best + 1] = [[file, start, middle, pass_, cursor], [file, middle, end, pass_, -1]]
    return ranges


# -- reading one range -------------------------------------------------------------------------------
def read_range(spec: StreamSpec, state: list[int], cursor: int, counter: list[int] | None = None
               ) -> Iterator[tuple[int, int, object]]:
    """(record position, next cursor, unit or BadRecord) of a range from `cursor` (-1: its start).
    A unit is a list of members: sentence dicts to tokenize, or prepared window lists."""
    from dualner.data.prepared import PreparedCorpus
    source = spec.sources[state[FILE]]
    start, end, pass_ = state[START], state[END], state[PASS]
    if isinstance(source, PreparedCorpus):
        for position, after, windows in source.read(start, end, pass_, cursor, counter, spec.seed_key):
            for window in windows:
                window["kind"], window["pass"] = spec.kind, pass_
                window["language"] = window["language"] or spec.language
            yield position, after, _with_pair([windows], spec, windows[0]["src_id"] if windows else "", pass_)
        return
    if isinstance(source, HubSource):
        for position, after, item in source.read(start, end, cursor):
            if counter is not None:
                counter[0] += 1
            if isinstance(item, dict):
                item["language"] = item["language"] or spec.language
                item["kind"], item["pass"] = spec.kind, pass_
                item = [item]
            yield position, after, item
        return
    reader = RecordReader(source, start, end, None if cursor < 0 else cursor)
    labeled = spec.kind == KIND_SOURCE
    for record in reader:
        if counter is not None:
            counter[0] += 1
        try:
            sentence = parse_record(record, source, spec.language, labeled)
        except BadRecord as bad:
            yield record.start, record.end, bad
            continue
        if sentence is None:
            yield record.start, record.end, None
            continue
        sentence["kind"], sentence["pass"] = spec.kind, pass_
        yield record.start, record.end, _with_pair([sentence], spec, sentence["src_id"], pass_)


def _with_pair(unit: list, spec, src_id: str, pass_: int) -> list:
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


# -- a reader ------------------------------------------------------------------------------------------
@dataclass
class Cut:
    """How a pool becomes micro batches: saved with a pool so it can be cut again the same way."""

    micro_batch_size: int
    rows: int | None
    row_length: int
    sort: bool  # padded rows: units sorted by length, then the micro batches shuffled

    def key(self) -> list:
        return [self.micro_batch_size, self.rows, self.row_length, self.sort]


class _StreamCursor:
    """One stream as one reader sees it: its ranges in this pass's order, and the open one."""

    def __init__(self, spec: StreamSpec, index: int, ranges: list[list[int]], seed: int, one_pass: bool):
        self.spec, self.index, self.ranges, self.seed, self.one_pass = spec, index, ranges, seed, one_pass
        self.counter = [0]  # records read (tests: resume reads O(1) records)
        self._open: tuple[list[int], Iterator] | None = None
        self.segment: list | None = None

    def _order(self, state: list[int]) -> tuple[int, int]:
        return state[PASS], zlib.crc32(json.dumps([self.seed, self.index, state[FILE], state[START],
                                                   state[PASS]]).encode())

    @property
    def exhausted(self) -> bool:
        return not self.ranges or (self.one_pass and all(r[PASS] >= 1 for r in self.ranges))

    def next(self, segments: list) -> tuple[list[int], object] | None:
        """(range state, unit / BadRecord / None) of the next record, the segment list updated."""
        while True:
            if self._open is None:
                if self.exhausted:
                    return None
                state = min(self.ranges, key=self._order)
                if self.one_pass and state[PASS] >= 1:
                    return None
                self._open = (state, read_range(self.spec, state, state[CURSOR], self.counter))
                self.segment = None
            state, records = self._open
            item = next(records, StopIteration)
            if item is StopIteration:  # the range's pass is done
                if self.segment is not None:
                    self.segment[-1] = True
                state[PASS], state[CURSOR] = state[PASS] + 1, -1
                self._open, self.segment = None, None
                continue
            position, after, unit = item
            if self.segment is None:
                # [stream, file, start, end, pass, first record, records, cursor after, range done]
                self.segment = [self.index, state[FILE], state[START], state[END], state[PASS], position, 0, after, False]
                segments.append(self.segment)
            self.segment[6] += 1
            self.segment[7] = after
            state[CURSOR] = after
            return state, unit

    def close_segment(self) -> None:
        self.segment = None


def read_segment(spec: StreamSpec, segment: list, counter: list[int] | None = None) -> list:
    """The records of a pool's segment, read again (units, None, BadRecord), in order."""
    _, file, start, end, pass_, first, count, *_ = segment
    items = []
    for _, _, unit in read_range(spec, [file, start, end, pass_, first], first, counter):
        items.append(unit)
        if len(items) == count:
            break
    return items


class Stage2Reader:
    """What one reader (a rank's loader worker, or the rank itself) makes: pools of its ranges, then
    micro batches; the pools it was handed to finish first."""

    def __init__(self, streams: Sequence[StreamSpec], plan: "ReaderPlan", encoder: WindowTokenizer,
                 collate: Collator, cut: Cut, pool: int, seed: int, one_pass: bool):
        self.streams, self.plan, self.encoder, self.collate = streams, plan, encoder, collate
        self.cut, self.pool, self.seed, self.one_pass = cut, max(1, pool), seed, one_pass
        # the reader reads ahead of what is trained: its own copy of the range states
        self.cursors = [_StreamCursor(spec, index, [list(r) for r in plan.ranges.get(spec.name, [])], seed, one_pass)
                        for index, spec in enumerate(streams)]
        self._reports: list[dict] = []  # bad records not yet sent with a micro batch
        self._reread = [0]  # records of pools read again

    def records_read(self) -> int:
        return self._reread[0] + sum(cursor.counter[0] for cursor in self.cursors)

    def __iter__(self) -> Iterator[dict]:
        plan = self.plan
        for pool in plan.leftover:
            yield from self._micro_batches(pool, self._read_again(pool))
        number = plan.pools_made
        while True:
            drawn = self._draw(number)
            if drawn is None:
                return
            yield from self._micro_batches(*drawn)
            number += 1

    def _draw(self, number: int) -> tuple[dict, list] | None:
        rng = random.Random(zlib.crc32(json.dumps([self.seed, self.plan.reader, number]).encode()))
        segments: list = []
        drawn_into: dict[int, list] = {}
        live = [c for c in self.cursors if not c.exhausted]
        weights = [self.plan.weights.get(c.spec.name, 0.0) for c in live]
        drawn = 0
        while drawn < self.pool and live:
            cursor = rng.choices(live, weights if sum(weights) > 0 else None)[0] if len(live) > 1 else live[0]
            step = cursor.next(segments)
            if step is None:
                index = live.index(cursor)
                live.pop(index)
                weights.pop(index)
                continue
            drawn += 1
            drawn_into.setdefault(id(cursor.segment), []).append(step[1])
        for cursor in self.cursors:
            cursor.close_segment()
        if not segments:
            return None
        # the pool's canonical order is segment by segment, as reading the segments again gives it
        items = [item for segment in segments for item in drawn_into.get(id(segment), [])]
        description = {"reader": self.plan.reader, "number": number, "segments": segments,
                       "seed": rng.getrandbits(32), "cut": self.cut.key(), "skip": [], "consumed": 0}
        return description, items

    def _read_again(self, pool: dict) -> list:
        return [item for segment in pool["segments"]
                for item in read_segment(self.streams[segment[0]], segment, self._reread)]

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
                                 "cut": pool["cut"], "skip": pool["skip"], "bad": reports}
            yield batch

    def _report(self, bad: BadRecord) -> dict:
        line = bad.line
        if line is None:  # a record read from the middle of a file: count its line (rare: bad records only)
            found = [s for spec in self.streams for s in spec.sources
                     if isinstance(s, CorpusFile) and s.path == bad.path]
            line = lines_before(found[0], bad.byte) + 1 if found else None
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


class _ReaderFactory:
    """What a loader worker needs to build its reader (picklable without the loader itself)."""

    def __init__(self, streams, plans, encoder, collate, cut, pool, seed, one_pass, rank, readers_per_rank):
        self.streams, self.plans, self.encoder, self.collate = streams, plans, encoder, collate
        self.cut, self.pool, self.seed, self.one_pass = cut, pool, seed, one_pass
        self.rank, self.readers_per_rank = rank, readers_per_rank
        self.built: list[Stage2Reader] = []

    def __call__(self, local: int) -> Stage2Reader:
        reader = Stage2Reader(self.streams, self.plans[self.rank * self.readers_per_rank + local], self.encoder,
                              self.collate, self.cut, self.pool, self.seed, self.one_pass)
        self.built.append(reader)
        return reader


# -- the plan: which reader holds what ------------------------------------------------------------------
@dataclass
class ReaderPlan:
    reader: int
    ranges: dict  # stream name -> [range state, ...]
    weights: dict  # stream name -> this reader's weight
    leftover: list  # pools seen in part before the resume: finished first
    pools_made: int  # the number of this reader's next pool (its seed)


@dataclass
class GlobalPosition:
    """Every stream's ranges, the pools seen in part, the pools each reader made, bad records."""

    ranges: dict = field(default_factory=dict)  # stream name -> [range state, ...]
    identity: dict = field(default_factory=dict)  # stream name -> its files' identities
    pools: list = field(default_factory=list)
    pools_made: dict = field(default_factory=dict)  # reader -> pools made
    readers: int = 0
    next_worker: dict = field(default_factory=dict)  # rank -> the worker whose batch comes next
    bad: set = field(default_factory=set)  # (file, byte) of every bad record skipped so far

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
            merged.pools += state["pools"]
            merged.pools_made.update({int(k): v for k, v in state["pools_made"].items()})
            merged.readers = state["readers"]
            merged.next_worker[int(state["rank"])] = state["next_worker"]
            merged.bad |= {tuple(key) for key in state["bad"]}
        for ranges in merged.ranges.values():
            ranges.sort(key=lambda r: (r[FILE], r[START]))
        merged.pools.sort(key=lambda pool: (pool["reader"], pool["number"]))
        return merged


def global_ranges(streams: Sequence[StreamSpec], position: GlobalPosition | None, readers: int,
                  range_bytes: int, range_sentences: int, log=None) -> dict[str, list[list[int]]]:
    """Every stream's ranges for `readers` readers: the checkpoint's (re-cut where there are more
    readers than ranges), or new ones."""
    ranges: dict[str, list[list[int]]] = {}
    for spec in streams:
        saved = position.ranges.get(spec.name) if position else None
        if saved is not None and position.identity.get(spec.name) != spec.identity():
            if log is not None:
                log.warning("stage 2: the files of %s changed since the checkpoint (names, sizes or modification "
                            "times): its positions start over", spec.name)
            saved = None
        if saved is None:
            saved = [[file, start, end, 0, -1] for file, source in enumerate(spec.sources)
                     for start, end in initial_ranges(source, range_bytes, range_sentences)]
        ranges[spec.name] = refine(saved, spec.sources, readers)
    return ranges


# -- the main process: what was trained ---------------------------------------------------------------
class RankPosition:
    """One rank's part of the global position, updated from the micro batches it trains: the range
    states its readers own, the pools seen in part, the pools each of its readers made."""

    def __init__(self, rank: int, readers_per_rank: int, readers: int, names: list[str], owned: dict,
                 leftover: list, pools_made: dict, identity: dict, known_bad: set, next_worker: int):
        self.rank, self.readers_per_rank, self.readers, self.names = rank, readers_per_rank, readers, names
        self.owned = owned  # stream name -> [range state, ...] (this rank's readers')
        self._index = {(name, r[FILE], r[START], r[END]): r for name, states in owned.items() for r in states}
        self.pools = {(p["reader"], p["number"]): dict(p) for p in leftover}
        self.pools_made = dict(pools_made)
        self.identity, self.next_worker = identity, next_worker
        # Bad records are counted once each, however many passes read them: those of earlier jobs
        # (every rank knows them; rank 0 counts them) and the new ones this rank's readers found.
        self.known_bad, self.new_bad = known_bad, set()
        self.bad_seen: list[dict] = []  # reports the recipe has not taken yet

    def consumed(self, position: dict) -> None:
        key = (position["reader"], position["number"])
        pool = self.pools.get(key)
        if pool is None:  # a new pool: its records are taken from their ranges
            for stream, file, start, end, pass_, _, _, after, done in position["segments"]:
                state = self._index[(self.names[stream], file, start, end)]
                state[PASS], state[CURSOR] = (pass_ + 1, -1) if done else (pass_, after)
            pool = {"reader": position["reader"], "number": position["number"], "segments": position["segments"],
                    "seed": position["seed"]}
            self.pools[key] = pool
            reader = position["reader"]
            self.pools_made[reader] = max(self.pools_made.get(reader, 0), position["number"] + 1)
        pool.update(cut=position["cut"], skip=position["skip"], consumed=position["index"] + 1)
        if pool["consumed"] >= position["batches"]:
            del self.pools[key]
        for report in position["bad"]:
            key = (report["path"], report["byte"])
            if key not in self.known_bad and key not in self.new_bad:
                self.new_bad.add(key)
                self.bad_seen.append(report)
        local = position["reader"] - self.rank * self.readers_per_rank
        if 0 <= local < self.readers_per_rank:
            self.next_worker = (local + 1) % self.readers_per_rank

    def state_dict(self) -> dict:
        return {"version": POSITION_VERSION, "rank": self.rank, "readers": self.readers,
                "ranges": {name: [list(r) for r in states] for name, states in self.owned.items()},
                "identity": self.identity, "pools": [dict(p) for p in self.pools.values()],
                "pools_made": {str(k): v for k, v in self.pools_made.items()},
                "next_worker": self.next_worker,
                "bad": sorted(self.new_bad | (self.known_bad if self.rank == 0 else set()))}

    @property
    def bad_records(self) -> int:
        """This rank's share of the distinct bad records: summed over ranks, the run's count."""
        return len(self.new_bad) + (len(self.known_bad) if self.rank == 0 else 0)


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
        self._position: RankPosition | None = None  # None: not planned yet

    @property
    def position(self) -> RankPosition:
        """What this rank trained so far (planning from the start if nothing was planned yet)."""
        if self._position is None:
            self._plan(None)
        return self._position

    def _plan(self, position: GlobalPosition | None) -> None:
        ranges = global_ranges(self.streams, position, self.readers, self.range_bytes, self.range_sentences, self.log)
        same_readers = position is not None and position.readers == self.readers
        owner: dict[int, dict[str, list]] = {}
        holders: dict[str, set] = {}
        offset = 0
        for spec in self.streams:  # range j of a stream -> reader (j + offset) mod readers
            for index, state in enumerate(ranges[spec.name]):
                reader = (index + offset) % self.readers
                owner.setdefault(reader, {}).setdefault(spec.name, []).append(state)
                holders.setdefault(spec.name, set()).add(reader)
            offset += len(ranges[spec.name])
        leftover = position.pools if position is not None else []
        handed: dict[int, list] = {}
        for index, pool in enumerate(leftover):
            handed.setdefault(pool["reader"] if same_readers else index % self.readers, []).append(pool)
        # pool numbers (seeds) go on where they stopped; after a change of readers, above every old one
        fresh = 1 + max([pool["number"] for pool in leftover] + [-1])
        mine = range(self.rank * self.readers_per_rank, (self.rank + 1) * self.readers_per_rank)
        self.plans = {reader: ReaderPlan(reader, owner.get(reader, {}), self._reader_mix(reader, holders),
                                         handed.get(reader, []),
                                         position.pools_made.get(reader, 0) if same_readers else fresh)
                      for reader in mine}
        if not any(plan.ranges or plan.leftover for plan in self.plans.values()):
            raise DataFormatError(
                f"stage 2: rank {self.rank} has nothing to read: {self.readers} readers (ranks x loader workers) "
                f"for fewer pieces of data ({', '.join(f'{n}: {len(r)}' for n, r in ranges.items())}); a "
                f"compressed file is one piece: prepare it (python -m dualner prepare), split it, or set fewer "
                f"data.loader_workers")
        self._warn_unsplit(ranges)
        rotation = position.next_worker.get(self.rank, 0) if same_readers else 0
        owned = {spec.name: [state for reader in mine for state in owner.get(reader, {}).get(spec.name, [])]
                 for spec in self.streams}
        self._position = RankPosition(
            self.rank, self.readers_per_rank, self.readers, [spec.name for spec in self.streams], owned,
            [pool for reader in mine for pool in handed.get(reader, [])],
            {reader: self.plans[reader].pools_made for reader in mine},
            {spec.name: spec.identity() for spec in self.streams},
            set(position.bad) if position is not None else set(), rotation)
        self.factory = _ReaderFactory(self.streams, self.plans, self.encoder, self.collate, self.cut,
                                      self.pool if self.pool > 0 else self.cut.micro_batch_size, self.seed,
                                      self.one_pass, self.rank, self.readers_per_rank)
        # A generator of its own: creating an iterator draws a base seed, and drawing it from the
        # global RNG would shift the dropout masks of a resumed run.
        self.loader = DataLoader(_ReaderDataset(self.factory, self.readers_per_rank, rotation), batch_size=None,
                                 num_workers=self.workers, pin_memory=self.pin_memory, collate_fn=_as_made,
                                 prefetch_factor=4 if self.workers else None,
                                 generator=torch.Generator().manual_seed(self.seed + self.rank))
        self._iterator = None

    def _reader_mix(self, reader: int, holders: dict[str, set]) -> dict[str, float]:
        """The probability with which `reader` draws each stream, such that over all readers the
        streams mix as configured. A stream held by fewer readers than all (fewer pieces than
        readers) is drawn more often by its holders: share x readers / holders; the streams every
        reader holds fill the rest of each reader's draws in proportion to their shares (the other
        readers draw more of them), which keeps each one's global share. Exact while no reader's
        partial streams ask for more than all its draws."""
        share = self.mix
        partial = {name: min(1.0, share[name] * self.readers / len(holders[name]))
                   for name in share if 0 < len(holders.get(name, ())) < self.readers}
        full = {name: share[name] for name in share if len(holders.get(name, ())) == self.readers}
        mine = {name: q for name, q in partial.items() if reader in holders[name]}
        taken = sum(mine.values())
        if taken > 1.0 or not full:
            return {name: q / taken for name, q in mine.items()} if taken > 0 else dict(full)
        total_full = sum(full.values())
        return mine | {name: (1.0 - taken) * value / total_full for name, value in full.items()}

    def _warn_unsplit(self, ranges: dict) -> None:
        if self.log is None or self.rank != 0:
            return
        for spec in self.streams:
            pieces = len(ranges[spec.name])
            if pieces < self.readers:
                self.log.warning(
                    "stage 2: %s has %d piece(s) for %d readers (ranks x loader workers): %d reader(s) draw none "
                    "of it and the others draw it more often (the mix holds, but these readers' speed bounds "
                    "it). A compressed file is one piece: run `python -m dualner prepare` on it, or split it "
                    "into more files", spec.name, pieces, self.readers, self.readers - pieces)

    # -- reading ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def next_batch(self) -> dict:
        position = self.position  # plans the readers (and makes the loader) if nothing did yet
        if self._iterator is None:
            self._iterator = iter(self.loader)
        batch = next(self._iterator)
        position.consumed(batch["position"])
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
