"""Labeled data sets named in the config: reading, the source fraction split, label-set checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dualner.data.conll import DataFormatError, Sentence, read_conll
from dualner.errors import ConfigError, MissingPathError
from dualner.labels import LabelSet


def refuse_shared_files(files_by_key: dict[str, Iterable[str]]) -> None:
    """Training files named under two keys (`data.train.en` and `data.train.de`, or a target and a
    translation), also through a symlink or a hard link: their sentences would be trained twice, as
    two languages. Refused naming both keys; hub datasets (no file) are not compared."""
    seen: dict[tuple[int, int], tuple[str, str]] = {}
    for key, files in files_by_key.items():
        for path in files:
            try:
                status = os.stat(path)
            except OSError:
                continue  # not a file (a hub dataset) or missing: the reader names it
            first_key, first_path = seen.setdefault((status.st_dev, status.st_ino), (key, path))
            if (first_key, first_path) == (key, path):
                continue
            keys = f"{key} names one file twice" if first_key == key else f"{first_key} and {key} name one file"
            which = first_path if first_path == path else f"{first_path} and {path} are the same file"
            raise ConfigError(f"{keys} ({which}): its sentences would be trained twice; name each file once")


def read_labeled(paths: dict[str, str], key: str, max_sentences: int | None = None) -> list[Sentence]:
    """All sentences of `{language: path}`; `key` (e.g. "data.train") names the config entry."""
    sentences: list[Sentence] = []
    for language, path in paths.items():
        try:
            sentences += read_conll(path, language, labeled=True, max_sentences=max_sentences)
        except FileNotFoundError as error:
            raise MissingPathError(f"{key}.{language}: {error}") from None
    return sentences


def split_source_fraction(sentences: Sequence[Sentence], fraction: float,
                          seed: int) -> tuple[list[Sentence], list[Sentence]]:
    """(labeled part, remainder) for SPEC's source fraction p; the remainder joins stage 2 unlabeled.

    The split depends only on the seed, so stage 1 and stage 2 agree on it."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"data.train_fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng(seed).permutation(len(sentences))
    keep = max(1, round(fraction * len(sentences)))
    kept = sorted(order[:keep].tolist())
    rest = sorted(order[keep:].tolist())
    return [sentences[i] for i in kept], [sentences[i] for i in rest]


def read_source(cfg) -> tuple[list[Sentence], list[Sentence]]:
    """The labeled source of a run (`data.train`, capped by `data.max_train_sentences`), split into
    (labeled part, remainder) by `data.train_fraction` and `run.seed`, the same in both stages. Each
    sentence's `source` is its index in the source: the `src_id` translations name."""
    refuse_shared_files({f"data.train.{language}": [path] for language, path in cfg.data.train.items()})
    sentences = read_labeled(cfg.data.train, "data.train", cfg.data.max_train_sentences)
    for index, sentence in enumerate(sentences):
        sentence.source = str(index)
    return split_source_fraction(sentences, cfg.data.train_fraction, cfg.run.seed)


def check_same_split(cfg, stage1_config: "Path") -> None:
    """Stage 2 with a source fraction below 1 must split the labeled source exactly as its stage-1
    run did (same files, cap, fraction and seed), else labels stage 1 never saw (or saw, and stage 2
    treats as unlabeled) leak into the source-fraction experiment."""
    import yaml
    if not stage1_config.is_file():
        return  # a checkpoint without its run's config (moved): nothing to compare with
    first = (yaml.safe_load(stage1_config.read_text(encoding="utf-8")) or {})
    def resolved(train: dict | None) -> dict | None:  # the same files, however their paths are written
        return {lang: str(Path(path).resolve()) for lang, path in train.items()} if train else train

    ours = {"data.train": resolved(cfg.data.train), "data.max_train_sentences": cfg.data.max_train_sentences,
            "data.train_fraction": cfg.data.train_fraction, "run.seed": cfg.run.seed}
    theirs = {"data.train": resolved(first.get("data", {}).get("train")),
              "data.max_train_sentences": first.get("data", {}).get("max_train_sentences"),
              "data.train_fraction": first.get("data", {}).get("train_fraction", 1.0),
              "run.seed": first.get("run", {}).get("seed")}
    if ours["data.train_fraction"] >= 1.0 and theirs["data.train_fraction"] >= 1.0:
        return
    for key in ours:
        if ours[key] != theirs[key]:
            raise ConfigError(f"{key}={ours[key]!r} differs from the stage-1 run's {theirs[key]!r} ({stage1_config}): "
                              f"with a source fraction below 1 both stages must split the labeled source the same "
                              f"way; set data.train, data.max_train_sentences, data.train_fraction and run.seed as "
                              f"stage 1 did")


def check_entity_types(sentences: Sequence[Sentence], label_set: LabelSet, key: str) -> None:
    """Evaluation data must use the model's entity types; name the first offending sentence."""
    known = set(label_set.entity_types)
    for sentence in sentences:
        for tag in sentence.tags or []:
            if tag != "O" and tag[2:] not in known:
                raise DataFormatError(
                    f"{key}: {sentence.source}: entity type {tag[2:]!r} is not one of the model's "
                    f"types {sorted(known)}")
