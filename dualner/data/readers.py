"""Readers of the sentence files other than labeled CoNLL (dualner.data.conll): JSONL
(`{"tokens": [...], "lang": "xx", "src_id": "...", "tags": [...]}`) and plain pre-tokenized text
(one sentence per line). The stage-2 streams and prediction read them through here, with the same
checks; every error names the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from dualner.errors import DataFormatError
from dualner.labels import is_valid_tag

JSONL_SUFFIXES = {".jsonl", ".json"}
TEXT_SUFFIXES = {".txt", ".text"}


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with path.open(encoding="utf-8") as handle:
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
    output lines aligned)."""
    for line_number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            words = record["tokens"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DataFormatError(f"{path}:{line_number}: expected a JSON object with a 'tokens' list ({error})") from None
        if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
            raise DataFormatError(f"{path}:{line_number}: 'tokens' must be a list of non-empty strings")
        tags = record.get("tags") or []
        if tags and (len(tags) != len(words) or not all(map(is_valid_tag, tags))):
            raise DataFormatError(f"{path}:{line_number}: 'tags' must be one valid BIO tag per token")
        if words or keep_empty:
            yield {"words": words, "tags": tags, "language": record.get("lang", language),
                   "src_id": str(record.get("src_id", "")), "sample_id": f"{path}:{line_number}"}


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
