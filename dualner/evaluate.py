"""Distributed word-level prediction and seqeval F1 per language.

Sentences are sharded by id, so all windows of one sentence are predicted on one rank and the
gathered predictions hold every sentence exactly once (no padded-sampler duplicates). Every rank runs
the same number of forward passes, which ZeRO-3's parameter gathering requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from dualner.backend.comm import all_gather_objects, all_reduce_max, current
from dualner.backend.placement import to_device
from dualner.data.conll import Sentence
from dualner.data.packing import Collator, model_inputs
from dualner.labels import LabelSet, decode_spans, sequential
from dualner.model import HeadOutputs

Forward = Callable[..., HeadOutputs]  # DualNERModel.forward's keywords (dualner.data.packing.model_inputs)


@dataclass
class EvalSet:
    language: str
    sentences: list[Sentence]
    rows: list[dict]  # encoded windows (see dualner.data.encoding)


def load_eval_sets(paths: dict[str, str], key: str, windows_of, label_set: LabelSet,
                   max_sentences: int | None) -> list[EvalSet]:
    """`{language: path}` of labeled files, read, checked against the model's entity types and cut
    into windows (`windows_of`: a dualner.data.encoding.WindowTokenizer)."""
    from dualner.data.sources import check_entity_types, read_labeled
    sets = []
    for language, path in paths.items():
        sentences = read_labeled({language: path}, key, max_sentences)
        check_entity_types(sentences, label_set, f"{key}.{language}")
        sets.append(EvalSet(language, sentences, windows_of.encode(sentences).to_list()))
    return sets


def _word_predictions(outputs: HeadOutputs, head: str) -> tuple[np.ndarray, ...]:
    """Argmax classes per token, copied to the host in one transfer."""
    if head == "span":
        classes = torch.stack([outputs.start_logits.argmax(-1), outputs.end_logits.argmax(-1)])
    else:
        classes = outputs.seq_logits.argmax(-1)[None]
    return tuple(classes.cpu().numpy())


@torch.no_grad()
def predict_tags(forward: Forward, rows: Sequence[dict], label_set: LabelSet, head: str,
                 batch_size: int, collate: Collator, device: torch.device) -> dict[int, list[str]]:
    """sentence id -> predicted BIO tags for every sentence of `rows`, on every rank."""
    info = current()
    sentence_ids = np.asarray([row["sentence_id"] for row in rows])
    mine = np.nonzero(sentence_ids % info.world_size == info.rank)[0]
    lengths = np.asarray([len(row["input_ids"]) for row in rows])
    mine = mine[np.argsort(lengths[mine], kind="stable")]  # similar lengths together: less padding
    batches = [mine[i:i + batch_size].tolist() for i in range(0, len(mine), batch_size)]
    rounds = all_reduce_max(len(batches))
    per_sentence: dict[int, list[np.ndarray]] = {}
    for round_index in range(rounds):
        # A rank with fewer batches repeats a batch and discards it, keeping forward passes equal.
        indices = batches[round_index] if round_index < len(batches) else [0]
        batch = collate([rows[i] for i in indices])
        outputs = forward(**model_inputs(to_device(batch, device)))
        if round_index >= len(batches):
            continue
        scatter_to_words(per_sentence, batch, _word_predictions(outputs, head))
    tags = {sentence_id: _decode(values, label_set, head) for sentence_id, values in per_sentence.items()}
    merged: dict[int, list[str]] = {}
    for part in all_gather_objects(tags):
        merged.update(part)
    return merged


def scatter_to_words(per_sentence: dict[int, list[np.ndarray]], batch: dict,
                     per_token: Sequence[np.ndarray]) -> None:
    """Copy the values at first-subword tokens into each sentence's word-level arrays; the windows
    of a long sentence land side by side through their `word_offset`. Either batch layout."""
    meta = batch["meta"]
    word_index = batch["word_index"].numpy().reshape(-1)
    segment = batch["segment_ids"].numpy().reshape(-1)
    tokens = np.nonzero(word_index >= 0)[0]
    flat = [values.reshape(-1, *values.shape[2:]) for values in per_token]
    for window in range(batch["num_segments"]):
        sentence = meta["sentence_id"][window]
        targets = per_sentence.setdefault(sentence, [
            np.zeros((meta["num_words"][window], *values.shape[1:]), dtype=values.dtype) for values in flat])
        positions = tokens[segment[tokens] == window]
        words = word_index[positions] + meta["word_offset"][window]
        for target, values in zip(targets, flat):
            target[words] = values[positions]


def _decode(values: list[np.ndarray], label_set: LabelSet, head: str) -> list[str]:
    if head == "span":
        starts, ends = values
        return sequential(decode_spans(starts.tolist(), ends.tolist(), label_set), len(starts))
    names = label_set.bio_tags
    return [names[i] for i in values[0].tolist()]


def f1_percent(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    from seqeval.metrics import f1_score  # imported here: it pulls scikit-learn in (a second at start-up)
    return 100.0 * float(f1_score(list(map(list, gold)), list(map(list, predicted))))


def evaluate_sets(forward: Forward, eval_sets: Sequence[EvalSet], label_set: LabelSet, head: str,
                  batch_size: int, collate: Collator, device: torch.device) -> dict:
    """{"per_language": {lang: F1}, "average": unweighted mean} (F1 in percent). `head` is "span" or
    "seq" (dualner.config.evaluation_head resolves "auto")."""
    if head not in ("span", "seq"):
        raise ValueError(f"evaluation head {head!r}: span or seq")
    per_language = {}
    for eval_set in eval_sets:
        predicted = predict_tags(forward, eval_set.rows, label_set, head, batch_size, collate, device)
        if len(predicted) != len(eval_set.sentences):
            raise RuntimeError(f"{eval_set.language}: gathered {len(predicted)} predictions for "
                               f"{len(eval_set.sentences)} sentences")
        gold = [sentence.tags for sentence in eval_set.sentences]
        per_language[eval_set.language] = f1_percent(gold, [predicted[i] for i in range(len(gold))])
    average = float(np.mean(list(per_language.values()))) if per_language else 0.0
    return {"per_language": per_language, "average": average}


def format_table(results: dict, title: str = "F1") -> str:
    lines = [f"| language | {title} |", "|---|---|"]
    lines += [f"| {language} | {score:.2f} |" for language, score in results["per_language"].items()]
    lines.append(f"| **average** | **{results['average']:.2f}** |")
    return "\n".join(lines)
