"""The stage-2 streaming loader: local files and globs (CoNLL, plain pre-tokenized text, JSONL) as
`datasets.IterableDataset`s, sharded by rank and by loader worker, mixed with configured weights,
tokenized on the fly, and resumable to the exact sentence.

Sharding. Every file is cut into `parts` line-strided virtual shards (file, offset, stride) so that
there are at least ranks x workers shards even when a corpus has fewer files than that. Rank r takes
shards r, r + world, ...; `datasets` hands a rank's shards to its loader workers. A reader of a
strided shard reads the whole file but keeps only its own sentences, so nothing is tokenized twice
and the ranks and workers together cover every sentence exactly once per pass.

Position. `datasets` keeps the state of every iterable (shard, example, repeat count, mixing RNG) and
`torchdata`'s StatefulDataLoader keeps the workers' states and the order in which they were read;
their `state_dict()` is saved in every checkpoint, so a resumed run neither repeats nor skips.
Nothing is ever loaded whole: memory holds one tokenization pool per worker plus the prefetch queue.
"""

from __future__ import annotations

import glob
import random
import zlib
from functools import lru_cache, partial
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import datasets
import torch
from datasets import IterableDataset

from dualner.data.conll import DataFormatError, iter_conll
from dualner.errors import MissingPathError
from dualner.data.encoding import WindowTokenizer
from dualner.data.packing import Collator
from dualner.data.readers import JSONL_SUFFIXES, TEXT_SUFFIXES, iter_jsonl, iter_text

KIND_SOURCE, KIND_TARGET, KIND_TRANSLATION = "source", "target", "translation"
_CONLL_SUFFIXES = {".tsv", ".conll", ".iob", ".bio"}


@dataclass(frozen=True)
class Shard:
    path: str
    offset: int  # keep sentences whose index in the file is offset (mod stride)
    stride: int
    language: str
    kind: str
    # For translations under the "parallel" MSE: the labeled source JSONL whose sentence with the
    # translation's src_id travels inside the translation's record (pair_*), so the two are one unit
    # of the stream and always meet in one micro batch.
    pair_with: str = ""


HUB_PREFIX = "hf:"


def expand_files(pattern: str, key: str) -> list[str]:
    """A path or glob -> sorted files; an error naming the config key when nothing matches.

    `hf:NAME[:CONFIG]@SPLIT` names a `datasets` dataset (a hub name, or a local folder) with a
    `tokens` column, streamed rather than downloaded whole."""
    if pattern.startswith(HUB_PREFIX):
        return [pattern]
    files = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise MissingPathError(f"{key}: {pattern!r} matches no file")
    return files


