"""A prepared corpus: unlabeled stage-2 text tokenized once into memory-mapped shards (Megatron-LM's
indexed datasets: ids + index), read by stage 2 with no tokenization and no start-up scan.

    python -m dualner prepare --tokenizer runs/stage1 --max-length 128 --language de \
        --output prepared/de corpus/de/*.txt.xz [--workers 16] [--shard-mb 64]

Layout of the output folder (built in `<output>.partial`, renamed to `<output>` when complete):
    prepare.json              the inputs and settings it was made of (a rerun continues only the same)
    manifest.json             tokenizer fingerprint, max_length, language, inputs (size, mtime),
                              the largest token id, shards with their sentence counts and each file's
                              size and checksums; written last: its presence means complete
    NNNN-MMMMMM.tokens.npy    int32 subword ids of every window, back to back
    NNNN-MMMMMM.word_index.npy int16 word index at each first subword, -1 elsewhere (as encoded)
    NNNN-MMMMMM.windows.npy   int64 (windows, 3): first token, end token, word offset
    NNNN-MMMMMM.sentences.npy int64 (sentences, 5): first window, windows, words, byte of the record
                              in its input (decompressed), src_id (-1: none)
    NNNN-MMMMMM.done.json     the shard's counts; a shard with it (and intact files) is not redone
                              when prepare is run again after an interruption
    NNNN.pieces.json          the number of shards of input NNNN where it is read whole (compressed,
                              not in blocks), written when it has been cut

A shard is one piece of one input: a byte range of an uncompressed file or of a compressed one made
of blocks (each tokenizing process reads its own, entering the block that holds its start), or the
next ~shard-mb of another compressed file (decompressed once, sequentially, by the main process and
handed out while the workers tokenize). Under torchrun or srun (RANK, WORLD_SIZE) every rank takes
a share of these units (the largest first, each to the rank with the least work: the same choice on
every rank) and the rank that finishes last writes the manifest; a shard depends only on its piece,
so the output is byte-identical for any number of ranks and workers. Windows are made by
dualner.data.encoding.WindowTokenizer, so stage 2 gets exactly the windows the raw path would make of
the same sentences.

Checks. Opening a prepared corpus compares every shard file's size with the manifest (a truncated or
deleted shard is named at start-up, with the remedy); a shard's first and last 64 KiB are compared
with their checksum when it is first read, and `prepare --verify FOLDER` compares whole files. A
run refuses a corpus prepared for another language, or whose token ids pass its model's vocabulary,
and warns when an input changed since it was prepared.
"""

from __future__ import annotations

import bisect
import gc
import hashlib
import heapq
import io
import itertools
import json
import multiprocessing
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from dualner.run_layout import RunLayout
from dualner.data.corpus import (BadRecord, CorpusFile, RawRecord, RecordReader, check_complete, describe_file,
                                 line_numbers, parse_record)
from dualner.data.formats import DecompressionError
from dualner.data.sources import refuse_shared_files
from dualner.errors import ConfigError, DataFormatError, MissingPathError

