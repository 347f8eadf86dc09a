"""The file formats DualNER reads, told by the name's ending: one table for every reader (labeled
CoNLL, prediction input, stage-2 corpora) and for the errors that list what is accepted.

- a format: `conll` (`token<TAB>label`, blank-line separated; dualner.data.conll), `jsonl`
  (`{"tokens": [...]}` per line) or `text` (a pre-tokenized sentence per line);
- a compression (stage-2 corpora only, dualner.data.corpus): one more ending after the format's.

Compressed bytes are read through one opener, `open_decompressed`: it checks that the file holds
what its name says (the codec's magic bytes), and every failure to decompress (a truncated file, a
corrupted one, a zstd frame that ends early) is one `DecompressionError` naming the file, the codec,
the decompressed and compressed byte reached and the remedy. A reader of its own (a block-splittable
one) wraps its decompressed stream with `checked_stream` to report failures the same way.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import zlib
from pathlib import Path
from typing import BinaryIO

from dualner.errors import DataFormatError

# format -> the name endings (lower case) that mean it
FORMATS: dict[str, tuple[str, ...]] = {
    "text": (".txt", ".text"),
    "jsonl": (".jsonl", ".json"),
    "conll": (".tsv", ".conll", ".iob", ".bio"),
}
FORMAT_OF_SUFFIX = {suffix: name for name, suffixes in FORMATS.items() for suffix in suffixes}
# compression ending -> codec name
COMPRESSIONS = {".gz": "gzip", ".xz": "xz", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
ENDING_OF_CODEC = {"gzip": ".gz", "xz": ".xz", "bz2": ".bz2", "zstd": ".zst"}
# the command-line program of each codec (`PROGRAM -t FILE` tests a file: every decompression error says so)
PROGRAM = {"gzip": "gzip", "xz": "xz", "bz2": "bzip2", "zstd": "zstd"}
READ_BLOCK = 1 << 20  # bytes per read of a corpus file
MAGIC_BYTES = 10  # enough of a file's start to tell every codec


def format_of(path: str | Path) -> str | None:
    """The format of an uncompressed file from its last ending (`x.TSV` -> "conll"), None if unknown."""
    return FORMAT_OF_SUFFIX.get(Path(path).suffix.lower())


def corpus_format(path: str | Path) -> tuple[str, str] | None:
    """(format, compression) from a file name (`de.jsonl.zst` -> ("jsonl", "zstd")), None if unknown."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    compression = ""
    if suffixes and suffixes[-1] in COMPRESSIONS:
        compression = COMPRESSIONS[suffixes.pop()]
    if not suffixes or suffixes[-1] not in FORMAT_OF_SUFFIX:
        return None
    return FORMAT_OF_SUFFIX[suffixes[-1]], compression


def accepted_endings(compressed: bool = False) -> str:
    """What an error says is accepted: every format's endings (and, for corpora, the compressions')."""
    listed = "; ".join(f"{name}: {' '.join(suffixes)}" for name, suffixes in FORMATS.items())
    if compressed:
        listed += f"; optionally followed by one of {' '.join(COMPRESSIONS)}"
    return listed


def zstd_module(key: str = ""):
    try:
        import zstandard
    except ImportError:  # pragma: no cover - a runtime dependency; a broken install only
        raise DataFormatError(f"{key}: reading .zst corpora needs the zstandard package "
                              f"(pip install zstandard)") from None
    return zstandard


