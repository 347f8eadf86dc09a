"""The stage-2 loader: every corpus read once per pass across all ranks and loader workers, mixed
as configured by one global plan, tokenized on the fly (or read tokenized from a prepared corpus),
and resumable exactly, in O(1) of the position, on any number of ranks and workers.

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

Pools. A reader reads the records its pool's plan asks for, tokenizes them together, shuffles them
(padded rows: sorts them by length) with a seed of its own, and cuts them into micro batches of
whole units. A pool is described by its segments: (stream, file, range, pass, first record,
records, ...), enough to read it again anywhere.

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

import bisect
import collections
import glob
import itertools
import json
import random
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dualner.data.corpus import (BadRecord, CorpusFile, RecordReader, check_complete, describe_file, open_corpus,
                                 parse_record, skip_to)
from dualner.data.formats import DecompressionError
from dualner.data.encoding import WindowTokenizer
from dualner.data.mix import MixPlan
from dualner.data.packing import Collator, cut_micro_batches
from dualner.data.position import GlobalPosition, RankPosition, advance, spent
from dualner.data.prepared import BLOCK as PREPARED_BLOCK
from dualner.data.shares import (CURSOR, END, FILE, OFFSET, ONCE, PASS, SKIP, START, STEP, equal_shares, reshare,
                                 unsplit_pieces)
from dualner.errors import DataFormatError, MissingPathError

KIND_SOURCE, KIND_TARGET, KIND_TRANSLATION = "source", "target", "translation"
HUB_PREFIX = "hf:"
STREAM_META = ("language", "kind", "sample_id", "src_id", "word_offset", "pass")
DEFAULT_RANGE_BYTES = 64 << 20
DEFAULT_RANGE_SENTENCES = 1 << 16
# decompress-and-discard speed per CPU, bytes of output a second (issue 24's measurements; bz2 from
# its ratio to gzip on the same text): what a resume inside a piece that cannot be split costs
DECOMPRESSION_RATE = {"gzip": 190e6, "xz": 48e6, "zstd": 730e6, "bz2": 12e6}


# -- the streams and their pieces ------------------------------------------------------------------
def expand_files(pattern: str, key: str) -> list[str]:
    """A path or glob -> sorted files; an error naming the config key when nothing matches.

    `hf:NAME[:CONFIG]@SPLIT` names a `datasets` dataset (a hub name, or a local folder) with a
    `tokens` column, streamed rather than downloaded whole. A folder holding a prepared corpus
    (its manifest.json) is one entry."""
    from dualner.data.prepared import is_prepared, unfinished_preparation
    if pattern.startswith(HUB_PREFIX):
        return [pattern]
    if is_prepared(pattern):
        return [str(pattern)]
    files = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    if not glob.has_magic(pattern) and Path(pattern).is_dir():
        unfinished = unfinished_preparation(pattern)
        if unfinished is not None:
            raise DataFormatError(f"{key}: {unfinished}")
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
    UTF-8, and at least one sentence (the rest is read as training streams it); a compressed file
    also whole to its end (dualner.data.corpus.check_complete)."""
    for source in sources:
        if not isinstance(source, CorpusFile):
            continue
        try:
            check_complete(source)
            first = next((s for s in iter_sentences(source, language, kind == KIND_SOURCE)), None)
        except DecompressionError as error:
            raise DecompressionError(f"{key}: {error}") from None
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


def global_ranges(streams: Sequence[StreamSpec], position: GlobalPosition | None, readers: int,
                  limits: dict[str, int], log=None) -> dict[str, list[list[list[int]]]]:
    """Every stream's ranges for each of `readers` readers (dualner.data.shares): the checkpoint's
    own where the readers are the same, its ranges shared out again where they are not, else
    equal shares from the start."""
    ranges: dict[str, list[list[list[int]]]] = {}
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
            for reader, *state in saved:
                ranges[spec.name][reader].append(state)
        else:
            ranges[spec.name] = reshare([state for _, *state in saved], spec.sources, readers, limits)
    return ranges


