"""Batched prediction: plain text, CoNLL or JSONL in; entities with word offsets, type and score out.

Each output line: {"tokens": [...], "entities": [{"start": 3, "end": 5, "type": "PER",
"score": 0.97, "text": "Ada Lovelace"}]} with `end` exclusive (word offsets). Span head by default:
the score is the geometric mean of the start probability at the first word and the end probability
at the last; with the BIO head, the mean probability of the entity's tags.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dualner.backend.placement import to_device
from dualner.checkpoint import choice_without_best
from dualner.config import check_head, evaluation_head
from dualner.data.conll import BOM, iter_conll
from dualner.data.formats import format_of
from dualner.data.readers import iter_jsonl, iter_text
from dualner.errors import ConfigError, DataFormatError, MissingPathError
from dualner.data.encoding import WindowTokenizer
from dualner.data.packing import model_inputs
from dualner.evaluate import scatter_to_words
from dualner.model_io import inference_collator, load_any
from dualner.labels import Entity, decode_spans, extract_entities
from dualner.logging import get_logger

_BATCH_SENTENCES = 256  # sentences read, encoded and predicted together


def check_input(path: Path) -> None:
    if path.is_dir():
        raise MissingPathError(f"--input: {path} is a folder; name a file (plain text, CoNLL or JSONL)")
    if not path.is_file():
        raise MissingPathError(f"--input: no such file {path}")
    if path.stat().st_size == 0:  # as training and prepare refuse it: an empty input is a mistake upstream
        raise DataFormatError(f"--input: {path}: file is empty; name the file that holds the sentences")


def earlier_prediction(path: Path) -> bool:
    """Whether `path` is empty or holds what predict writes (its first line: tokens and entities)."""
    with path.open("rb") as handle:
        first = handle.readline(1 << 20)
    if not first.strip():
        return True
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and {"tokens", "entities"} <= record.keys()


def check_output(output: Path, input_path: Path, overwrite: bool = False) -> None:
    """Before the model is loaded: the output must be a file we can write, not the input, and not a
    file of another kind (an earlier prediction is replaced; anything else only with --overwrite)."""
    if output.is_dir():
        raise ConfigError(f"--output: {output} is a folder; name the file to write (e.g. {output / 'entities.jsonl'})")
    if not output.parent.is_dir():
        raise MissingPathError(f"--output: the folder {output.parent} does not exist; create it or choose "
                               f"another --output")
    if output.exists() and output.resolve() == input_path.resolve():
        raise ConfigError(f"--output {output} is the --input file; prediction would replace it: choose another "
                          f"--output")
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output: cannot write in {output.parent} (read-only or no permission)")
    if output.is_file() and not overwrite and not earlier_prediction(output):
        raise ConfigError(f"--output {output} exists and is not an earlier prediction (its first line is no "
                          f'{{"tokens": ..., "entities": ...}} record); choose another --output, or add --overwrite '
                          f"to replace it")


def read_input(path: Path) -> Iterator[list[str]]:
    """Sentences of a prediction input (JSONL `{"tokens": [...]}`, CoNLL, or plain text); a JSONL
    sentence may be empty (it gets an empty entity list). Errors name the file and line."""
    check_input(path)
    kind = format_of(path)
    if kind == "jsonl":
        records = iter_jsonl(path, keep_empty=True)
    elif kind == "conll":
        records = ({"words": sentence.words} for sentence in iter_conll(path, labeled=False))
    else:  # plain text (any other name): one pre-tokenized sentence per line
        records = iter_text(path)
    first = True
    for record in records:
        words = record["words"]
        if first and words and words[0].startswith(BOM):  # a byte-order mark is no part of the first word
            words = [words[0].lstrip(BOM), *words[1:]] if words[0] != BOM else words[1:]
            if not words and kind != "jsonl":
                continue  # a line holding only the mark: a blank line
        first = False
        yield words


def resolve_device(device: str | None) -> torch.device:
    """`--device`: cpu, cuda or cuda:N, checked against the machine (default: cuda if present)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: this machine has no CUDA device; use --device cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif chosen.type != "cpu":
        raise ConfigError(f"--device {device}: use cpu, cuda or cuda:N")
    return chosen


