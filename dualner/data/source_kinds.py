"""The kinds of stage-2 source and how a config entry chooses one (as Mosaic streaming's format
readers: a dict from kind to class). A new kind is one Source class (dualner.data.source) and one
line of SOURCE_KINDS, with what names it in `kind_of`."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

from dualner.data.corpus import CorpusFile
from dualner.data.file_source import CompressedFileSource, RawFileSource
from dualner.data.hub_source import HUB_PREFIX, HubSource
from dualner.data.formats import corpus_format
from dualner.data.prepared import is_prepared, unfinished_preparation
from dualner.data.prepared_source import PreparedSource
from dualner.data.source import Source
from dualner.data.stream_spec import KIND_SOURCE
from dualner.errors import DataFormatError, MissingPathError

SOURCE_KINDS: dict[str, type[Source]] = {
    RawFileSource.kind: RawFileSource,
    CompressedFileSource.kind: CompressedFileSource,
    PreparedSource.kind: PreparedSource,
    HubSource.kind: HubSource,
}


def kind_of(path: str) -> str:
    """The kind of source a config entry (one of expand_files's) names."""
    if path.startswith(HUB_PREFIX):
        return HubSource.kind
    if is_prepared(path):
        return PreparedSource.kind
    found = corpus_format(path)  # an unknown ending: refused by describe_file, naming the key
    return CompressedFileSource.kind if found is not None and found[1] else RawFileSource.kind


def open_source(path: str, key: str) -> Source:
    """The source `path` names, opened (a file described, a prepared corpus's manifest read and checked)."""
    return SOURCE_KINDS[kind_of(path)].open(path, key)


def source_of_file(file: CorpusFile) -> Source:
    """A file described already (dualner.data.corpus.describe_file) as a source."""
    return SOURCE_KINDS[CompressedFileSource.kind if file.compression else RawFileSource.kind](file)


def open_sources(files: Sequence[str], key: str) -> list[Source]:
    return [open_source(path, key) for path in files]


def expand_files(pattern: str, key: str) -> list[str]:
    """A path or glob -> sorted files; an error naming the config key when nothing matches.

    `hf:NAME[:CONFIG]@SPLIT` names a `datasets` dataset (a hub name, or a local folder) with a
    `tokens` column, streamed rather than downloaded whole. A folder holding a prepared corpus
    (its manifest.json) is one entry."""
    if kind_of(pattern) in (HubSource.kind, PreparedSource.kind):
        return [pattern]
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


def check_corpus(sources: Sequence[Source], language: str, kind: str, key: str) -> None:
    """Every source of a stream checked before anything is written, as far as O(1) of it shows
    (Source.check_readable: a raw file's first record, a compressed one's end)."""
    for source in sources:
        source.check_readable(language, kind == KIND_SOURCE, key)
