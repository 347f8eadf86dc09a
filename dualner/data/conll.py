"""Readers for CoNLL / PAN-X files: `token<TAB>label` per line, a blank line between sentences.

What real files carry is read as meant, or refused naming the file and line:
- a UTF-8 byte-order mark at the file's start, Windows (CRLF) or old Mac (CR) line ends, trailing
  whitespace, lines of only whitespace or zero-width characters (sentence breaks), a missing final
  newline: read as meant;
- a token of only invisible characters (U+FEFF, U+200B-U+200F: real WikiANN files carry them) is a
  word, as XTREME's reader keeps it (the tokenizer gives it no subword: it gets the unknown token,
  dualner.data.encoding), so the words and labels of its sentence stay aligned;
- `token label` separated by spaces instead of a tab (one token per line, so unambiguous);
- `-DOCSTART-` lines (CoNLL-2003 document markers): a sentence break, never a word;
- tags in lower case (`b-per`) or in the IOBES / BILOU schemes (`S-`, `E-`, `U-`, `L-`): rewritten
  to BIO (`B-per`, ...) exactly, since a single or last word maps to B or I one to one;
- the language prefix XTREME writes (`en:Paris`) is dropped: the file's language prefix, or, for a
  file read without a language, a prefix every word of the sentence shares;
- refused: compressed data (gzip, xz, zstd, bz2: named as such), NUL bytes (a binary or UTF-16
  file), bytes that are not UTF-8 (with the byte offset and line), a labeled line without exactly two
  columns, an unknown tag, an empty token, and a file that is empty or holds no sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Iterator, Sequence

from dualner.data.formats import MAGIC_BYTES, READ_BLOCK, check_content, format_of
from dualner.errors import DataFormatError, MissingPathError  # DataFormatError re-exported
from dualner.labels import is_valid_tag

BOM = "\ufeff"
DOCSTART = "-DOCSTART-"
# Characters that show nothing (zero-width spaces and joiners, direction marks, word joiner, BOM): a
# line of only these is a blank line and a tag is read without them; a token of only these is a word.
INVISIBLE = "\u200b\u200c\u200d\u200e\u200f\u2060" + BOM
# XTREME writes PAN-X tokens as `en:Paris`; the prefix is a language code, never part of the word.
_LANGUAGE_PREFIX = re.compile(r"^([a-z]{2,3}):(?=.)")
# IOBES / BILOU prefixes -> BIO (a single-word entity starts one; a last word continues one)
_PREFIXES = {"B": "B", "I": "I", "S": "B", "U": "B", "E": "I", "L": "I"}


def normalize_tag(tag: str) -> str:
    """`O`, `B-X`, `I-X` as they are; lower-case prefixes and IOBES / BILOU prefixes rewritten to BIO.
    Anything else is returned unchanged (and refused by the caller)."""
    tag = tag.strip().strip(INVISIBLE).strip()
    if tag in ("O", "o"):
        return "O"
    if len(tag) > 2 and tag[1] == "-" and tag[0].upper() in _PREFIXES:
        return f"{_PREFIXES[tag[0].upper()]}-{tag[2:]}"
    return tag


def _strip_language_prefix(token: str, language: str) -> str:
    if not language:  # no language, no prefix (":)" stays a word)
        return token
    prefix = f"{language}:"
    return token[len(prefix):] if token.startswith(prefix) and len(token) > len(prefix) else token


def _shared_prefix(words: list[str]) -> str:
    """The `xx` of an `xx:` prefix every word has, else ""."""
    prefixes = {match.group(1) if (match := _LANGUAGE_PREFIX.match(word)) else None for word in words}
    return next(iter(prefixes)) if len(prefixes) == 1 and None not in prefixes else ""


class _PrefixDetector:
    """A file read without a language drops a language prefix only when its words carry one: decided
    on the first sentence of two words or more (all its words share the prefix), or on all sentences
    when none is that long, so `ftp://x` or `tel:0123` in an unprefixed file stay as they are."""

    PATIENCE = 100  # one-word sentences held back before deciding

    def __init__(self, language: str):
        self.prefix = language or None  # None: not decided yet
        self.pending: list[Sentence] = []

    def push(self, sentence: Sentence) -> list[Sentence]:
        if self.prefix is not None:
            return [self._strip(sentence)]
        self.pending.append(sentence)
        if len(sentence.words) >= 2:
            self.prefix = _shared_prefix(sentence.words)
        elif len(self.pending) >= self.PATIENCE:
            self.prefix = ""
        return self.flush() if self.prefix is not None else []

    def flush(self) -> list[Sentence]:
        if self.prefix is None:  # only one-word sentences: a prefix if they all share one (two or more)
            words = [w for s in self.pending for w in s.words]
            self.prefix = _shared_prefix(words) if len(words) >= 2 else ""
        pending, self.pending = self.pending, []
        return [self._strip(sentence) for sentence in pending]

    def _strip(self, sentence: Sentence) -> Sentence:
        prefix = self.prefix
        if prefix and any(map(str.startswith, sentence.words, repeat(f"{prefix}:"))):  # (C speed: every word)
            sentence.words = [_strip_language_prefix(word, prefix) for word in sentence.words]
        return sentence


@dataclass
class Sentence:
    words: list[str]
    tags: list[str] | None = None  # None for unlabeled text
    language: str = ""
    source: str = field(default="", repr=False)  # "file:line" of the first word, for error messages


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file (see `text_blocks`)."""
    for numbers, lines in text_blocks(path):
        yield from zip(numbers, lines)