class Predictor:
    def __init__(self, model_path: str | Path, head: str = "auto", batch_size: int = 64,
                 device: str | None = None):
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
        self.device = resolve_device(device)
        loaded = load_any(model_path)
        fallback = choice_without_best(model_path)
        if fallback:  # an unfinished run (or one without dev sets): not the model selection would pick
            get_logger().warning("--model %s has no best checkpoint recorded; predicting with %s (name a step-N "
                                 "folder to choose another)", model_path, fallback)
        check_head(loaded.variant, head)
        self.model = loaded.model.to(self.device).eval()
        self.label_set = loaded.label_set
        self.encoder = WindowTokenizer(loaded.tokenizer, loaded.label_set, loaded.max_length)
        self.collate = inference_collator(loaded, self.device)
        self.head, self.batch_size = evaluation_head(loaded.variant, head), batch_size

    @torch.no_grad()
    def predict(self, sentences: list[list[str]]) -> list[list[dict]]:
        """Entities of every sentence (an empty sentence has none)."""
        present = [i for i, words in enumerate(sentences) if words]
        found = self._predict([sentences[i] for i in present]) if present else []
        entities: list[list[dict]] = [[] for _ in sentences]
        for index, sentence_entities in zip(present, found):
            entities[index] = sentence_entities
        return entities

    def _predict(self, sentences: list[list[str]]) -> list[list[dict]]:
        from dualner.data.conll import Sentence
        rows = self.encoder.encode([Sentence(words, None) for words in sentences]).to_list()
        # word-level class probabilities per sentence, stitched from its windows
        probabilities: dict[int, list[np.ndarray]] = {}
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        for start in range(0, len(order), self.batch_size):
            batch = self.collate([rows[i] for i in order[start:start + self.batch_size]])
            outputs = self.model(**model_inputs(to_device(batch, self.device)))
            heads = ((outputs.start_logits, outputs.end_logits) if self.head == "span"
                     else (outputs.seq_logits,))
            scatter_to_words(probabilities, batch, [logits.float().softmax(-1).cpu().numpy() for logits in heads])
        return [self._entities(sentences[i], probabilities[i]) for i in range(len(sentences))]

    def _entities(self, words: list[str], probabilities: list[np.ndarray]) -> list[dict]:
        if self.head == "span":
            starts, ends = probabilities
            entities = decode_spans(starts.argmax(-1).tolist(), ends.argmax(-1).tolist(), self.label_set)
            scores = [float(np.sqrt(starts[e.first_word, self.label_set.span_class(e.entity_type)]
                                    * ends[e.last_word, self.label_set.span_class(e.entity_type)]))
                      for e in entities]
        else:
            (tags,) = probabilities
            names = self.label_set.bio_tags
            entities = extract_entities([names[i] for i in tags.argmax(-1).tolist()])
            scores = [float(tags[e.first_word:e.last_word + 1].max(-1).mean()) for e in entities]
        return [_entity_record(words, entity, score) for entity, score in zip(entities, scores)]


def _entity_record(words: list[str], entity: Entity, score: float) -> dict:
    return {"start": entity.first_word, "end": entity.last_word + 1, "type": entity.entity_type,
            "score": round(score, 6), "text": " ".join(words[entity.first_word:entity.last_word + 1])}


def predict_file(model: str | Path, input_path: str | Path, output_path: str | Path,
                 head: str = "auto", batch_size: int = 64, device: str | None = None,
                 overwrite: bool = False) -> int:
    """Stream `input_path` through the model into `output_path` (written whole, then renamed)."""
    input_path, output_path = Path(input_path), Path(output_path)
    check_input(input_path)
    check_output(output_path, input_path, overwrite)
    predictor = Predictor(model, head, batch_size, device)
    temporary = output_path.with_name(f".{output_path.name}.partial-{os.getpid()}")
    count = 0
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            pending: list[list[str]] = []
            for words in [*read_input(input_path), None]:
                if words is not None:
                    pending.append(words)
                if pending and (words is None or len(pending) == _BATCH_SENTENCES):
                    for sentence, entities in zip(pending, predictor.predict(pending)):
                        handle.write(json.dumps({"tokens": sentence, "entities": entities},
                                                ensure_ascii=False) + "\n")
                    count += len(pending)
                    pending = []
        temporary.replace(output_path)
    finally:  # a failed prediction leaves no half-written file behind (and the old output untouched)
        temporary.unlink(missing_ok=True)
    return count
