"""`prepare`'s work (dualner.data.prepare): the pieces of its inputs (byte ranges of splittable files,
runs of records of a compressed file read whole), shared among ranks, each tokenized into one shard
of a prepared corpus (dualner.data.prepared) by a worker process, and the records that let an
interrupted preparation continue (a shard's counts, a file's number of pieces)."""

from __future__ import annotations

import gc
import hashlib
import heapq
import io
import itertools
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from dualner.data.corpus import BadRecord, CorpusFile, RawRecord, RecordReader, parse_record
from dualner.data.prepared import ENDS_BYTES, ends_digest, ends_match


def file_record(data: bytes) -> dict:
    """What the manifest keeps of one shard file: its size, a checksum of the whole, one of its ends."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "ends": ends_digest(data[:ENDS_BYTES], data[-ENDS_BYTES:], len(data))}


# -- shards -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """One shard's input: a byte range of an uncompressed file, or records handed over in memory."""

    input: int
    number: int
    start: int = 0
    end: int = 0

    @property
    def name(self) -> str:
        return f"{self.input:04d}-{self.number:06d}"


_worker_state: dict = {}


def init_worker(tokenizer_path: str, max_length: int, language: str, output: str) -> None:
    from transformers import AutoTokenizer
    use_tokenizer(AutoTokenizer.from_pretrained(tokenizer_path), max_length, language, output)


def use_tokenizer(tokenizer, max_length: int, language: str, output: str) -> None:
    from dualner.data.encoding import WindowTokenizer
    from dualner.labels import LabelSet
    _worker_state.update(encoder=WindowTokenizer(tokenizer, LabelSet(()), max_length), language=language,
                         output=Path(output))


def _records_of(file: CorpusFile, piece: Piece, lines: list | None) -> Iterator[RawRecord]:
    if lines is None:
        yield from RecordReader(file, piece.start, piece.end)
    else:
        yield from lines


def write_shard(task: tuple) -> dict:
    """Tokenize one piece into one shard (in a worker process); returns its counts."""
    # A shard builds millions of small lists and no reference cycles: the cyclic collector would walk
    # them again and again (a third of the time, measured: bench/RESULTS.md "prepare at cluster scale").
    gc.disable()
    try:
        return _tokenize_shard(*task)
    finally:
        gc.enable()


def _tokenize_shard(file: CorpusFile, piece: Piece, records: list | None) -> dict:
    state = _worker_state
    encoder, output = state["encoder"], state["output"]
    sentences, bad = [], []
    for record in _records_of(file, piece, records):
        try:
            sentence = parse_record(record, file, state["language"], labeled=False)
        except BadRecord as error:  # [file, byte, line (None: not known yet), reason, the file's damage?]
            bad.append([error.path, error.byte, error.line, error.reason, bool(record.damage)])
            continue
        if sentence is not None:
            sentences.append((record.start, sentence))
    tokens, word_index, windows, table = [], [], [], []
    batch = 512
    for begin in range(0, len(sentences), batch):
        chunk = sentences[begin:begin + batch]
        encoded = encoder.encode_batch({"words": [s["words"] for _, s in chunk], "tags": [[] for _ in chunk],
                                        "_row": list(range(len(chunk)))})
        previous = -1
        for row in range(len(encoded["input_ids"])):
            member = encoded["_row"][row]
            if member != previous:
                byte, sentence = chunk[member]
                src_id = sentence["src_id"]
                if src_id and not src_id.lstrip("-").isdigit():
                    bad.append([file.path, byte, None, f"src_id {src_id!r} is not an integer (the index of a "
                                                       f"labeled source sentence)"])
                    src_id = ""
                table.append([len(windows), 0, encoded["num_words"][row], byte, int(src_id) if src_id else -1])
                previous = member
            table[-1][1] += 1
            start = windows[-1][1] if windows else 0
            ids = encoded["input_ids"][row]
            windows.append([start, start + len(ids), encoded["word_offset"][row]])
            tokens.append(ids)
            word_index.append(encoded["word_index"][row])
    name = piece.name
    total = windows[-1][1] if windows else 0
    flat_tokens = np.fromiter(itertools.chain.from_iterable(tokens), dtype=np.int32, count=total)
    flat_index = np.fromiter(itertools.chain.from_iterable(word_index), dtype=np.int16, count=total)
    files = {}
    for part, array in (("tokens", flat_tokens), ("word_index", flat_index),
                        ("windows", np.asarray(windows, dtype=np.int64).reshape(-1, 3)),
                        ("sentences", np.asarray(table, dtype=np.int64).reshape(-1, 5))):
        buffer = io.BytesIO()
        np.save(buffer, array)
        files[part] = file_record(buffer.getvalue())
        temporary = output / f".{name}.{part}.npy.tmp"
        temporary.write_bytes(buffer.getbuffer())
        os.replace(temporary, output / f"{name}.{part}.npy")
    counts = {"name": name, "input": piece.input, "sentences": len(table), "windows": len(windows),
              "tokens": int(flat_tokens.size), "max_token_id": int(flat_tokens.max()) if flat_tokens.size else -1,
              "files": files, "bad_records": bad}
    done = output / f".{name}.done.json.tmp"
    done.write_text(json.dumps(counts), encoding="utf-8")
    os.replace(done, output / f"{name}.done.json")
    return counts


