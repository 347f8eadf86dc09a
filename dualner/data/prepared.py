"""A prepared corpus: unlabeled stage-2 text tokenized once into memory-mapped shards (Megatron-LM's
indexed datasets: ids + index), read by stage 2 with no tokenization and no start-up scan.

    python -m dualner prepare --tokenizer runs/stage1 --max-length 128 --language de \
        --output prepared/de corpus/de/*.txt.xz [--workers 16] [--shard-mb 64]

Layout of the output folder (built in `<output>.partial`, renamed to `<output>` when complete):
    prepare.json              the inputs and settings it was made of (a rerun continues only the same)
    manifest.json             tokenizer fingerprint, max_length, inputs (size, mtime), shards and
                              their sentence counts; written last: its presence means complete
    NNNN-MMMMMM.tokens.npy    int32 subword ids of every window, back to back
    NNNN-MMMMMM.word_index.npy int16 word index at each first subword, -1 elsewhere (as encoded)
    NNNN-MMMMMM.windows.npy   int64 (windows, 3): first token, end token, word offset
    NNNN-MMMMMM.sentences.npy int64 (sentences, 5): first window, windows, words, byte of the record
                              in its input (decompressed), src_id (-1: none)
    NNNN-MMMMMM.done.json     the shard's counts; a shard with it is not redone when prepare is
                              run again after an interruption

A shard is one piece of one input: a byte range of an uncompressed file (each tokenizing process
reads its own), or the next ~shard-mb of a compressed one (decompressed once, sequentially, by the
main process and handed out). Windows are made by dualner.data.encoding.WindowTokenizer, so stage 2
gets exactly the windows the raw path would make of the same sentences.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from dualner.run_layout import RunLayout
from dualner.data.corpus import (BadRecord, CorpusFile, RawRecord, RecordReader, describe_file,
                                 line_numbers, parse_record)
from dualner.data.sources import refuse_shared_files
from dualner.errors import ConfigError, DataFormatError, MissingPathError

MANIFEST = "manifest.json"
BLOCK = 1 << 16  # sentences shuffled together within a pass (and the largest piece a reader gets)
FORMAT_NAME = "dualner-prepared"
VERSION = 1


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


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
                                      manifest["inputs"][shard["input"]]["path"]))
            first += shard["sentences"]
        self.sentences = first
        self._starts = [shard.first for shard in self.shards]
        self._arrays: dict[str, dict[str, np.ndarray]] = {}
        self._orders: dict[tuple, np.ndarray] = {}

    @staticmethod
    def open(path: str | os.PathLike, key: str = "") -> "PreparedCorpus":
        folder = Path(path)
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataFormatError(f"{key}: {folder / MANIFEST}: unreadable ({error})") from None
        if manifest.get("format") != FORMAT_NAME or manifest.get("version") != VERSION:
            raise DataFormatError(f"{key}: {folder}: not a prepared corpus of this DualNER version "
                                  f"(format {manifest.get('format')!r}, version {manifest.get('version')!r}); "
                                  f"prepare it again")
        return PreparedCorpus(folder, manifest)

    def identity(self) -> list:
        return [self.path, self.sentences, self.fingerprint]

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
            arrays = {part: np.load(self.folder / f"{shard.name}.{part}.npy", mmap_mode="r").view(np.ndarray)
                      for part in ("tokens", "word_index", "windows", "sentences")}
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

    def read(self, start: int, end: int, pass_: int, cursor: int, counter: list[int] | None,
             seed_key: int) -> Iterator[tuple[int, int, list[dict]]]:
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
            if counter is not None:
                counter[0] += 1
            yield position, position + 1, self.windows_of(block * BLOCK + int(permutation[position - block * BLOCK]))
            position += 1


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

    from dualner.data.encoding import WindowTokenizer
    from dualner.labels import LabelSet
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    _worker_state.update(encoder=WindowTokenizer(tokenizer, LabelSet(()), max_length), language=language,
                         output=Path(output))


def _records_of(file: CorpusFile, piece: Piece, lines: list | None) -> Iterator[RawRecord]:
    if lines is None:
        yield from RecordReader(file, piece.start, piece.end)
    else:
        yield from lines


def _write_shard(task: tuple) -> dict:
    """Tokenize one piece into one shard (in a worker process); returns its counts."""
    file, piece, records = task
    state = _worker_state
    encoder, output = state["encoder"], state["output"]
    sentences, bad = [], []
    for record in _records_of(file, piece, records):
        try:
            sentence = parse_record(record, file, state["language"], labeled=False)
        except BadRecord as error:  # [file, byte, line (None: not known yet), reason]
            bad.append([error.path, error.byte, error.line, error.reason])
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
    flat_tokens = np.fromiter((t for ids in tokens for t in ids), dtype=np.int32)
    flat_index = np.fromiter((w for row in word_index for w in row), dtype=np.int16)
    for part, array in (("tokens", flat_tokens), ("word_index", flat_index),
                        ("windows", np.asarray(windows, dtype=np.int64).reshape(-1, 3)),
                        ("sentences", np.asarray(table, dtype=np.int64).reshape(-1, 5))):
        temporary = output / f".{name}.{part}.npy.tmp"
        with open(temporary, "wb") as handle:
            np.save(handle, array)
        os.replace(temporary, output / f"{name}.{part}.npy")
    counts = {"name": name, "input": piece.input, "sentences": len(table), "windows": len(windows),
              "tokens": int(flat_tokens.size), "bad_records": bad}
    done = output / f".{name}.done.json.tmp"
    done.write_text(json.dumps(counts), encoding="utf-8")
    os.replace(done, output / f"{name}.done.json")
    return counts


def _pieces(files: list[CorpusFile], shard_bytes: int) -> Iterator[tuple[CorpusFile, Piece, list | None]]:
    """Every shard's input in order; compressed files decompressed here, once."""
    for index, file in enumerate(files):
        if file.splittable:
            for number, start in enumerate(range(0, max(1, file.size), shard_bytes)):
                yield file, Piece(index, number, start, min(file.size, start + shard_bytes)), None
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


