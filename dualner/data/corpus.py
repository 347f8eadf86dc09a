"""Stage-2 corpus files, read record by record from any byte range: plain pre-tokenized text (a
sentence per line), JSONL (`{"tokens": [...], ...}` per line) and CoNLL (blank-line separated
blocks), each optionally compressed (`.gz`, `.xz`, `.zst`/`.zstd`, `.bz2`; the endings:
dualner.data.formats).

Ranges. An uncompressed file can be cut anywhere: a range [a, b) owns the records whose first byte
`p` lies in a <= p < b (Hadoop's LineRecordReader rule, shifted to half-open ranges). A reader of
[a, b) steps back one byte, skips to the end of that line (a CoNLL reader also to the end of the
block it landed in) and reads records while they start before b. Any partition of [0, size) into
ranges therefore reads every record exactly once, whatever the number of pieces, so ranges can be
re-cut between jobs (dualner.data.streaming). Positions in a compressed file are offsets in its
decompressed bytes. One made of independent blocks (bgzip, multi-frame zstd, multi-block xz:
dualner.data.blocks) is cut the same way: a reader enters the block holding its start. Any other
compressed file cannot be entered in the middle: it is one range (resuming at offset X decompresses
and discards X bytes: prepare such corpora, dualner.data.prepared).

Records. A record is parsed on its own: a malformed or non-UTF-8 record raises `BadRecord` (with
its file, byte and line) instead of ending the file, so the stream can skip and count it
(`data.max_bad_records`). A compressed file that stops decompressing (truncated or corrupted,
dualner.data.formats) ends in one last bad record, from the damaged sentence to the file's end: the
stream counts it like any other (a run stops with a checkpoint, naming the file, codec and byte).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from dualner.data.block_index import BlockIndex, block_index, ends_whole
from dualner.data.blocks import open_blocks
from dualner.data.conll import DOCSTART, INVISIBLE, _strip_language_prefix, normalize_tag
from dualner.data.formats import READ_BLOCK as _BLOCK
from dualner.data.formats import (DecompressionError, accepted_endings, check_content, corpus_format,
                                  open_decompressed, zstd_module)
from dualner.errors import DataFormatError
from dualner.labels import is_valid_tag

UNBOUNDED = 1 << 62  # the end of a compressed file's only range (its decompressed size is unknown)


class BadRecord(Exception):
    """One record that cannot be used; the stream skips and counts it (data.max_bad_records)."""

    def __init__(self, path: str, byte: int, line: int | None, reason: str):
        super().__init__(f"{path}:{line if line is not None else '?'} (byte {byte}): {reason}")
        self.path, self.byte, self.line, self.reason = path, byte, line, reason


@dataclass(frozen=True)
class CorpusFile:
    """A corpus file as stage 2 sees it: its format and compression from its name, and its size and
    modification time (a checkpoint's positions are byte offsets into exactly this file)."""

    path: str
    format: str  # text | jsonl | conll
    compression: str  # "" | gzip | xz | bz2 | zstd
    size: int  # bytes on disk; decompressed bytes where `blocks` is set
    mtime_ns: int
    blocks: BlockIndex | None = field(default=None, compare=False, repr=False)  # compressed, >= 2 blocks

    @property
    def splittable(self) -> bool:
        return not self.compression or self.blocks is not None

    @property
    def end(self) -> int:
        """The end of the file's positions: its size, or unbounded when compressed."""
        return self.size if self.splittable else UNBOUNDED

    def identity(self) -> list:
        return [self.path, self.size, self.mtime_ns]


def describe_file(path: str | Path, key: str) -> CorpusFile:
    found = corpus_format(path)
    if found is None:
        raise DataFormatError(f"{key}: {path}: unknown corpus format (expected a name ending in {accepted_endings(True)})")
    stat = os.stat(path)
    if found[1] == "zstd":
        zstd_module(key)
    try:
        check_content(path, found[1])  # gzip data named .txt, xz data named .gz, text named .zst, ...
    except DecompressionError as error:
        raise DecompressionError(f"{key}: {error}") from None
    blocks = block_index(str(path), found[1]) if found[1] else None
    if blocks is not None and blocks.blocks >= 2:
        return CorpusFile(str(path), found[0], found[1], blocks.size, stat.st_mtime_ns, blocks.thinned())
    return CorpusFile(str(path), found[0], found[1], stat.st_size, stat.st_mtime_ns)


# compressed bytes check_complete decompresses whole, per codec: about 0.1-0.3 s of one core (an AMD
# EPYC, measured by hand: gzip and zstd ~20 MB/s of compressed input, xz ~3, bzip2 ~0.7)
WHOLE_CHECK_BYTES = {"gzip": 4 << 20, "zstd": 4 << 20, "xz": 1 << 20, "bz2": 256 << 10}


def check_complete(file: CorpusFile) -> None:
    """Refuse a compressed file that does not decompress to its end, before anything is written
    (DecompressionError: file, codec, byte, remedy). A small one (WHOLE_CHECK_BYTES: 4 MiB of gzip)
    is decompressed whole (its checksums are checked too); a larger one has its end checked where the
    codec's structure tells it without decompressing (dualner.data.block_index.ends_whole). The damage of
    a larger single-stream gzip, or corruption inside a larger file, is found where it is read: one
    bad record."""
    if not file.compression:
        return
    size = os.stat(file.path).st_size
    if size <= WHOLE_CHECK_BYTES[file.compression]:
        with open_decompressed(file.path, file.compression) as handle:
            while handle.read(_BLOCK):
                pass
    elif not ends_whole(file.path, file.compression):
        raise DecompressionError.at(file.path, file.compression, "no end", None, size, size)


def open_corpus(file: CorpusFile, buffer: int = _BLOCK) -> BinaryIO:
    """The file's (decompressed) bytes, buffered so that readline() is fast (a small range: a
    small buffer, or opening it would read a whole MiB)."""
    if file.blocks is not None:
        return open_blocks(file.path, file.blocks, buffer)
    if file.compression:
        return open_decompressed(file.path, file.compression)
    return open(file.path, "rb", buffering=max(1 << 13, min(buffer, _BLOCK)))


def skip_to(handle: BinaryIO, file: CorpusFile, position: int) -> None:
    """Move to `position`: a seek in a plain or block-indexed file, decompress-and-discard in
    another compressed one."""
    if file.splittable:
        handle.seek(position)
        return
    left = position
    while left > 0:
        chunk = handle.read(min(left, _BLOCK))
        if not chunk:
            break
        left -= len(chunk)


_PAST_END_READ = 256  # bytes read at a time past a range's end, where only its last record is left


class _BoundedFile(io.FileIO):
    """A plain file whose reads stop at `end` and then go on in small steps: a range's reader
    buffers up to its end, not a buffer's length past it (at 1,024 readers of one file that was
    1.87x the file's bytes read; now the last record's rest)."""

    def __init__(self, path: str, end: int):
        super().__init__(path, "rb")
        self._end = end

    def readinto(self, buffer) -> int | None:
        left = self._end - self.tell()
        size = left if left > 0 else _PAST_END_READ
        return super().readinto(memoryview(buffer)[:max(1, min(len(buffer), size))])


def open_bounded(file: CorpusFile, end: int) -> BinaryIO:
    """An uncompressed file's bytes, buffered for readline(), read no further than needed past `end`."""
    return io.BufferedReader(_BoundedFile(file.path, end), _BLOCK)


_INVISIBLE_BYTES = tuple(c.encode() for c in INVISIBLE)


def _is_blank(line: bytes) -> bool:
    """Whitespace and characters that show nothing (zero-width, byte-order mark): a blank line."""
    stripped = line.strip()
    if not stripped or stripped[0] < 0x80:
        return not stripped
    for invisible in _INVISIBLE_BYTES:
        stripped = stripped.replace(invisible, b"")
    return not stripped.strip()


@dataclass
class RawRecord:
    start: int  # byte of its first line
    end: int  # byte after its last line (where the next record may begin)
    lines: list[bytes]
    line: int | None  # its first line's number in the file, when known
    damage: str = ""  # the file stops decompressing here: why (the record is bad, the last one)


class RecordReader:
    """The records of one range of one file, from its start or from a cursor (a record start found
    by an earlier read)."""

    def __init__(self, file: CorpusFile, start: int, end: int, cursor: int | None = None):
        self.file, self.start, self.end = file, start, end
        self.cursor = cursor  # None: begin at the range's start (alignment needed)

    def __iter__(self) -> Iterator[RawRecord]:
        file = self.file
        # a plain file read no further than the range needs; a compressed one through its codec
        bounded = file.splittable and not file.compression
        with (open_bounded(file, self.end) if bounded else open_corpus(file, self.end - self.start + (1 << 16))) as handle:
            if self.cursor is not None:
                position = self.cursor
                try:
                    skip_to(handle, file, position)
                except DecompressionError:
                    return  # the cursor is past the damage that ended the file: the range is done
                line_number = None
            else:
                position = self._align(handle)
                line_number = 1 if self.start == 0 else None
            yield from records_in(handle, file.format, position, self.end, line_number)

    def _align(self, handle: BinaryIO) -> int:
        """Position the handle at the first record starting at or after the range's start."""
        if self.start == 0:
            return 0
        handle.seek(self.start - 1)
        partial = handle.readline()  # the rest of the line holding byte start-1
        position = self.start - 1 + len(partial)
        if self.file.format != "conll":
            return position
        # A CoNLL record starts at a non-blank line after a blank one: if the line we stepped into
        # was not blank, the block it belongs to started before this range; skip to its end.
        previous_blank = self._line_ending_at_is_blank(handle, position, partial)
        handle.seek(position)
        if not previous_blank:
            while True:
                line = handle.readline()
                if not line:
                    return position
                position += len(line)
                if _is_blank(line):
                    break
        handle.seek(position)
        return position

    def _line_ending_at_is_blank(self, handle: BinaryIO, position: int, suffix: bytes) -> bool:
        """Whether the line that ends at `position` (of which `suffix` is the tail) is blank."""
        if suffix.strip():
            return False
        # the suffix is whitespace: look back for the rest of that line
        cursor = position - len(suffix)
        while cursor > 0:
            step = min(cursor, 4096)
            handle.seek(cursor - step)
            chunk = handle.read(step)
            newline = chunk.rfind(b"\n")
            part = chunk[newline + 1:] if newline >= 0 else chunk
            if part.strip():
                return False
            if newline >= 0:
                return True
            cursor -= step
        return True


def records_in(handle: BinaryIO, format: str, position: int, end: int, line_number: int | None
               ) -> Iterator[RawRecord]:
    """The records of `handle` from `position` (a record start) while they start before `end`:
    blank-line separated blocks of CoNLL, non-blank lines of the other formats. The one place that
    knows where a record ends (ranges, resumes and size estimates all read through it)."""
    conll = format == "conll"
    block: list[bytes] = []
    block_start = block_line = None
    while True:
        if not block and position >= end:
            return
        try:
            line = handle.readline()
        except DecompressionError as error:  # the rest, from the sentence it cut, is one bad record
            start, first_line = (block_start, block_line) if block else (position, line_number)
            yield RawRecord(start, UNBOUNDED, [], first_line,
                            str(error).split(": ", 1)[-1] + " (the rest of the file is not read)")
            return
        if not line:
            break
        here = position
        position += len(line)
        if conll:
            if _is_blank(line):
                if block:
                    yield RawRecord(block_start, here, block, block_line)
                    block = []
            else:
                if not block:
                    if here >= end:
                        return
                    block_start, block_line = here, line_number
                block.append(line)
        elif not _is_blank(line):
            yield RawRecord(here, position, [line], line_number)
        if line_number is not None:
            line_number += 1
    if block:
        yield RawRecord(block_start, position, block, block_line)


def line_numbers(file: CorpusFile, positions: list[int]) -> dict[int, int]:
    """The line number of each byte position (1-based), in one read of the file up to the last one."""
    numbers, count, read = {}, 0, 0
    with open_corpus(file) as handle:
        for position in sorted(set(positions)):
            while read < position:
                try:
                    chunk = handle.read(min(position - read, 1 << 24))
                except DecompressionError:
                    chunk = b""  # the position is a damaged record's: the lines before the damage
                if not chunk:
                    read = position
                    break
                count += chunk.count(b"\n")
                read += len(chunk)
            numbers[position] = count + 1
    return numbers


# -- parsing one record ------------------------------------------------------------------------------
def _decode(record: RawRecord, file: CorpusFile) -> list[str]:
    if record.damage:
        raise BadRecord(file.path, record.start, record.line, record.damage)
    if record.start == 0 and record.lines[0][:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise BadRecord(file.path, 0, 1, "not UTF-8 text (a UTF-16 byte-order mark); save it as UTF-8")
    for offset, line in enumerate(record.lines):
        if b"\x00" in line:
            raise BadRecord(file.path, record.start, None if record.line is None else record.line + offset,
                            "a NUL byte (binary data, or UTF-16 text?)")
    try:
        lines = [line.decode("utf-8") for line in record.lines]
        if record.start == 0 and lines[0].startswith("\ufeff"):  # a byte-order mark is not text
            lines[0] = lines[0][1:]
        return lines
    except UnicodeDecodeError as error:
        raise BadRecord(file.path, record.start, record.line,
                        f"not UTF-8 text ({error.reason} at byte {record.start + error.start})") from None


def parse_jsonl_line(text: str, where: str) -> dict | None:
    """One JSONL record -> {words, tags, language, src_id}, None for a record without tokens;
    DataFormatError (naming `where`) when it is malformed. Shared by every JSONL reader."""
    try:
        record = json.loads(text)
        words = record["tokens"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        hint = ("; JSONL is one JSON object per line, not one JSON document"
                if text.strip() in ("[", "{") or text.lstrip().startswith("[") else "")
        raise DataFormatError(f"{where}: expected a JSON object with a 'tokens' list ({error}){hint}") from None
    if not isinstance(words, list) or not all(isinstance(w, str) and w and not w.isspace() for w in words):
        raise DataFormatError(f"{where}: 'tokens' must be a list of non-empty strings")
    tags = record.get("tags") or []
    if tags and isinstance(tags, list) and all(isinstance(t, str) for t in tags):
        tags = [normalize_tag(tag) for tag in tags]  # lower case and IOBES read as BIO, as in CoNLL
    if tags and (not isinstance(tags, list) or len(tags) != len(words) or not all(map(is_valid_tag, tags))):
        raise DataFormatError(f"{where}: 'tags' must be one valid BIO tag per token")
    language = record.get("lang")
    return {"words": words, "tags": tags, "language": language if isinstance(language, str) else None,
            "src_id": "" if record.get("src_id") is None else str(record["src_id"])}


def parse_record(record: RawRecord, file: CorpusFile, language: str, labeled: bool) -> dict | None:
    """A raw record -> a sentence dict (words, tags, language, src_id, sample_id), None when it holds
    no sentence; BadRecord when it cannot be used. `language`: the stream's (its config key's); an
    unlabeled record naming another `lang` is bad (the labeled source may mix data.train's languages)."""
    lines = _decode(record, file)
    sample_id = f"{file.path}@{record.start}"
    where = f"{file.path}:{record.line if record.line is not None else '?'} (byte {record.start})"
    if file.format == "text":
        words = text_words(lines[0])
        return {"words": words, "tags": [], "language": language, "src_id": "", "sample_id": sample_id} if words else None
    if file.format == "jsonl":
        try:
            parsed = parse_jsonl_line(lines[0], where)
        except DataFormatError as error:
            raise BadRecord(file.path, record.start, record.line, str(error).split(": ", 1)[-1]) from None
        if not parsed["words"]:
            return None
        if not labeled:
            check_language(parsed["language"], language, file.path, record.start, record.line)
        parsed["language"] = parsed["language"] or language
        parsed["sample_id"] = sample_id
        if not labeled:
            parsed["tags"] = []
        return parsed
    words, tags = [], []
    for offset, text in enumerate(lines):
        text = text.rstrip()
        columns = text.split("\t") if "\t" in text else text.split()
        if columns[0].strip() == DOCSTART:
            continue
        word = _strip_language_prefix(columns[0].strip(), language)
        if not word:
            raise BadRecord(file.path, record.start, None if record.line is None else record.line + offset,
                            "empty token")
        words.append(word)
        if labeled:
            tag = normalize_tag(columns[1]) if len(columns) == 2 else ""
            if len(columns) != 2 or not is_valid_tag(tag):
                raise BadRecord(file.path, record.start, None if record.line is None else record.line + offset,
                                f"expected `token<TAB>label` with a BIO label, found {text.strip()[:80]!r}")
            tags.append(tag)
    if not words:  # a -DOCSTART- block
        return None
    return {"words": words, "tags": tags, "language": language, "src_id": "", "sample_id": sample_id}


def check_language(found: str | None, language: str, path: str, byte: int, line: int | None) -> None:
    """A record of a stream read as `language` (stage2.target.de: "de") that names another: BadRecord
    (its sentences would be counted, and teach, as the wrong language)."""
    if found and language and found != language:
        raise BadRecord(path, byte, line, f"the record's language is {found!r} ('lang'), but the file is read as "
                                          f"{language!r} (its config key): list the file under its language, or "
                                          f"fix the record's 'lang'")


def text_words(line: str) -> list[str]:
    """The words of a plain-text line: tokens that show something; none for a `-DOCSTART-` line."""
    words = [word for word in line.split() if word.strip(INVISIBLE)]
    return [] if words and words[0] == DOCSTART else words
