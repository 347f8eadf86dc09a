"""Readers for CoNLL / PAN-X files: `token<TAB>label` per line, a blank line between sentences."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dualner.errors import DataFormatError, MissingPathError  # DataFormatError re-exported
from dualner.labels import is_valid_tag

# XTREME writes PAN-X tokens as `en:Paris`; the prefix is a language code, never part of the word.
_LANGUAGE_PREFIX = re.compile(r"^[a-z]{2,3}:(?=.)")


def _strip_language_prefix(token: str, language: str) -> str:
    if language:
        prefix = f"{language}:"
        return token[len(prefix):] if token.startswith(prefix) and len(token) > len(prefix) else token
    return _LANGUAGE_PREFIX.sub("", token)


@dataclass
class Sentence:
    words: list[str]
    tags: list[str] | None = None  # None for unlabeled text
    language: str = ""
    source: str = field(default="", repr=False)  # "file:line" of the first word, for error messages


def iter_conll(path: str | Path, language: str = "", labeled: bool = True) -> Iterator[Sentence]:
    """Stream sentences from a CoNLL file; malformed lines raise `DataFormatError` naming the line.

    With `labeled=False` the label column is optional and ignored (unlabeled target text)."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"data file not found: {path}")
    words: list[str] = []
    tags: list[str] = []
    first_line = 0
    try:
        with path.open(encoding="utf-8") as handle:
            line_number = 0
            for line_number, line in enumerate(handle, start=1):
                line = line.rstrip("\n").rstrip("\r")
                if not line.strip():
                    if words:
                        yield Sentence(words, tags if labeled else None, language, f"{path}:{first_line}")
                        words, tags = [], []
                    continue
                columns = line.split("\t")
                if labeled and len(columns) != 2:
                    raise DataFormatError(
                        f"{path}:{line_number}: expected `token<TAB>label`, found {len(columns)} "
                        f"column(s): {line[:80]!r}")
                word = _strip_language_prefix(columns[0], language)
                if not word:
                    raise DataFormatError(f"{path}:{line_number}: empty token")
                if labeled:
                    tag = columns[1].strip()
                    if not is_valid_tag(tag):
                        raise DataFormatError(
                            f"{path}:{line_number}: unknown tag {tag!r} (expected O, B-TYPE or I-TYPE)")
                    tags.append(tag)
                if not words:
                    first_line = line_number
                words.append(word)
            if words:
                yield Sentence(words, tags if labeled else None, language, f"{path}:{first_line}")
            if line_number == 0:
                raise DataFormatError(f"{path}: file is empty")
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error


def read_conll(path: str | Path, language: str = "", labeled: bool = True,
               max_sentences: int | None = None) -> list[Sentence]:
    sentences = []
    for sentence in iter_conll(path, language, labeled):
        if max_sentences is not None and len(sentences) >= max_sentences:
            break
        sentences.append(sentence)
    return sentences
