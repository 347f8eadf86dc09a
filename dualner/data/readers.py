"""Readers of the sentence files other than labeled CoNLL (dualner.data.conll): JSONL
(`{"tokens": [...], "lang": "xx", "src_id": "...", "tags": [...]}`) and plain pre-tokenized text
(one sentence per line), whole files as prediction reads them; every error names the file and line.
Stage 2 reads its corpora record by record through dualner.data.corpus, with the same JSONL parser."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from dualner.data.corpus import parse_jsonl_line
from dualner.errors import DataFormatError

JSONL_SUFFIXES = {".jsonl", ".json"}
TEXT_SUFFIXES = {".txt", ".text"}


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with path.open(encoding="utf-8-sig") as handle:  # a leading byte-order mark is not text
            yield from enumerate(handle, start=1)
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def iter_text(path: Path, language: str = "") -> Iterator[dict]:
    for line_number, line in _lines(path):
        words = line.split()
        if words:
            yield {"words": words, "tags": [], "language": language, "src_id": "", "sample_id": f"{path}:{line_number}"}


def iter_jsonl(path: Path, language: str = "", keep_empty: bool = False) -> Iterator[dict]:
    """Records with a `tokens` list of non-empty strings (and, when given, one valid BIO tag per
    token); a record with no tokens is skipped unless `keep_empty` (prediction keeps input and
    output lines aligned). One parser for every JSONL reader (dualner.data.corpus)."""
    for line_number, line in _lines(path):
        if not line.strip():
            continue
        parsed = parse_jsonl_line(line, f"{path}:{line_number}")
        if parsed["words"] or keep_empty:
            yield {**parsed, "language": parsed["language"] or language, "sample_id": f"{path}:{line_number}"}


def count_sentences(path: Path) -> int:
    """Sentences in a corpus file without parsing them: blank-line-separated blocks of a CoNLL file,
    non-empty lines of text and JSONL (for stream weights by corpus size)."""
    conll = path.suffix.lower() in {".tsv", ".conll", ".iob", ".bio"}
    count, inside = 0, False
    with path.open("rb") as handle:
        for line in handle:
            blank = not line.strip()
            if conll:
                if not blank and not inside:
                    count += 1
                inside = not blank
            elif not blank:
                count += 1
    return count