# -- reading one range -------------------------------------------------------------------------------
def read_range(spec: StreamSpec, state: list[int], cursor: int, counter: list[int] | None = None,
               skip: int | None = None) -> Iterator[tuple[int, int, object]]:
    """(record position, next cursor, unit or BadRecord) of a range from `cursor` (-1: its start),
    passing over `skip` records (default: the state's) and then keeping one in the range's step.
    A unit is a list of members: sentence dicts to tokenize, or prepared window lists."""
    from dualner.data.prepared import PreparedCorpus
    source = spec.sources[state[FILE]]
    start, end, pass_ = state[START], state[END], state[PASS]
    strided = _strided(state[SKIP] if skip is None else skip, state[STEP])
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
            if not strided():
                continue
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
        if not strided():
            continue
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
        self._empty_ends = 0  # ranges ended in a row without a record: a share with none at all

    def _order(self, state: list[int]) -> tuple[int, int]:
        return state[PASS], zlib.crc32(json.dumps([self.seed, self.index, state[FILE], state[START],
                                                   state[OFFSET], state[PASS]]).encode())

    def _live(self) -> list[list[int]]:
        return [state for state in self.ranges if not spent(state)]

    @property
    def exhausted(self) -> bool:
        live = self._live()
        return (not live or self._empty_ends > len(live)
                or (self.one_pass and all(r[PASS] >= 1 for r in live)))

    def next_range(self) -> list[int] | None:
        """The range to read next (None: none is left)."""
        if self.exhausted:
            return None
        state = min(self._live(), key=self._order)
        return None if self.one_pass and state[PASS] >= 1 else state

    def _open_next(self) -> bool:
        """Open the range to read next (False: none is left)."""
        state = self.next_range()
        if state is None:
            return False
        self._open = (state, read_range(self.spec, state, state[CURSOR], self.counter))
        self.segment = None
        return True

    def catch_up(self) -> None:
        """Where entering the range to read next reads what comes before its cursor (a piece that
        cannot be split, decompressed up to there), open it and read up to its first record now: a
        resume's catch-up happens here, not in whichever pool first asks for this stream."""
        state = self.next_range() if self._open is None else None
        if state is not None and _reads_before(self.spec.sources[state[FILE]], state[CURSOR]) and self._open_next():
            state, records = self._open
            first = next(records, StopIteration)
            self._open = (state, iter(()) if first is StopIteration else itertools.chain([first], records))

    def next(self, segments: list) -> tuple[list[int], object] | None:
        """(range state, unit / BadRecord / None) of the next record, the segment list updated."""
        while True:
            if self._open is None and not self._open_next():
                return None
            state, records = self._open
            item = next(records, StopIteration)
            if item is StopIteration:  # the range's pass is done
                if self.segment is not None:
                    self.segment[8] = True
                else:
                    self._empty_ends += 1
                advance(state, state[PASS], -1, True)
                self._open, self.segment = None, None
                continue
            self._empty_ends = 0
            position, after, unit = item
            if self.segment is None:
                # [stream, file, start, end, pass, first record, records, cursor after, range done,
                #  step, offset, once]
                self.segment = [self.index, state[FILE], state[START], state[END], state[PASS], position, 0, after,
                                False, state[STEP], state[OFFSET], state[ONCE]]
                segments.append(self.segment)
            self.segment[6] += 1
            self.segment[7] = after
            advance(state, state[PASS], after, False)
            return state, unit

    def close_segment(self) -> None:
        self.segment = None


def _skipped_bytes(source, position: int) -> int:
    """What entering `source` at `position` decompresses and throws away."""
    return max(0, position) if isinstance(source, CorpusFile) and not source.splittable else 0


def _reads_before(source, position: int) -> bool:
    """Whether entering `source` at `position` reads what comes before it (a compressed file that
    cannot be split, a hub dataset's shard); elsewhere it is a seek."""
    return position > 0 and (isinstance(source, HubSource) or _skipped_bytes(source, position) > 0)


def read_segment(spec: StreamSpec, segment: list, counter: list[int] | None = None) -> list:
    """The records of a pool's segment, read again (units, None, BadRecord), in order."""
    _, file, start, end, pass_, first, count, _, _, step, offset, once = segment
    state = [file, start, end, pass_, first, step, offset, 0, once]
    items = []
    for _, _, unit in read_range(spec, state, first, counter, skip=0):  # the first record is kept
        items.append(unit)
        if len(items) == count:
            break
    return items


class Stage2Reader:
    """What one reader (a rank's loader worker, or the rank itself) makes: pools of its ranges, then
    micro batches; the pools it was handed to finish first."""

    def __init__(self, streams: Sequence[StreamSpec], plan: "ReaderPlan", mix: MixPlan, encoder: WindowTokenizer,
                 collate: Collator, cut: Cut, pool: int, seed: int, one_pass: bool):
        self.streams, self.plan, self.mix, self.encoder, self.collate = streams, plan, mix, encoder, collate
        self.cut, self.pool, self.seed, self.one_pass = cut, max(1, pool), seed, one_pass
        # the reader reads ahead of what is trained: its own copy of the range states
        self.cursors = [_StreamCursor(spec, index, [list(r) for r in plan.ranges.get(spec.name, [])], seed, one_pass)
                        for index, spec in enumerate(streams)]
        self._reports: list[dict] = []  # bad records not yet sent with a micro batch
        self._lines: dict[str, _LineIndex | None] = {}  # line numbers of bad records, per file
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
        segments: list = []
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
                                 "chunk": pool["chunk"], "read_seconds": pool.get("read_seconds"),
                                 "cut": pool["cut"], "skip": pool["skip"], "bad": reports}
            yield batch

    def _report(self, bad: BadRecord) -> dict:
        line = bad.line
        if line is None:  # a record read from the middle of a file: count its line (rare: bad records only)
            if bad.path not in self._lines:
                found = [s for spec in self.streams for s in spec.sources
                         if isinstance(s, CorpusFile) and s.path == bad.path]
                self._lines[bad.path] = _LineIndex(found[0]) if found else None
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


class _LineIndex:
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


@dataclass
class ReaderPlan:
    reader: int
    readers: int
    ranges: dict  # stream name -> [range state, ...]
    leftover: list  # pools seen in part before the resume: finished first
    pools_made: int  # the number of this reader's next pool (its seed)
    chunk_base: int  # pool n of this reader is plan chunk chunk_base + n x readers + reader


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
                cursor = _StreamCursor(spec, index, plan.ranges.get(spec.name, []), self.seed, self.one_pass)
                pieces = [(spec.sources[segment[1]], segment[5]) for pool in plan.leftover
                          for segment in pool["segments"] if segment[0] == index]
                state = cursor.next_range()
                if state is not None:
                    pieces.append((spec.sources[state[FILE]], state[CURSOR]))
                skipped = [(_skipped_bytes(source, at), source) for source, at in pieces]
                total = sum(count for count, _ in skipped)
                if total and total > found.get(spec.name, (0,))[0]:
                    seconds = sum(count / DECOMPRESSION_RATE.get(source.compression, 48e6) for count, source in skipped)
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
