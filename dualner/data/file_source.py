"""Corpus files as stage-2 sources: a plain text, JSONL or CoNLL file (cut anywhere: Hadoop's rule,
dualner.data.corpus), and a compressed one, cut at its blocks where it is made of several (bgzip,
multi-frame zstd, multi-block xz: dualner.data.blocks), else one piece shared by stride whose entry
in the middle decompresses everything before it. Counting reads O(1) of a file of any size."""

from __future__ import annotations

import io
from typing import Iterator

from dualner.data.corpus import (BadRecord, CorpusFile, RawRecord, RecordReader, check_complete, describe_file,
                                 parse_record, records_in)
from dualner.data.formats import DecompressionError, open_decompressed
from dualner.data.source import Source
from dualner.errors import ConfigError, DataFormatError

# decompress-and-discard speed per CPU, bytes of output a second (issue 24's measurements; bz2 from
# its ratio to gzip on the same text): what a resume inside a piece that cannot be split costs
DECOMPRESSION_RATE = {"gzip": 190e6, "xz": 48e6, "zstd": 730e6, "bz2": 12e6}


class RawFileSource(Source):
    """An uncompressed corpus file: positions are its bytes, cut anywhere."""

    kind = "file"

    def __init__(self, file: CorpusFile):
        self.file, self.path = file, file.path

    @classmethod
    def open(cls, path: str, key: str) -> RawFileSource:
        return cls(describe_file(path, key))

    def identity(self) -> list:
        return self.file.identity()

    @property
    def contiguous(self) -> bool:
        return self.file.splittable

    @property
    def extent(self) -> int:
        return self.file.size

    def records(self, start: int, end: int, pass_: int, cursor: int, seed_key: int) -> Iterator[tuple[int, int, RawRecord]]:
        for record in RecordReader(self.file, start, end, None if cursor < 0 else cursor):
            yield record.start, record.end, record

    def unit(self, record: RawRecord, language: str, kind: str, pass_: int, labeled: bool) -> list | BadRecord | None:
        try:
            sentence = parse_record(record, self.file, language, labeled)
        except BadRecord as bad:
            return bad
        if sentence is None:
            return None
        sentence["kind"], sentence["pass"] = kind, pass_
        return [sentence]

    def pairing_id(self, unit: list) -> str:
        return unit[0]["src_id"]

    def corpus_file(self) -> CorpusFile:
        return self.file

    def count(self, key: str) -> tuple[int, bool]:
        return estimate_records(self.file)

    def check_readable(self, language: str, labeled: bool, key: str) -> None:
        """The first record, before anything is written: a known format, UTF-8, and at least one
        sentence (the rest is read as training streams it); a compressed file also whole to its end
        (dualner.data.corpus.check_complete)."""
        try:
            check_complete(self.file)
            first = next((s for s in iter_sentences(self.file, language, labeled)), None)
        except DecompressionError as error:
            raise DecompressionError(f"{key}: {error}") from None
        except BadRecord as error:
            raise DataFormatError(f"{key}: {error}") from None
        if first is None:
            raise DataFormatError(f"{key}: {self.path}: " + ("file is empty" if self.file.size == 0
                                                              else "holds no sentence"))

    def translation_records(self, sample: int, key: str) -> Iterator[dict]:
        if self.file.format != "jsonl":
            raise ConfigError(f"{key}: {self.path}: stage2.mse=parallel pairs each translation with its source "
                              f"by `src_id`, which only JSONL records carry; use stage2.mse=centroid")
        return iter_sentences(self.file, "", False)


class CompressedFileSource(RawFileSource):
    """A compressed corpus file: positions are its decompressed bytes. Made of blocks, it is cut at
    any byte like a plain one (a reader enters the block holding its start); else it is one piece
    that cannot be entered in the middle."""

    kind = "compressed"

    def unsplit_pieces(self) -> list[tuple[int, int]]:
        return [] if self.file.splittable else [(0, self.file.end)]

    def entry_cost(self, position: int) -> int:
        return 0 if self.file.splittable else max(0, position)

    def entry_seconds(self, discarded: int) -> float:
        return discarded / DECOMPRESSION_RATE.get(self.file.compression, 48e6)


def iter_sentences(file: CorpusFile, language: str, labeled: bool) -> Iterator[dict]:
    """Every sentence of a corpus file in order (audits, tests, `prepare`); BadRecord on the first bad one."""
    for record in RecordReader(file, 0, file.end):
        sentence = parse_record(record, file, language, labeled)
        if sentence is not None:
            yield sentence


# -- sizes without reading everything ----------------------------------------------------------------
_SAMPLE_POINTS = 16
_SAMPLE_BYTES = 1 << 16
EXACT_COUNT_BYTES = 4 << 20  # files up to this size are counted exactly


def estimate_records(file: CorpusFile) -> tuple[int, bool]:
    """(records, exact): counted exactly in a small file; else estimated from records per byte in 16
    evenly spaced 64 KiB samples (a compressed file: its first 4 MiB decompressed, scaled by the
    compressed bytes they took) — start-up reads O(1) of a corpus of any size."""
    if file.splittable and file.size <= EXACT_COUNT_BYTES:
        return sum(1 for _ in RecordReader(file, 0, file.size)), True
    if file.splittable:
        records = sampled = 0
        for point in range(_SAMPLE_POINTS):
            start = file.size * point // _SAMPLE_POINTS
            if file.blocks is not None:  # just past a block's start: no decompressing up to the point
                start = int(file.blocks.decompressed[file.blocks.entry(start)]) + 1
            reader = RecordReader(file, start, min(file.size, start + _SAMPLE_BYTES))
            records += sum(1 for _ in reader)
            sampled += min(file.size, start + _SAMPLE_BYTES) - start
        return max(1, round(records * file.size / max(1, sampled))), False
    chunks, size, more = [], 0, False
    with open(file.path, "rb") as raw, open_decompressed(file.path, file.compression, raw) as compressed:
        try:
            while size < EXACT_COUNT_BYTES and (chunk := compressed.read1(EXACT_COUNT_BYTES - size)):
                chunks.append(chunk)
                size += len(chunk)
            more = size >= EXACT_COUNT_BYTES and bool(compressed.read(1))
        except DecompressionError:
            pass  # its sentences end at the damage (a bad record when the stream reads it)
        taken = raw.tell()
    data = b"".join(chunks)
    counted = sum(1 for _ in records_in(io.BytesIO(data), file.format, 0, len(data), 1))
    if not more:
        return counted, True
    return max(1, round(counted * file.size / max(1, taken))), False