MANIFEST = "manifest.json"
BLOCK = 1 << 16  # sentences shuffled together within a pass (and the largest piece a reader gets)
FORMAT_NAME = "dualner-prepared"
VERSION = 2
_ENDS = 1 << 16  # bytes at each end of a shard file checked when it is first read
# a corpus whose shard files hold at most this many bytes is checksummed whole when it is opened
# (about a tenth of a second); a larger one by size at start-up and by its ends when a shard is first
# read (its whole checksum: `prepare --verify`), as a TB corpus cannot be read at every start
WHOLE_CHECK_BYTES = 64 << 20
PARTS = ("tokens", "word_index", "windows", "sentences")


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def unfinished_preparation(folder: str | os.PathLike) -> str | None:
    """What makes `folder` (no manifest.json) look like an unfinished or damaged prepare output, and
    the remedy; None when nothing of a preparation is in it."""
    folder = Path(folder)
    partial = folder.with_name(f"{folder.name}.partial")
    found = [f"no {MANIFEST}, which prepare writes last, when the corpus is complete"]
    if (folder / "prepare.json").is_file():
        found.append("prepare.json is there")
    shards = len(list(folder.glob("*.done.json")))
    arrays = len(list(folder.glob("*.npy")))
    if shards or arrays:
        found.append(f"{shards} finished shard(s) ({arrays} .npy file(s))")
    if (partial / "prepare.json").is_file():
        found.append(f"{partial} holds an unfinished preparation")
    if folder.name.endswith(".partial") and (folder / "prepare.json").is_file():
        output = folder.with_name(folder.name[:-len(".partial")])
        return (f"{folder} is where `prepare` builds {output} ({'; '.join(found)}): run prepare again with the same "
                f"inputs and --output {output} to finish it, then name {output}")
    if len(found) == 1:
        return None
    return (f"{folder} looks like an unfinished or damaged `prepare` output ({'; '.join(found)}): run prepare again with the same inputs and --output {folder} "
            f"(it keeps the finished shards and writes the manifest), then `prepare --verify {folder}` checks it")


def _ends_digest(head: bytes, tail: bytes, size: int) -> str:
    return hashlib.sha256(head + tail + str(size).encode()).hexdigest()[:16]


def _file_record(data: bytes) -> dict:
    """What the manifest keeps of one shard file: its size, a checksum of the whole, one of its ends."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "ends": _ends_digest(data[:_ENDS], data[-_ENDS:], len(data))}


def tokenizer_fingerprint(tokenizer) -> str:
    """The same for two tokenizers that split text into the same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab, tokenizer.all_special_ids],
                                       ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


# -- reading ----------------------------------------------------------------------------------------------
@dataclass
class _Shard:
    name: str
    first: int  # global id of its first sentence
    sentences: int
    source: str  # the input file its records came from
    files: dict  # part -> its size and checksums (the manifest's)