def prepare(inputs: list[str], output: str, tokenizer_path: str, max_length: int, language: str = "",
            workers: int | None = None, shard_bytes: int = 64 << 20, max_bad_records: int = 0,
            log=print) -> dict:
    """Tokenize `inputs` into a prepared corpus in `output`; returns the manifest. Everything is
    checked before a folder is made; the corpus is built in `<output>.partial` and renamed to
    `output` when complete, so `output` never holds half a corpus. A failed run keeps the shards it
    finished there (none: the folder goes), and prepare run again continues from them."""
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
        _check_holds_a_sentence(files[-1], language, max_bad_records)
    tokenizer_path, tokenizer = load_tokenizer(tokenizer_path)
    inputs_record = [{"path": str(Path(f.path).resolve()), "size": f.size, "mtime_ns": f.mtime_ns} for f in files]
    plan = {"inputs": inputs_record, "max_length": max_length, "language": language, "shard_bytes": shard_bytes,
            "tokenizer": tokenizer_fingerprint(tokenizer)}
    folder = Path(output)
    work = folder.with_name(f"{folder.name}.partial")
    finished = _claim_output(folder, work, plan, log)
    if finished is not None:
        return finished
    try:
        manifest = _prepare_in(work, files, plan, tokenizer, tokenizer_path, max_length, language, workers,
                               shard_bytes, max_bad_records, log)
    except BaseException:
        if not any(work.glob("*.done.json")):  # nothing to continue from
            shutil.rmtree(work, ignore_errors=True)
        raise
    os.replace(work, folder)
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
            log(f"prepare: {folder} already holds this preparation")
            return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if work.exists():
            raise ConfigError(f"prepare: {folder} and {work} both hold unfinished preparations; remove one")
        os.replace(folder, work)  # an unfinished preparation (an older DualNER wrote in place): continue it
    elif folder.is_dir():
        folder.rmdir()  # an empty folder made beforehand: the finished corpus takes its place
    if work.exists() and plan_of(work) != plan:
        if plan_of(work) is None and any(work.iterdir()):
            raise ConfigError(f"prepare: {work} (where --output {folder} is built) holds something else; remove it")
        log(f"prepare: {work} held a preparation of other inputs or settings: starting over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "prepare.json").write_text(json.dumps(plan, indent=1), encoding="utf-8")
    return None


def _prepare_in(folder: Path, files: list[CorpusFile], plan: dict, tokenizer, tokenizer_path: str, max_length: int,
                language: str, workers: int | None, shard_bytes: int, max_bad_records: int, log) -> dict:
    """The shards of `files` in `folder` (those done already are kept), then the manifest."""
    inputs_record = plan["inputs"]
    (folder / MANIFEST).unlink(missing_ok=True)
    workers = workers or os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    results = []

    def todo():
        for file, piece, records in _pieces(files, shard_bytes):
            done = folder / f"{piece.name}.done.json"
            if done.is_file():
                results.append(json.loads(done.read_text(encoding="utf-8")))
                continue
            yield file, piece, records

    args = (tokenizer_path, max_length, language, str(folder))
    if workers == 1:
        _init_worker(*args)
        results += [_write_shard(task) for task in todo()]
    else:
        with context.Pool(workers, initializer=_init_worker, initargs=args) as pool:
            for counts in pool.imap_unordered(_write_shard, todo(), chunksize=1):
                results.append(counts)
                log(f"prepare: {counts['name']}: {counts['sentences']} sentences")
    results.sort(key=lambda counts: counts["name"])
    bad = _bad_record_messages([record for counts in results for record in counts["bad_records"]], files)
    if len(bad) > max_bad_records:
        raise DataFormatError(f"prepare: {len(bad)} bad record(s), more than --max-bad-records={max_bad_records}; "
                              f"the first: {bad[0]} (fix or remove it, or raise --max-bad-records; the shards "
                              f"done are kept in {folder}: run prepare again to finish)")
    for message in bad:
        log(f"prepare: skipped a bad record: {message}")
    manifest = {"format": FORMAT_NAME, "version": VERSION, "language": language, "max_length": max_length,
                "tokenizer": {"name": tokenizer.name_or_path, "fingerprint": plan["tokenizer"]},
                "inputs": inputs_record,
                "shards": [{key: counts[key] for key in ("name", "input", "sentences", "windows", "tokens")}
                           for counts in results],
                "sentences": sum(counts["sentences"] for counts in results),
                "bad_records": len(bad)}
    temporary = folder / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(temporary, folder / MANIFEST)
    return manifest


def _bad_record_messages(bad: list[list], files: list[CorpusFile]) -> list[str]:
    """`file:line (byte N): reason` of each bad record; the lines a worker could not know (its piece
    began mid-file) counted here, in one read of each file concerned."""
    by_path = {file.path: file for file in files}
    unknown: dict[str, list[int]] = {}
    for path, byte, line, _ in bad:
        if line is None:
            unknown.setdefault(path, []).append(byte)
    lines = {path: line_numbers(by_path[path], positions) for path, positions in unknown.items()}
    return [f"{path}:{line if line is not None else lines[path][byte]} (byte {byte}): {reason}"
            for path, byte, line, reason in bad]


def main(argv: list[str] | None = None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="dualner prepare", description=(
        "Tokenize unlabeled stage-2 corpora once into memory-mapped shards (stage2.target.LANG or "
        "stage2.translations.LANG can then name the output folder). Resumable: run it again after an "
        "interruption."))
    from dualner.data.formats import accepted_endings
    parser.add_argument("inputs", nargs="+", help=f"corpus files ({accepted_endings(compressed=True)})")
    parser.add_argument("--output", required=True, help="the prepared corpus folder")
    parser.add_argument("--tokenizer", required=True,
                        help="the stage-1 run folder (its model/), an exported model, or a tokenizer name")
    parser.add_argument("--max-length", type=int, required=True, help="data.max_length of the stage-2 run")
    parser.add_argument("--language", default="", help="the corpus's language code")
    parser.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: every core)")
    parser.add_argument("--shard-mb", type=int, default=64, help="input megabytes per shard")
    parser.add_argument("--max-bad-records", type=int, default=0,
                        help="malformed or non-UTF-8 records to skip (each reported) before failing")
    args = parser.parse_args(argv)
    if not 3 <= args.max_length <= 32767 or args.shard_mb < 1:
        raise ConfigError("prepare: --max-length must be in [3, 32767] and --shard-mb >= 1")
    if (args.workers is not None and args.workers < 1) or args.max_bad_records < 0:
        raise ConfigError("prepare: --workers must be >= 1 (default: every core) and --max-bad-records >= 0")
    manifest = prepare(args.inputs, args.output, args.tokenizer, args.max_length, args.language, args.workers,
                       args.shard_mb << 20, args.max_bad_records)
    print(f"prepared {manifest['sentences']} sentences in {len(manifest['shards'])} shard(s) -> {args.output}")