def text_blocks(path: Path) -> Iterator[tuple[Sequence[int], list[str]]]:
    """(line numbers, lines) of a UTF-8 file, decoded a block of whole lines at a time (fast, and an
    error names the line and the file's byte); the byte-order mark at the file's start and CR / CRLF
    line ends are taken off (a mark anywhere else is text: real files have tokens of only that)."""
    offset = number = 0  # the file's byte and line before `block`
    with path.open("rb") as handle:
        head = handle.read(MAGIC_BYTES)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise DataFormatError(f"{path}: not UTF-8 text (a UTF-16 byte-order mark at byte 0); save it as UTF-8")
        check_content(path, "", head, compressed_ok=False)  # gzip data named .tsv: not "a NUL byte"
        pending = [head]  # bytes read and not yet cut into lines
        while True:
            read = handle.read(READ_BLOCK)
            if read and b"\n" not in read:  # no line ends here (a very long line): read on
                pending.append(read)
                continue
            data = b"".join(pending) + read
            if not data:
                return
            cut = data.rfind(b"\n") + 1 if read else len(data)
            block, pending = data[:cut], [data[cut:]]
            yield _lines_of_block(path, block, offset, number)
            offset, number = offset + len(block), number + block.count(b"\n")
            if not read:
                return


def _lines_of_block(path: Path, block: bytes, offset: int, number: int) -> tuple[Sequence[int], list[str]]:
    """(line numbers, lines) of `block`: whole lines of the file from byte `offset`, after `number` lines."""
    nul = block.find(b"\x00")
    if nul >= 0:
        line = number + block.count(b"\n", 0, nul) + 1
        raise DataFormatError(f"{path}:{line}: a NUL byte at byte {offset + nul} (a binary file, or UTF-16 "
                              f"text?); give UTF-8 text")
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError as error:
        line = number + block.count(b"\n", 0, error.start) + 1
        raise DataFormatError(f"{path}: not UTF-8 text ({error.reason} at byte {offset + error.start}, line "
                              f"{line}); save it as UTF-8") from None
    if offset == 0 and text.startswith(BOM):
        text = text[1:]
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    if "\r" not in text:
        return range(number + 1, number + 1 + len(lines)), lines
    # CRLF, and old Mac line ends as universal newlines read them (each piece keeps its line's number)
    numbers, pieces = [], []
    for index, line in enumerate(lines, number + 1):
        for piece in line.rstrip("\r").split("\r"):
            numbers.append(index)
            pieces.append(piece)
    return numbers, pieces


def iter_conll(path: str | Path, language: str = "", labeled: bool = True) -> Iterator[Sentence]:
    """Stream sentences from a CoNLL file; malformed lines raise `DataFormatError` naming the line.

    With `labeled=False` the label column is optional and ignored (unlabeled target text)."""
    path = Path(path)
    if path.is_dir():
        raise MissingPathError(f"{path} is a folder, not a data file; name the file (e.g. {path / 'train.tsv'})")
    if not path.is_file():
        raise MissingPathError(f"data file not found: {path}")
    if format_of(path) == "jsonl":  # else "found 4 column(s)" of its first line
        raise DataFormatError(f"{path}: a JSONL file; labeled data is CoNLL: `token<TAB>label` per line, a blank "
                              f"line between sentences (.tsv .conll .iob .bio)")
    words: list[str] = []
    tags: list[str] = []
    first_line = line_number = sentences = 0

    prefixes = _PrefixDetector(language)

    def sentence() -> list[Sentence]:
        return prefixes.push(Sentence(words, tags if labeled else None, language, f"{path}:{first_line}"))

    bio: dict[str, str] = {}  # a tag as written -> its BIO tag (each spelling checked once)
    for numbers, lines in text_blocks(path):
        for line_number, line in zip(numbers, lines):
            line = line.rstrip()
            # blank: only whitespace and invisible characters (a line starting with neither is not)
            blank = not line or ((line[0].isspace() or line[0] in INVISIBLE)
                                 and not line.strip().strip(INVISIBLE).strip())
            columns = line.split("\t") if "\t" in line else line.split()
            if blank or (DOCSTART in line and columns[0].strip() == DOCSTART):
                if words:
                    yield from sentence()
                    sentences += 1
                    words, tags = [], []
                continue
            if labeled and len(columns) != 2:
                raise DataFormatError(
                    f"{path}:{line_number}: expected `token<TAB>label`, found {len(columns)} column(s): {line[:80]!r}"
                    + ("; keep only the token and NER columns" if len(columns) > 2 else ""))
            word = columns[0].strip()
            if not word:
                raise DataFormatError(f"{path}:{line_number}: empty token")
            if labeled:
                tag = bio.get(columns[1])
                if tag is None:
                    tag = bio[columns[1]] = normalize_tag(columns[1])
                    if not is_valid_tag(tag):
                        raise DataFormatError(
                            f"{path}:{line_number}: unknown tag {columns[1].strip()!r} (expected O, B-TYPE or I-TYPE; "
                            f"IOBES and lower case are read too)")
                tags.append(tag)
            if not words:
                first_line = line_number
            words.append(word)
    if words:
        yield from sentence()
        sentences += 1
    yield from prefixes.flush()
    if line_number == 0:
        raise DataFormatError(f"{path}: file is empty")
    if sentences == 0:
        raise DataFormatError(f"{path}: holds no sentence (only blank or -DOCSTART- lines)")


def read_conll(path: str | Path, language: str = "", labeled: bool = True,
               max_sentences: int | None = None) -> list[Sentence]:
    sentences = []
    for sentence in iter_conll(path, language, labeled):
        if max_sentences is not None and len(sentences) >= max_sentences:
            break
        sentences.append(sentence)
    return sentences