_COMPRESSION_GUESS = 4  # decompressed bytes per compressed byte of text, for sharing out work only


def _units(files: list[CorpusFile], shard_bytes: int) -> list[tuple[int, int, Piece | None]]:
    """The work: (bytes, input, piece) for each byte range of a splittable file (plain, or compressed
    in blocks: entered at its block), (bytes, input, None) for a compressed file read whole."""
    units = []
    for index, file in enumerate(files):
        if not file.splittable:
            units.append((file.size * _COMPRESSION_GUESS, index, None))
            continue
        for number, start in enumerate(range(0, max(1, file.size), shard_bytes)):
            end = min(file.size, start + shard_bytes)
            units.append((end - start, index, Piece(index, number, start, end)))
    return units


def rank_units(files: list[CorpusFile], shard_bytes: int, rank: int, world_size: int) -> list:
    """This rank's units: the largest first, each to the rank with the least work so far (the same
    choice on every rank, from the files alone). Which rank tokenizes a piece does not change its shard."""
    load = [(0, r) for r in range(world_size)]
    mine = []
    for unit in sorted(_units(files, shard_bytes), key=lambda u: (-u[0], u[1], u[2].number if u[2] else 0)):
        work, owner = heapq.heappop(load)
        heapq.heappush(load, (work + unit[0], owner))
        if owner == rank:
            mine.append(unit)
    return sorted(mine, key=lambda u: (u[1], u[2].number if u[2] else 0))


def _count_file(folder: Path, index: int) -> Path:
    """Written once a compressed file read whole was cut into pieces: how many."""
    return folder / f"{index:04d}.pieces.json"


def _read_record(path: Path, key: str) -> dict | None:
    """A shard's counts or a file's number of pieces as written; None where absent or damaged (edited
    by hand, or half-copied: the work it records is done again)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return record if isinstance(record, dict) and key in record else None
    except (OSError, ValueError):
        return None


def _pieces_of(folder: Path, index: int) -> int | None:
    record = _read_record(_count_file(folder, index), "pieces")
    return record["pieces"] if record is not None and isinstance(record["pieces"], int) else None


def finished_shard(folder: Path, name: str) -> dict | None:
    """A shard's counts if it is finished and its files are intact."""
    counts = _read_record(folder / f"{name}.done.json", "files")
    if counts is None:
        return None
    try:
        intact = all(ends_match(folder / f"{name}.{part}.npy", record) for part, record in counts["files"].items())
    except (AttributeError, KeyError, TypeError):
        return None
    return counts if intact else None


def shard_inputs(files: list[CorpusFile], units: list, shard_bytes: int, folder: Path
            ) -> Iterator[tuple[CorpusFile, Piece, list | None]]:
    """Every shard input of `units` in order; a compressed file read whole is decompressed here, once
    (while the workers tokenize what was handed out), unless all its shards are done."""
    for _, index, piece in units:
        file = files[index]
        if piece is not None:
            yield file, piece, None
            continue
        done = [Piece(index, number) for number in range(_pieces_of(folder, index) or 0)]
        if done and all(finished_shard(folder, piece.name) is not None for piece in done):
            for piece in done:  # not read again: the caller takes each one's counts
                yield file, piece, []
            continue
        number, batch, size = 0, [], 0
        for record in RecordReader(file, 0, file.end):
            batch.append(record)
            size += record.end - record.start
            if size >= shard_bytes:
                yield file, Piece(index, number), batch
                number, batch, size = number + 1, [], 0
        if batch or number == 0:
            yield file, Piece(index, number), batch
            number += 1
        write_atomically(_count_file(folder, index), json.dumps({"pieces": number}))


def every_shard(files: list[CorpusFile], shard_bytes: int, folder: Path) -> list[dict] | None:
    """Every shard's counts, in order, once every rank has finished its part; None before."""
    names = []
    for index, file in enumerate(files):
        if file.splittable:
            names += [Piece(index, number).name for number in range(len(range(0, max(1, file.size), shard_bytes)))]
            continue
        pieces = _pieces_of(folder, index)
        if pieces is None:
            return None
        names += [Piece(index, number).name for number in range(pieces)]
    results = []
    for name in names:
        counts = _read_record(folder / f"{name}.done.json", "files")
        if counts is None:
            return None
        results.append(counts)
    return results


def write_atomically(path: Path, text: str) -> None:
    """Several ranks may write the same file: each replaces it whole (a reader never sees half)."""
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
