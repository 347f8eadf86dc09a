"""Readers of the sentence files other than labeled CoNLL (dualner.data.conll): JSONL
(`{"tokens": [...], "lang": "xx", "src_id": "...", "tags": [...]}`) and plain pre-tokenized text
(one sentence per line), whole files as prediction reads them; every error names the file and line.
Stage 2 reads its corpora record by record through dualner.data.corpus, with the same JSONL parser."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from dualner.data.conll import text_lines  # one line reader: BOM, CR/CRLF, NUL, bad bytes' offsets
from dualner.data.corpus import parse_jsonl_line, text_words


def iter_text(path: Path, language: str = "") -> Iterator[dict]:
    """A sentence per non-blank line; `-DOCSTART-` lines and tokens that show nothing (zero-width
    characters) are not words."""
    for line_number, line in text_lines(path):
        words = text_words(line)
        if words:
            yield {"words": words, "tags": [], "language": language, "src_id": "", "sample_id": f"{path}:{line_number}"}


def iter_jsonl(path: Path, language: str = "", keep_empty: bool = False) -> Iterator[dict]:
    """Records with a `tokens` list of non-empty strings (and, when given, one valid BIO tag per
    token); a record with no tokens is skipped unless `keep_empty` (prediction keeps input and
    output lines aligned). One parser for every JSONL reader (dualner.data.corpus)."""
    for line_number, line in text_lines(path):
        if not line.strip():
            continue
        parsed = parse_jsonl_line(line, f"{path}:{line_number}")
        if parsed["words"] or keep_empty:
            yield {**parsed, "language": parsed["language"] or language, "sample_id": f"{path}:{line_number}"}
