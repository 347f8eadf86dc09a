"""The file formats DualNER reads, told by the name's ending: one table for every reader (labeled
CoNLL, prediction input, stage-2 corpora) and for the errors that list what is accepted.

- a format: `conll` (`token<TAB>label`, blank-line separated; dualner.data.conll), `jsonl`
  (`{"tokens": [...]}` per line) or `text` (a pre-tokenized sentence per line);
- a compression (stage-2 corpora only, dualner.data.corpus): one more ending after the format's.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from pathlib import Path
from typing import BinaryIO, Callable

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
READ_BLOCK = 1 << 20  # bytes per read of a corpus file


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


def _open_zstd(source) -> BinaryIO:
    owned = not hasattr(source, "read")
    raw = open(source, "rb") if owned else source
    reader = zstd_module().ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=owned)
    return io.BufferedReader(reader, buffer_size=READ_BLOCK)


# codec -> opener of its decompressed bytes
CODECS: dict[str, Callable] = {"gzip": gzip.open, "xz": lzma.open, "bz2": bz2.open, "zstd": _open_zstd}


def open_compressed(codec: str, source: str | Path | BinaryIO) -> BinaryIO:
    """The decompressed bytes of `source`: a path (the stream owns the file) or a binary file object
    (it stays open, and its position tells how many compressed bytes were read)."""
    return CODECS[codec](source)