def make_shards(files: Sequence[str], language: str, kind: str, world_size: int,
                workers: int, pair_with: str = "") -> list[Shard]:
    wanted = world_size * max(1, workers)
    parts = max(1, -(-wanted // len(files)))  # at least ranks x workers shards in all
    return [Shard(path, offset, parts, language, kind, pair_with)
            for path in files for offset in range(parts)]


def _iter_hub(shard: Shard) -> Iterator[dict]:
    spec, _, split = shard.path[len(HUB_PREFIX):].rpartition("@")
    if not spec:
        raise DataFormatError(f"{shard.path}: expected hf:NAME[:CONFIG]@SPLIT")
    name, _, config = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
    if stream.num_shards >= shard.stride:  # the dataset's own files split the work
        stream, stride, offset = stream.shard(num_shards=shard.stride, index=shard.offset), 1, 0
    else:
        stride, offset = shard.stride, shard.offset
    for index, record in enumerate(stream):
        if index % stride != offset:
            continue
        if "tokens" not in record:
            raise DataFormatError(f"{shard.path}: record {index} has no 'tokens' column "
                                  f"(columns: {sorted(record)})")
        yield {"words": list(record["tokens"]), "tags": [], "language": record.get("lang") or shard.language,
               "src_id": str(record.get("src_id", "")), "sample_id": f"{shard.path}#{index}"}


@lru_cache(maxsize=4)
def _source_by_id(path: str) -> dict[str, dict]:
    # The labeled source is small (it was labeled by hand); one dict per loader process.
    return {sentence["src_id"]: sentence for sentence in iter_jsonl(Path(path), "")}


def rank_shards(shards: Sequence[Shard], rank: int, world_size: int) -> list[Shard]:
    return list(shards[rank::world_size])


def _iter_sentences(shard: Shard) -> Iterator[dict]:
    if shard.path.startswith(HUB_PREFIX):
        yield from _iter_hub(shard)
        return
    path = Path(shard.path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        reader = iter_jsonl(path, shard.language)
    elif suffix in TEXT_SUFFIXES:
        reader = iter_text(path, shard.language)
    elif suffix in _CONLL_SUFFIXES:
        labeled = shard.kind == KIND_SOURCE
        reader = ({"words": s.words, "tags": s.tags or [], "language": shard.language,
                   "src_id": "", "sample_id": s.source} for s in iter_conll(path, shard.language, labeled))
    else:
        raise DataFormatError(f"{path}: unknown corpus format {suffix!r} (expected one of "
                              f"{sorted(_CONLL_SUFFIXES | JSONL_SUFFIXES | TEXT_SUFFIXES)})")
    for index, sentence in enumerate(reader):
        if index % shard.stride == shard.offset:
            if shard.kind != KIND_SOURCE:
                sentence["tags"] = []  # unlabeled text: any label column is ignored
            if shard.pair_with and sentence["src_id"]:
                source = _source_by_id(shard.pair_with).get(sentence["src_id"])
                if source is not None:
                    sentence = {**sentence, "pair_words": source["words"], "pair_tags": source["tags"],
                                "pair_language": source["language"], "pair_sample_id": source["sample_id"]}
            yield sentence


def check_corpus(files: Sequence[str], language: str, kind: str, key: str) -> None:
    """The first read of every corpus file, before anything is written: a known format, UTF-8, and
    at least one sentence (the rest is read as training streams it)."""
    for path in files:
        if path.startswith(HUB_PREFIX):
            continue
        try:
            first = next(_iter_sentences(Shard(path, 0, 1, language, kind)), None)
        except UnicodeDecodeError as error:
            raise DataFormatError(f"{key}: {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        except DataFormatError as error:
            raise DataFormatError(f"{key}: {error}") from None
        if first is None:
            raise DataFormatError(f"{key}: {path} holds no sentence")


_NO_PAIR = {"pair_words": [], "pair_tags": [], "pair_language": "", "pair_sample_id": ""}


def _generate(shards: list[Shard]) -> Iterator[dict]:
    # `shards` is a list in gen_kwargs, which is how `datasets` splits work across loader workers.
    for shard in shards:
        for sentence in _iter_sentences(shard):
            yield {"kind": shard.kind, **_NO_PAIR, **sentence}


_FEATURES = datasets.Features({
    "words": datasets.Sequence(datasets.Value("string")),
    "tags": datasets.Sequence(datasets.Value("string")),
    "language": datasets.Value("string"), "src_id": datasets.Value("string"),
    "sample_id": datasets.Value("string"), "kind": datasets.Value("string"),
    "pair_words": datasets.Sequence(datasets.Value("string")),
    "pair_tags": datasets.Sequence(datasets.Value("string")),
    "pair_language": datasets.Value("string"), "pair_sample_id": datasets.Value("string"),
})


def _units(batch: dict) -> dict:
    """A pool's records as encoder rows with a `unit` column: a translation and its source (the
    pair_* fields) become two rows of one unit, next to each other."""
    rows: dict[str, list] = {name: [] for name in ("words", "tags", "language", "src_id", "sample_id", "kind", "unit")}
    for index in range(len(batch["words"])):
        members = [(batch["words"][index], batch["tags"][index], batch["language"][index], batch["sample_id"][index],
                    batch["kind"][index])]
        if batch["pair_words"][index]:
            members.append((batch["pair_words"][index], batch["pair_tags"][index], batch["pair_language"][index],
                            batch["pair_sample_id"][index], KIND_SOURCE))
        for words, tags, language, sample_id, kind in members:
            for name, value in zip(("words", "tags", "language", "src_id", "sample_id", "kind", "unit"),
                                   (words, tags, language, batch["src_id"][index], sample_id, kind, index)):
                rows[name].append(value)
    return rows


def cut_units(units: list[list[int]], lengths: Sequence[int], micro_batch_size: int,
              rows: int | None, row_length: int) -> list[list[int]]:
    """Micro batches of whole units (a unit's windows are never split): up to `micro_batch_size`
    windows each, or, with `rows`, what fits `rows` packed rows of `row_length` tokens. A unit larger
    than that gets a micro batch of its own."""
    from dualner.data.packing import first_fit_decreasing
    batches: list[list[int]] = []
    current: list[int] = []
    for unit in units:
        candidate = current + unit
        if rows is None:
            fits = len(candidate) <= micro_batch_size
        else:
            fits = len(first_fit_decreasing([lengths[i] for i in candidate], row_length)) <= rows
        if current and not fits:
            batches.append(current)
            candidate = list(unit)
        current = candidate
    if current:
        batches.append(current)
    return batches


def shard_stream(shards: list[Shard], repeat: bool) -> IterableDataset:
    stream = IterableDataset.from_generator(_generate, gen_kwargs={"shards": shards}, features=_FEATURES)
    return stream.repeat(None) if repeat else stream


def collate_micro_batch(columns: dict, collate: Collator) -> dict:
    """One element of the pooled stream (columns of one micro batch) into model tensors + meta."""
    names = list(columns)
    return collate([dict(zip(names, values)) for values in zip(*columns.values())])


STREAM_META = ("language", "kind", "sample_id", "src_id", "word_offset")


class Stage2Stream:
    """One rank's mixed, tokenized, pooled stream of stage-2 micro batches, resumable.

    `collate` (dualner.data.packing.Collator, with meta_columns=STREAM_META) makes the tensors in the
    loader workers; with a fixed number of rows (token batches) the pool is cut into micro batches
    that fill them."""

    def __init__(self, sources: Sequence[tuple[list[Shard], float]], encoder: WindowTokenizer,
                 micro_batch_size: int, seed: int, rank: int, collate: Collator, pool: int = 2048,
                 workers: int = 0, repeat: bool = True, pin_memory: bool = False):
        weighted = [(shards, weight) for shards, weight in sources if weight > 0 and shards]
        if not weighted:
            raise ValueError("stage 2 has no data to read (every stream is empty or has weight 0)")
        # Training repeats every stream forever (steps, not passes, end stage 2); one pass is for audits.
        streams = [shard_stream(shards, repeat=repeat) for shards, _ in weighted]
        total = sum(weight for _, weight in weighted)
        mixed = streams[0] if len(streams) == 1 else datasets.interleave_datasets(
            streams, probabilities=[weight / total for _, weight in weighted], seed=seed + rank,
            stopping_strategy="all_exhausted")
        self.encoder = encoder
        self.pooled = pool > 0
        self.sort_pools = self.pooled and not collate.packed  # padded rows: sort for less padding
        self.micro_batch_size = micro_batch_size
        self.token_rows = collate.rows  # token batches: fixed rows of collate.row_length
        self.row_length = collate.row_length
        self.seed = seed
        # Each element of `encoded` is one whole micro batch, cut inside its pool, so a batch never
        # straddles two pools.
        encoded = mixed.map(self._micro_batches_of_pool, batched=True,
                            batch_size=pool if pool > 0 else micro_batch_size,
                            remove_columns=list(_FEATURES))
        from torchdata.stateful_dataloader import StatefulDataLoader
        # A generator of its own: creating an iterator draws a base seed, and drawing it from the
        # global RNG would shift the dropout masks of a resumed run.
        self.loader = StatefulDataLoader(
            encoded, batch_size=None, num_workers=workers, pin_memory=pin_memory,
            prefetch_factor=4 if workers else None,
            generator=torch.Generator().manual_seed(seed + rank),
            collate_fn=partial(collate_micro_batch, collate=collate))
        self._iterator = None

    def _micro_batches_of_pool(self, batch: dict) -> dict:
        """Tokenize a pool and cut it into micro batches (one output element each) of whole units (a
        sentence, or a translation with its source). The pool's units are shuffled (padded rows:
        sorted by length first, then the batches shuffled) by a seed from the pool's content, so a
        resumed stream repeats it exactly; unpooled (pool=0) keeps the stream order. The last micro
        batch of a pool may be smaller."""
        rows = self.encoder.encode_batch(_units(batch))
        lengths = [len(ids) for ids in rows["input_ids"]]
        units: dict[int, list[int]] = {}
        for window, unit in enumerate(rows["unit"]):
            units.setdefault(unit, []).append(window)
        ordered = list(units.values())
        # Seeded by the pool's tokens, not its sample ids: those name the run folder.
        content = zlib.crc32(repr((rows["input_ids"][0], rows["input_ids"][-1], len(lengths))).encode())
        shuffle = random.Random(self.seed * 2**32 + content).shuffle
        if self.sort_pools:
            ordered.sort(key=lambda unit: sum(lengths[i] for i in unit))
        elif self.pooled:
            shuffle(ordered)
        chunks = cut_units(ordered, lengths, self.micro_batch_size, self.token_rows, self.row_length)
        if self.sort_pools:
            shuffle(chunks)
        rows.pop("unit")
        return {name: [[values[i] for i in chunk] for chunk in chunks] for name, values in rows.items()}

    def __iter__(self):
        return iter(self.loader)

    def next_batch(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        return next(self._iterator)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._iterator = None
