"""Dual teaching's pseudo labels (SPEC "Stage 2"): the teacher's span predictions become pseudo BIO
labels and its BIO predictions become pseudo start/end labels, all decided at the word level."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dualner.data.encoding import IGNORE_INDEX
from dualner.labels import LabelSet, decode_spans, extract_span, sequential
from dualner.model import HeadOutputs


@dataclass
class PseudoLabels:
    seq_labels: torch.Tensor  # from the span head: Sequential(decode(start, end))
    start_labels: torch.Tensor  # from the BIO head: ExtractSpan(argmax BIO)
    end_labels: torch.Tensor
    agreement_words: int  # words where both heads' BIO readings agree
    words: int
    entities_per_row: list[int]  # span-decoded entities, per row


def build_pseudo_labels(teacher: HeadOutputs, word_index: torch.Tensor, label_set: LabelSet,
                        threshold: float | None = None) -> PseudoLabels:
    """Hard (argmax) pseudo labels at first-subword positions; IGNORE_INDEX elsewhere.

    With a threshold, a word's pseudo BIO label is dropped when the teacher's start or end
    probability there is below it, and its pseudo start/end labels when its BIO probability is."""
    start_probs = teacher.start_logits.float().softmax(-1)
    end_probs = teacher.end_logits.float().softmax(-1)
    seq_probs = teacher.seq_logits.float().softmax(-1)
    start_conf, start_pred = (t.cpu().numpy() for t in start_probs.max(-1))
    end_conf, end_pred = (t.cpu().numpy() for t in end_probs.max(-1))
    seq_conf, seq_pred = (t.cpu().numpy() for t in seq_probs.max(-1))
    positions_all = word_index.cpu().numpy()
    shape = positions_all.shape
    seq_labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    start_labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    end_labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    names = label_set.bio_tags
    agree = words = 0
    entities_per_row = []
    for row in range(shape[0]):
        positions = np.nonzero(positions_all[row] >= 0)[0]
        positions = positions[np.argsort(positions_all[row, positions], kind="stable")]
        entities = decode_spans(start_pred[row, positions].tolist(), end_pred[row, positions].tolist(),
                                label_set)
        span_tags = sequential(entities, len(positions))
        seq_tags = [names[i] for i in seq_pred[row, positions].tolist()]
        starts, ends = extract_span(seq_tags, label_set)
        seq_labels[row, positions] = [label_set.tag_id(t) for t in span_tags]
        start_labels[row, positions] = starts
        end_labels[row, positions] = ends
        agree += sum(a == b for a, b in zip(span_tags, seq_tags))
        words += len(positions)
        entities_per_row.append(len(entities))
    if threshold is not None:
        span_unsure = (np.minimum(start_conf, end_conf) < threshold) & (positions_all >= 0)
        seq_unsure = (seq_conf < threshold) & (positions_all >= 0)
        seq_labels[span_unsure] = IGNORE_INDEX
        start_labels[seq_unsure] = IGNORE_INDEX
        end_labels[seq_unsure] = IGNORE_INDEX
    device = teacher.seq_logits.device
    return PseudoLabels(torch.from_numpy(seq_labels).to(device), torch.from_numpy(start_labels).to(device),
                        torch.from_numpy(end_labels).to(device), agree, words, entities_per_row)