# -- what a file holds ----------------------------------------------------------------------------------
def codec_of_content(head: bytes) -> str:
    """The codec whose magic bytes start `head` (a file's first MAGIC_BYTES), "" for none."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd") or (len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18"
                                                and 0x50 <= head[0] <= 0x5f):  # a frame or a skippable frame
        return "zstd"
    # "BZh", the block size, then a block's magic (pi) or the end of an empty stream's (sqrt(pi))
    if head[:3] == b"BZh" and head[3:4] in b"123456789" and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return "bz2"
    return ""


def check_content(path: str | Path, codec: str, head: bytes | None = None, compressed_ok: bool = True) -> None:
    """Refuse a file whose bytes are not what its name says: compressed data under a plain name
    (`codec` ""), or another codec's data (or none) under a compressed one. An empty file passes
    (the readers call it empty). `compressed_ok`: whether this reader takes compressed files."""
    if head is None:
        with open(path, "rb") as handle:
            head = handle.read(MAGIC_BYTES)
    if not head:
        return
    found = codec_of_content(head)
    if found == codec:
        return
    name = Path(path).name
    if not codec:
        ending = Path(name).suffix
        named = COMPRESSIONS.get(ending.lower()) == found  # `x.txt.gz` where plain text is read
        what = f"a {found} file" if named else f"{found} data in a {ending or 'plain'} file"
        plain = name[:-len(ending)] if named else f"{Path(name).stem}.plain{ending}"
        remedy = (f"rename it to {name}{ENDING_OF_CODEC[found]}" if compressed_ok else
                  f"this reader takes plain text: decompress it (`{PROGRAM[found]} -dc {name} > {plain}`)")
        raise DecompressionError(f"{path}: {what}; {remedy}")
    ending = Path(name).suffix
    if found:
        raise DecompressionError(f"{path}: {found} data in a {ending} file; rename it to "
                                 f"{name[:-len(ending)]}{ENDING_OF_CODEC[found]}")
    raise DecompressionError(f"{path}: not {codec} data (it starts with {head[:8]!r}): if it is plain text, remove "
                             f"the {ending} ending; if it should be {codec}, it is damaged: re-download or "
                             f"recompress it (`{PROGRAM[codec]} -t {name}` tests it)")


# -- decompression, with one error for every failure ----------------------------------------------------
class DecompressionError(DataFormatError):
    """A compressed file that does not decompress to its end (truncated, corrupted, not the codec its
    name says); the message names the file, the codec, the byte reached and the remedy."""

    @classmethod
    def at(cls, path: str | Path, codec: str, cause: BaseException | str, decompressed: int | None,
           compressed: int | None = None, size: int | None = None) -> "DecompressionError":
        """`decompressed` None: the damage was found in the file's structure, without decompressing."""
        if isinstance(cause, EOFError) or cause == "truncated":
            reason = "the file ends inside the compressed stream (truncated)"
        elif cause == "no end":
            reason = f"the file does not end as a complete {codec} stream (truncated, or its end is damaged)"
        else:
            reason = f"corrupt data ({cause})"
        places = [] if decompressed is None else [f"decompressed byte {decompressed}"]
        if compressed is not None:
            places.append(f"compressed byte {compressed}" + (f" of {size}" if size is not None else ""))
        return cls(f"{path}: damaged {codec} data: {reason}, at {', '.join(places)}; re-download or recompress it "
                   f"(`{PROGRAM[codec]} -t {path}` tests it)")


# what the codecs raise on damaged input (gzip: BadGzipFile is an OSError; bz2: OSError)
CODEC_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, lzma.LZMAError, zlib.error)


def codec_errors() -> tuple[type[BaseException], ...]:
    try:
        return CODEC_ERRORS + (zstd_module().ZstdError,)
    except DataFormatError:  # pragma: no cover - zstandard missing
        return CODEC_ERRORS


