"""A prepared corpus: unlabeled stage-2 text tokenized once into memory-mapped shards (Megatron-LM's
indexed datasets: ids + index), read by stage 2 with no tokenization and no start-up scan. This
module reads one; `prepare` (dualner.data.prepare, its shards: dualner.data.prepare_shards) writes it.

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
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from dualner.errors import ConfigError, DataFormatError

MANIFEST = "manifest.json"
BLOCK = 1 << 16  # sentences shuffled together within a pass (and the largest piece a reader gets)
FORMAT_NAME = "dualner-prepared"
VERSION = 2
ENDS_BYTES = 1 << 16  # bytes at each end of a shard file checked when it is first read
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


def ends_digest(head: bytes, tail: bytes, size: int) -> str:
    return hashlib.sha256(head + tail + str(size).encode()).hexdigest()[:16]


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
                if not ends_match(path, shard.files[part]):
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


def ends_match(path: Path, record: dict) -> bool:
    """The file has the recorded size, and its first and last 64 KiB the recorded checksum."""
    try:
        if path.stat().st_size != record["bytes"]:
            return False
        with open(path, "rb") as handle:
            head = handle.read(ENDS_BYTES)
            handle.seek(max(0, record["bytes"] - ENDS_BYTES))
            tail = handle.read(ENDS_BYTES)
    except OSError:
        return False
    return ends_digest(head, tail, record["bytes"]) == record["ends"]


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