class PreparedCorpus:
    """A prepared folder, memory-mapped on first use (opening reads only the manifest)."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = folder, manifest
        self.path = str(folder)
        self.max_length = manifest["max_length"]
        self.fingerprint = manifest["tokenizer"]["fingerprint"]
        self.shards: list[_Shard] = []
        first = 0
        for shard in manifest["shards"]:
            self.shards.append(_Shard(shard["name"], first, shard["sentences"],
                                      manifest["inputs"][shard["input"]]["path"], shard["files"]))
            first += shard["sentences"]
        self.sentences = first
        self._starts = [shard.first for shard in self.shards]
        self._arrays: dict[str, dict[str, np.ndarray]] = {}
        self._orders: dict[tuple, np.ndarray] = {}

    @staticmethod
    def open(path: str | os.PathLike, key: str = "", whole_check: bool = True) -> "PreparedCorpus":
        """`whole_check`: checksum a small corpus's files whole (WHOLE_CHECK_BYTES); `prepare --verify`
        checks every file itself, to list all the damaged ones."""
        folder = Path(path)
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataFormatError(f"{key}: {folder / MANIFEST}: unreadable ({error}); run prepare again with the "
                                  f"same inputs and --output {folder} (it keeps the intact shards), or restore "
                                  f"the folder") from None
        fields = manifest if isinstance(manifest, dict) else {}
        if fields.get("format") != FORMAT_NAME or fields.get("version") != VERSION:
            raise DataFormatError(f"{key}: {folder}: not a prepared corpus of this DualNER version "
                                  f"(format {fields.get('format')!r}, version {fields.get('version')!r}); "
                                  f"prepare it again")
        try:
            if not manifest["sentences"]:
                raise DataFormatError(f"{key}: {folder}: the prepared corpus holds no sentence (its inputs were "
                                      f"empty); prepare it again from the corpus files")
            for shard in manifest["shards"]:
                for part, record in shard["files"].items():
                    path = folder / f"{shard['name']}.{part}.npy"
                    size = path.stat().st_size if path.is_file() else None
                    if size != record["bytes"]:
                        found = "missing" if size is None else f"{size} bytes, the manifest says {record['bytes']}"
                        raise DataFormatError(f"{key}: {path}: damaged prepared shard ({found}); run prepare again "
                                              f"with the same inputs and --output (it redoes damaged shards), or "
                                              f"restore the folder")
            records = [(folder / f"{shard['name']}.{part}.npy", record)
                       for shard in manifest["shards"] for part, record in shard["files"].items()]
            if whole_check and sum(record["bytes"] for _, record in records) <= WHOLE_CHECK_BYTES:
                for path, record in records:
                    if _sha256(path) != record["sha256"]:
                        raise DataFormatError(f"{key}: {path}: damaged prepared shard (its checksum differs from "
                                              f"the manifest's); run prepare again with the same inputs and "
                                              f"--output (it redoes damaged shards), or restore the folder")
            return PreparedCorpus(folder, manifest)
        except (KeyError, TypeError, AttributeError, IndexError) as error:  # edited by hand, or damaged in place
            raise DataFormatError(f"{key}: {folder / MANIFEST}: damaged manifest ({type(error).__name__}: {error}); "
                                  f"run prepare again with the same inputs and --output {folder} (it keeps the "
                                  f"intact shards), or restore the folder") from None

    def identity(self) -> list:
        return [self.path, self.sentences, self.fingerprint]

    def check_use(self, language: str, embeddings: int | None, key: str, log) -> None:
        """Used as `language` by a model with `embeddings` token embeddings (None: unknown)."""
        prepared_as = self.manifest["language"]
        if prepared_as and prepared_as != language:
            raise ConfigError(f"{key}: {self.path} was prepared as language {prepared_as!r} (--language "
                              f"{prepared_as}) and is used here as {language!r}: name it under "
                              f"{key.rsplit('.', 1)[0]}.{prepared_as}, or prepare the {language!r} corpus")
        if embeddings is not None and self.manifest["max_token_id"] >= embeddings:
            raise ConfigError(f"{key}: {self.path} holds token id {self.manifest['max_token_id']}, beyond this "
                              f"run's model ({embeddings} token embeddings): it was prepared with another "
                              f"tokenizer; prepare it again with --tokenizer naming the stage-1 run")
        for record in self.manifest["inputs"]:
            path = Path(record["path"])
            changed = path.is_file() and (path.stat().st_size, path.stat().st_mtime_ns) != (record["size"],
                                                                                             record["mtime_ns"])
            if changed:
                log.warning("%s: %s changed (size or modification time) since %s was prepared from it: stage 2 "
                            "reads the prepared text; run prepare again to train on the new one", key, path, self.path)

    def check_tokenizer(self, fingerprint: str, max_length: int, key: str) -> None:
        """`fingerprint`: tokenizer_fingerprint of this run's tokenizer."""
        if self.max_length != max_length:
            raise ConfigError(f"{key}: {self.path} was prepared with max_length {self.max_length}; this run has "
                              f"data.max_length={max_length}: prepare it again with --max-length {max_length}")
        if self.fingerprint != fingerprint:
            raise ConfigError(f"{key}: {self.path} was prepared with another tokenizer "
                              f"({self.manifest['tokenizer'].get('name')}) than this run's model: prepare it again "
                              f"with --tokenizer naming the stage-1 run")

    def _shard_arrays(self, shard: _Shard) -> dict[str, np.ndarray]:
        arrays = self._arrays.get(shard.name)
        if arrays is None:
            # plain ndarray views of the maps: slicing a np.memmap costs a Python-level finalizer
            for part in PARTS:
                path = self.folder / f"{shard.name}.{part}.npy"
                if not _ends_match(path, shard.files[part]):
                    raise DataFormatError(f"{path}: damaged prepared shard (its checksum differs from the "
                                          f"manifest's); run prepare again with the same inputs and --output "
                                          f"(it redoes damaged shards), or restore the folder")
            arrays = {part: np.load(self.folder / f"{shard.name}.{part}.npy", mmap_mode="r").view(np.ndarray)
                      for part in PARTS}
            self._arrays[shard.name] = arrays
        return arrays

    def _permutation(self, seed_key: int, block: int, pass_: int) -> np.ndarray:
        """A block's order in a pass (the last few kept: a reader's ranges share blocks)."""
        key = (seed_key, block, pass_)
        if key not in self._orders:
            size = min(BLOCK, self.sentences - block * BLOCK)
            if len(self._orders) >= 4:
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = np.random.default_rng([seed_key, block, pass_]).permutation(size)
        return self._orders[key]

    def windows_of(self, sentence: int) -> list[dict]:
        """The stored windows of a sentence (global id), as WindowTokenizer.encode_batch rows."""
        shard = self.shards[bisect.bisect_right(self._starts, sentence) - 1]
        arrays = self._shard_arrays(shard)
        first_window, count, words, byte, src_id = arrays["sentences"][sentence - shard.first].tolist()
        rows = arrays["windows"][first_window:first_window + count].tolist()
        tokens, word_index = arrays["tokens"], arrays["word_index"]
        sample_id = f"{shard.source}@{byte}"
        return [{"input_ids": tokens[start:end].tolist(), "word_index": word_index[start:end].tolist(),
                 "word_offset": offset, "num_words": words, "tag_ids": [], "start_ids": [], "end_ids": [],
                 "language": "", "src_id": "" if src_id < 0 else str(src_id), "sample_id": sample_id}
                for start, end, offset in rows]

    def read(self, start: int, end: int, pass_: int, cursor: int, seed_key: int) -> Iterator[tuple[int, int, list[dict]]]:
        """The sentences at positions [start, end) of the pass's order, from `cursor` (-1: start). The
        order permutes each block of BLOCK sentence ids anew for every pass; a position p is
        sentence block + permutation(block, pass)[p - block], so ranges of positions split and
        resume like byte ranges."""
        position = start if cursor < 0 else cursor
        permutation, block = None, -1
        while position < end:
            if position // BLOCK != block:
                block = position // BLOCK
                permutation = self._permutation(seed_key, block, pass_)
            yield position, position + 1, self.windows_of(block * BLOCK + int(permutation[position - block * BLOCK]))
            position += 1