class _CheckedStream(io.RawIOBase):
    """A decompressed stream whose codec failures become one DecompressionError naming the byte reached."""

    def __init__(self, stream: BinaryIO, path: str | Path, codec: str, raw: BinaryIO | None, owns_raw: bool):
        self._stream, self._raw, self._owns_raw = stream, raw, owns_raw
        self.path, self.codec, self.position = path, codec, 0
        self._errors = codec_errors()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            # read1: what the codec has decompressed so far, so that the bytes before a damage are read
            count = self._stream.readinto1(buffer) if hasattr(self._stream, "readinto1") else self._stream.readinto(buffer)
        except self._errors as error:
            if isinstance(error, OSError) and error.errno is not None:
                raise  # an operating-system error (EIO, ...), not the data's
            raise self.error(error) from None
        self.position += count
        return count

    def error(self, cause: BaseException | str) -> DecompressionError:
        compressed = size = None
        if self._raw is not None and not self._raw.closed:
            compressed, size = self._raw.tell(), os.fstat(self._raw.fileno()).st_size
        return DecompressionError.at(self.path, self.codec, cause, self.position, compressed, size)

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            if self._owns_raw and self._raw is not None:
                self._raw.close()
        super().close()


def checked_stream(stream: BinaryIO, path: str | Path, codec: str, raw: BinaryIO | None = None,
                   owns_raw: bool = False, buffer: int = READ_BLOCK) -> BinaryIO:
    """`stream` (decompressed bytes of `path`) buffered, with its codec failures raised as
    DecompressionError; `raw`, when given, is the compressed file (its position is the compressed
    byte an error names; closed with the stream when `owns_raw`)."""
    return io.BufferedReader(_CheckedStream(stream, path, codec, raw, owns_raw), buffer_size=buffer)


class _ZstdFrames(io.RawIOBase):
    """zstd frames one after another, decompressed; a frame that ends early (a truncated file) is an
    EOFError, which zstandard's stream reader does not tell from the end of the file."""

    FEED = 1 << 18  # compressed bytes given to the decompressor at a time (bounds what one call makes)

    def __init__(self, raw: BinaryIO):
        self._raw, self._decompressor_of = raw, zstd_module().ZstdDecompressor()
        self._frame = None  # the decompressor of the frame being read, None between frames
        self._input = b""  # compressed bytes read and not yet given to a decompressor
        self._output, self._taken = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._taken >= len(self._output):
            if not self._input:
                self._input = self._raw.read(self.FEED)
                if not self._input:
                    if self._frame is not None:
                        raise EOFError("a zstd frame ends early")
                    return 0
            if self._frame is None:
                self._frame = self._decompressor_of.decompressobj()
            piece, self._input = self._input[:self.FEED], self._input[self.FEED:]
            self._output, self._taken = self._frame.decompress(piece), 0
            if self._frame.eof:  # what follows the frame starts the next one
                self._input = self._frame.unused_data + self._input
                self._frame = None
        count = min(len(buffer), len(self._output) - self._taken)
        buffer[:count] = memoryview(self._output)[self._taken:self._taken + count]
        self._taken += count
        return count


def _decompressor(codec: str, raw: BinaryIO) -> BinaryIO:
    if codec == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if codec == "xz":
        return lzma.LZMAFile(raw)
    if codec == "bz2":
        return bz2.BZ2File(raw)
    return _ZstdFrames(raw)


def open_decompressed(path: str | Path, codec: str, raw: BinaryIO | None = None,
                      buffer: int = READ_BLOCK) -> BinaryIO:
    """The decompressed bytes of `path` (a `codec` of COMPRESSIONS), buffered for readline(). `raw`,
    when given, is the open compressed file: it stays open, and its position tells how many
    compressed bytes were read. Data that is not the codec's is refused at once, and every failure to
    decompress, wherever it happens, is a DecompressionError (file, codec, bytes reached, remedy).
    An empty file reads as empty."""
    owns_raw = raw is None
    handle = open(path, "rb") if owns_raw else raw
    try:
        start = handle.tell()
        head = handle.read(MAGIC_BYTES)
        handle.seek(start)
        check_content(path, codec, head)
        if not head:
            if owns_raw:
                handle.close()
            return io.BytesIO()
        return checked_stream(_decompressor(codec, handle), path, codec, handle, owns_raw, buffer)
    except BaseException:
        if owns_raw:
            handle.close()
        raise