def _ends_match(path: Path, record: dict) -> bool:
    """The file has the recorded size, and its first and last 64 KiB the recorded checksum."""
    try:
        if path.stat().st_size != record["bytes"]:
            return False
        with open(path, "rb") as handle:
            head = handle.read(_ENDS)
            handle.seek(max(0, record["bytes"] - _ENDS))
            tail = handle.read(_ENDS)
    except OSError:
        return False
    return _ends_digest(head, tail, record["bytes"]) == record["ends"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(folder: str | os.PathLike) -> list[str]:
    """Every shard file of a prepared corpus against its size and whole checksum: the damaged ones."""
    corpus = PreparedCorpus.open(folder, "prepare --verify", whole_check=False)
    damaged = []
    for shard in corpus.manifest["shards"]:
        for part, record in shard["files"].items():
            path = corpus.folder / f"{shard['name']}.{part}.npy"
            if _sha256(path) != record["sha256"]:
                damaged.append(str(path))
    return damaged


# -- writing -------------------------------------------------------------------------------------------------
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


def _init_worker(tokenizer_path: str, max_length: int, language: str, output: str) -> None:
    from transformers import AutoTokenizer
    _use_tokenizer(AutoTokenizer.from_pretrained(tokenizer_path), max_length, language, output)


def _use_tokenizer(tokenizer, max_length: int, language: str, output: str) -> None:
    from dualner.data.encoding import WindowTokenizer
    from dualner.labels import LabelSet
    _worker_state.update(encoder=WindowTokenizer(tokenizer, LabelSet(()), max_length), language=language,
                         output=Path(output))


def _records_of(file: CorpusFile, piece: Piece, lines: list | None) -> Iterator[RawRecord]:
    if lines is None:
        yield from RecordReader(file, piece.start, piece.end)
    else:
        yield from lines


def _write_shard(task: tuple) -> dict:
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
        files[part] = _file_record(buffer.getvalue())
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


def _done(folder: Path, name: str) -> dict | None:
    """A shard's counts if it is finished and its files are intact."""
    counts = _read_record(folder / f"{name}.done.json", "files")
    if counts is None:
        return None
    try:
        intact = all(_ends_match(folder / f"{name}.{part}.npy", record) for part, record in counts["files"].items())
    except (AttributeError, KeyError, TypeError):
        return None
    return counts if intact else None


def _pieces(files: list[CorpusFile], units: list, shard_bytes: int, folder: Path
            ) -> Iterator[tuple[CorpusFile, Piece, list | None]]:
    """Every shard input of `units` in order; a compressed file read whole is decompressed here, once
    (while the workers tokenize what was handed out), unless all its shards are done."""
    for _, index, piece in units:
        file = files[index]
        if piece is not None:
            yield file, piece, None
            continue
        done = [Piece(index, number) for number in range(_pieces_of(folder, index) or 0)]
        if done and all(_done(folder, piece.name) is not None for piece in done):
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
        _write_atomically(_count_file(folder, index), json.dumps({"pieces": number}))


def _every_shard(files: list[CorpusFile], shard_bytes: int, folder: Path) -> list[dict] | None:
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


def _write_atomically(path: Path, text: str) -> None:
    """Several ranks may write the same file: each replaces it whole (a reader never sees half)."""
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def default_workers() -> int:
    """The cores this rank may use: Slurm's SLURM_CPUS_PER_TASK, else the cores this process may run
    on shared among the ranks of its node (torchrun's LOCAL_WORLD_SIZE)."""
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    return max(1, len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def check_window_fits(max_length: int, tokenizer_path: str) -> None:
    """--max-length must fit the encoder the tokenizer belongs to (where its folder holds a model's
    config): stage 2 would refuse the corpus, after all the work."""
    if not (Path(tokenizer_path) / "config.json").is_file():
        return
    from transformers import AutoConfig

    from dualner.limits import window_limit
    limit = window_limit(AutoConfig.from_pretrained(tokenizer_path))
    if limit is not None and max_length > limit:
        raise ConfigError(f"prepare: --max-length {max_length} is more than the encoder of {tokenizer_path} can "
                          f"hold (windows of at most {limit} tokens); use --max-length {limit} or less, as "
                          f"data.max_length of the stage-2 run")


def prepare(inputs: list[str], output: str, tokenizer_path: str, max_length: int, language: str = "",
            workers: int | None = None, shard_bytes: int = 64 << 20, max_bad_records: int = 0,
            log=print, rank: int = 0, world_size: int = 1) -> dict | None:
    """Tokenize `inputs` into a prepared corpus in `output`: this rank's part of the work (of
    `world_size` ranks started on the same inputs and output). Everything is checked before a folder
    is made; the corpus is built in `<output>.partial` and renamed to `output` by the rank that
    finishes last, so `output` never holds half a corpus. Returns the manifest there, None on the
    other ranks. A failed run keeps the shards it finished (none, on one rank: the folder goes), and
    prepare run again continues from them."""
    if not inputs:
        raise ConfigError("prepare: name at least one input file")
    refuse_shared_files({"prepare": inputs})  # a file named twice (or a link to it) would be prepared twice
    files = []
    for path in inputs:
        if Path(path).is_dir():
            raise MissingPathError(f"prepare: {path} is a folder; name its corpus files (e.g. {path}/*.txt)")
        if not Path(path).is_file():
            raise MissingPathError(f"prepare: input not found: {path}")
        files.append(describe_file(path, "prepare"))
        try:
            check_complete(files[-1])
        except DecompressionError as error:
            raise DecompressionError(f"prepare: {error}") from None
        _check_holds_a_sentence(files[-1], language, max_bad_records)
    tokenizer_path, tokenizer = load_tokenizer(tokenizer_path)
    check_window_fits(max_length, tokenizer_path)
    inputs_record = [{"path": str(Path(f.path).resolve()), "size": os.stat(f.path).st_size, "mtime_ns": f.mtime_ns}
                     for f in files]
    plan = {"version": VERSION, "inputs": inputs_record, "max_length": max_length, "language": language, "shard_bytes": shard_bytes,
            "tokenizer": tokenizer_fingerprint(tokenizer)}
    folder = Path(output)
    work = folder.with_name(f"{folder.name}.partial")
    finished = _claim_output(folder, work, plan, log)
    if finished is not None:
        return finished
    try:
        manifest = _prepare_in(work, files, plan, tokenizer, tokenizer_path, max_length, language, workers,
                               shard_bytes, max_bad_records, log, rank, world_size)
    except BaseException:
        if world_size == 1 and not any(work.glob("*.done.json")):  # nothing to continue from
            shutil.rmtree(work, ignore_errors=True)
        raise
    if manifest is None:  # other ranks are still at work: the last one renames the folder
        return None
    try:
        os.replace(work, folder)
    except FileNotFoundError:  # two ranks finished together: the other one renamed it
        if not is_prepared(folder):
            raise
    return manifest


def _check_holds_a_sentence(file: CorpusFile, language: str, max_bad_records: int) -> None:
    """An input without a sentence (empty, blank, only bad records) refused before anything is made;
    reads up to its first sentence."""
    bad = []
    for record in RecordReader(file, 0, file.end):
        try:
            if parse_record(record, file, language, labeled=False) is not None:
                return
        except BadRecord as error:
            bad.append(error)
            if len(bad) > max_bad_records:
                raise DataFormatError(f"prepare: {error}") from None
    raise DataFormatError(f"prepare: {file.path}: " + ("file is empty" if file.size == 0 else
                                                       "holds no sentence" + (" but bad records" if bad else "")))


def load_tokenizer(name: str):
    """(path, tokenizer) of `prepare --tokenizer`: a run folder (the tokenizer it trained with), an
    exported model, a built-in alias (`multilingual-e5-small`, built offline as model.encoder builds
    it) or a hub name; one line, at once, for a name that cannot be had (offline: no minute of retries)."""
    from transformers import AutoTokenizer

    from dualner.encoders import resolve_encoder
    run_model = RunLayout(name).model
    path = str(run_model) if run_model.is_dir() else resolve_encoder(name, "prepare --tokenizer")
    try:
        return path, AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise ConfigError(f"prepare --tokenizer {name}: no tokenizer can be loaded from {path} ({reason}); name a "
                          f"stage-1 run folder, an exported model or a tokenizer folder") from None


def _claim_output(folder: Path, work: Path, plan: dict, log) -> dict | None:
    """Decide what becomes of --output before anything is written: its manifest when it already
    holds this preparation (nothing to do), else None with `work` ready to write in. Nothing that
    is not a preparation of the same inputs and settings is replaced."""
    def plan_of(path: Path) -> dict | None:
        try:
            return json.loads((path / "prepare.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"prepare --output {folder}: is a file; name a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if plan_of(folder) != plan:
            raise ConfigError(f"prepare --output {folder}: holds something else (not a preparation of these inputs "
                              f"and settings); choose another --output or remove it")
        if is_prepared(folder):
            try:  # every shard file of its size, and its ends as checksummed (cheap: 128 KiB a file)
                manifest = PreparedCorpus.open(folder, "prepare --output").manifest
                damage = ", ".join(shard["name"] for shard in manifest["shards"] if _done(folder, shard["name"]) is None)
            except DataFormatError as error:
                damage = str(error)
            if not damage:
                log(f"prepare: {folder} already holds this preparation")
                return manifest
            log(f"prepare: {folder}: damaged ({damage}): redoing the damaged shards")
        if work.exists():
            raise ConfigError(f"prepare: {folder} and {work} both hold unfinished preparations; remove one")
        os.replace(folder, work)  # a damaged or unfinished preparation (an older DualNER wrote in place): continue it
    elif folder.is_dir():
        folder.rmdir()  # an empty folder made beforehand: the finished corpus takes its place
    if work.exists() and plan_of(work) != plan:
        if plan_of(work) is None and any(work.iterdir()):
            raise ConfigError(f"prepare: {work} (where --output {folder} is built) holds something else; remove it")
        log(f"prepare: {work} held a preparation of other inputs or settings: starting over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    _write_atomically(work / "prepare.json", json.dumps(plan, indent=1))  # ranks of one job write the same
    return None


def _prepare_in(folder: Path, files: list[CorpusFile], plan: dict, tokenizer, tokenizer_path: str, max_length: int,
                language: str, workers: int | None, shard_bytes: int, max_bad_records: int, log, rank: int,
                world_size: int) -> dict | None:
    """This rank's shards of `files` in `folder` (those done already are kept), then, once every
    rank's are done, the manifest (None while other ranks are still at work)."""
    inputs_record = plan["inputs"]
    (folder / MANIFEST).unlink(missing_ok=True)
    workers = workers or default_workers()
    context = multiprocessing.get_context("spawn")
    results, kept = [], []

    def todo():
        for file, piece, records in _pieces(files, rank_units(files, shard_bytes, rank, world_size), shard_bytes,
                                            folder):
            counts = _done(folder, piece.name)
            if counts is not None:
                kept.append(counts)
                continue
            yield file, piece, records

    args = (tokenizer_path, max_length, language, str(folder))
    if workers == 1:  # in this process, with the tokenizer it loaded (a load costs seconds of CPU)
        _use_tokenizer(tokenizer, max_length, language, str(folder))
        results += [_write_shard(task) for task in todo()]
    else:
        with context.Pool(workers, initializer=_init_worker, initargs=args) as pool:
            for counts in pool.imap_unordered(_write_shard, todo(), chunksize=1):
                results.append(counts)
                log(f"prepare: {counts['name']}: {counts['sentences']} sentences")
    if kept:
        log(f"prepare: continued the preparation in {folder}: {len(kept)} shard(s) finished by an earlier run "
            f"kept ({sum(len(counts['bad_records']) for counts in kept)} bad record(s) in them, checked against "
            f"--max-bad-records={max_bad_records} below), {len(results)} made now")
        results += kept
    if world_size > 1:  # the ranks' shards together, once the last one is done
        log(f"prepare: rank {rank} of {world_size}: its {len(results)} shard(s) are done")
        results = _every_shard(files, shard_bytes, folder)
        if results is None:
            log(f"prepare: rank {rank}: other ranks are still at work; the last to finish writes the manifest")
            return None
    results.sort(key=lambda counts: counts["name"])
    records = [record for counts in results for record in counts["bad_records"]]
    bad = _bad_record_messages(records, files)
    damage = [message for record, message in zip(records, bad) if record[4:5] == [True]]
    if damage:  # the codec's failure, not the garbage a corrupted stream may decompress to before it
        others = len(bad) - 1
        raise DecompressionError(f"prepare: {damage[0]}" + (
            f"; the {others} other bad record(s) may come from the same damage" if others else ""))
    if len(bad) > max_bad_records:
        raise DataFormatError(f"prepare: {len(bad)} bad record(s), more than --max-bad-records={max_bad_records}; "
                              f"the first: {bad[0]} (fix or remove it, or raise --max-bad-records; the shards "
                              f"done are kept in {folder}: run prepare again to finish)")
    for message in bad:
        log(f"prepare: skipped a bad record: {message}")
    if not any(counts["sentences"] for counts in results):
        raise DataFormatError(f"prepare: {', '.join(f.path for f in files)}: no sentence in the input(s); "
                              f"nothing prepared")
    manifest = {"format": FORMAT_NAME, "version": VERSION, "language": language, "max_length": max_length,
                "tokenizer": {"name": tokenizer.name_or_path, "fingerprint": plan["tokenizer"]},
                "inputs": inputs_record,
                "shards": [{key: counts[key] for key in ("name", "input", "sentences", "windows", "tokens", "files")}
                           for counts in results],
                "max_token_id": max(counts["max_token_id"] for counts in results),
                "sentences": sum(counts["sentences"] for counts in results),
                "bad_records": len(bad)}
    _write_atomically(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _bad_record_messages(bad: list[list], files: list[CorpusFile]) -> list[str]:
    """`file:line (byte N): reason` of each bad record; the lines a worker could not know (its piece
    began mid-file) counted here, in one read of each file concerned."""
    by_path = {file.path: file for file in files}
    unknown: dict[str, list[int]] = {}
    for path, byte, line, *_ in bad:
        if line is None:
            unknown.setdefault(path, []).append(byte)
    lines = {path: line_numbers(by_path[path], positions) for path, positions in unknown.items()}
    return [f"{path}:{line if line is not None else lines[path][byte]} (byte {byte}): {reason}"
            for path, byte, line, reason, *_ in bad]


def main(argv: list[str] | None = None, launch_ranks=None) -> None:
    """`launch_ranks()`: RANK and WORLD_SIZE as the launcher gave them (dualner.cli passes the backend's
    reader; data code knows no backend); without it, one rank."""
    import argparse
    parser = argparse.ArgumentParser(prog="dualner prepare", description=(
        "Tokenize unlabeled stage-2 corpora once into memory-mapped shards (stage2.target.LANG or "
        "stage2.translations.LANG can then name the output folder). Resumable: run it again after an "
        "interruption. Under torchrun or srun every rank takes its share of the pieces (RANK, WORLD_SIZE); "
        "the shards are the same for any number of ranks and workers."))
    from dualner.data.formats import accepted_endings
    parser.add_argument("inputs", nargs="*", help=f"corpus files ({accepted_endings(compressed=True)})")
    parser.add_argument("--verify", metavar="FOLDER", help="check every file of a prepared corpus against the "
                        "checksums in its manifest (reads it whole), and prepare nothing")
    parser.add_argument("--output", help="the prepared corpus folder")
    parser.add_argument("--tokenizer",
                        help="the stage-1 run folder (its model/), an exported model, or a tokenizer name")
    parser.add_argument("--max-length", type=int, help="data.max_length of the stage-2 run")
    parser.add_argument("--language", default="", help="the corpus's language code")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizing processes per rank (default: the cores, shared among the node's ranks)")
    parser.add_argument("--shard-mb", type=float, default=64, help="input megabytes per shard")
    parser.add_argument("--max-bad-records", type=int, default=0,
                        help="malformed or non-UTF-8 records to skip (each reported) before failing")
    args = parser.parse_args(argv)
    if args.verify:
        if not is_prepared(args.verify):
            unfinished = Path(args.verify).is_dir() and unfinished_preparation(args.verify)
            raise MissingPathError(f"prepare --verify: {unfinished or f'{args.verify} is not a prepared corpus (no {MANIFEST})'}")
        damaged = verify(args.verify)
        if damaged:
            raise DataFormatError(f"prepare --verify: {len(damaged)} damaged shard file(s), the first {damaged[0]}; "
                                  f"remove them and run prepare again with the same inputs and --output")
        print(f"{args.verify}: every shard file matches its checksum")
        return
    if not args.inputs or args.output is None or args.tokenizer is None or args.max_length is None:
        parser.error("name the input files, --output, --tokenizer and --max-length (or --verify FOLDER)")
    shard_bytes = int(args.shard_mb * (1 << 20))
    if not 3 <= args.max_length <= 32767 or shard_bytes < 1:
        raise ConfigError("prepare: --max-length must be in [3, 32767] and --shard-mb more than 0")
    if (args.workers is not None and args.workers < 1) or args.max_bad_records < 0:
        raise ConfigError("prepare: --workers must be >= 1 (default: the cores) and --max-bad-records >= 0")
    ranks = launch_ranks() if launch_ranks is not None else {"RANK": "0", "WORLD_SIZE": "1"}
    manifest = prepare(args.inputs, args.output, args.tokenizer, args.max_length, args.language, args.workers,
                       shard_bytes, args.max_bad_records, rank=int(ranks["RANK"]),
                       world_size=int(ranks["WORLD_SIZE"]))
    if manifest is not None:
        print(f"prepared {manifest['sentences']} sentences in {len(manifest['shards'])} shard(s) -> {args.output}")
