"""Dual teaching's pseudo labels (SPEC "Stage 2"), built on the device: the teacher's span predictions
become pseudo BIO labels and its BIO predictions become pseudo start/end labels, all decided at the
word level within each window.

The conversions are the pure functions of dualner.labels (ExtractSpan, span decoding, Sequential),
written as tensor operations over the flattened tokens of a micro batch (either layout, see
dualner.data.packing): cumulative max/sum scans find each word's previous and next word and each
word's most recent predicted start inside its window, so nothing is copied to the host and no
shape depends on the data. Non-word tokens (special tokens, continuation subwords, padding) are
transparent to the scans. tests/test_teacher.py checks them against the pure functions on
hypothesis-generated windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dualner.labels import IGNORE_INDEX, LabelSet
from dualner.model import HeadOutputs


@dataclass
class PseudoLabels:
    seq_labels: torch.Tensor  # from the span head: Sequential(decode(start, end))
    start_labels: torch.Tensor  # from the BIO head: ExtractSpan(argmax BIO)
    end_labels: torch.Tensor
    agreement_words: torch.Tensor  # () words where both heads' BIO readings agree
    words: torch.Tensor  # () words
    entities_per_segment: torch.Tensor  # (segments,) span-decoded entities per window


@dataclass
class WordLayout:
    """Scans over the flattened tokens that every conversion needs, computed once per micro batch."""

    is_word: torch.Tensor  # (T,) bool
    segment: torch.Tensor  # (T,) window of each token, -1 on padding
    previous_word: torch.Tensor  # (T,) token index of the previous word of the same window, or -1
    next_word: torch.Tensor  # (T,) token index of the next word of the same window, or -1
    position: torch.Tensor  # (T,) arange

    @classmethod
    def of(cls, word_index: torch.Tensor, segment_ids: torch.Tensor) -> "WordLayout":
        is_word = word_index.reshape(-1) >= 0
        segment = segment_ids.reshape(-1)
        count = is_word.numel()
        position = torch.arange(count, device=is_word.device)
        none = torch.full_like(position, -1)
        last_word = torch.cummax(torch.where(is_word, position, none), 0).values
        previous = torch.cat([none[:1], last_word[:-1]])
        beyond = torch.full_like(position, count)
        upcoming = torch.cummin(torch.where(is_word, position, beyond).flip(0), 0).values.flip(0)
        following = torch.cat([upcoming[1:], beyond[:1]])
        previous = torch.where((previous >= 0) & (segment[previous.clamp(min=0)] == segment), previous, none)
        valid_next = (following < count) & (segment[following.clamp(max=count - 1)] == segment)
        following = torch.where(valid_next, following, none)
        return cls(is_word, segment, previous, following, position)


def extract_span_tensor(bio: torch.Tensor, layout: WordLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """ExtractSpan on flattened BIO ids (O = 0, B-k = 2k+1, I-k = 2k+2 for type index k): start and
    end tags (type index + 1, 0 = none) at word tokens, 0 elsewhere. Chunks are read as conlleval
    reads them: an I- tag continues the chunk only after a tag of the same type."""
    entity_type = torch.where(bio > 0, (bio - 1) // 2, -1)
    is_inside = (bio > 0) & (bio % 2 == 0)
    previous_type = torch.where(layout.previous_word >= 0, entity_type[layout.previous_word.clamp(min=0)], -1)
    continues = layout.is_word & is_inside & (previous_type == entity_type)
    begins = layout.is_word & (bio > 0) & ~continues
    next_continues = torch.where(layout.next_word >= 0, continues[layout.next_word.clamp(min=0)], False)
    ends = layout.is_word & (bio > 0) & ~next_continues
    zero = torch.zeros_like(bio)
    return torch.where(begins, entity_type + 1, zero), torch.where(ends, entity_type + 1, zero)


def decode_spans_tensor(starts: torch.Tensor, ends: torch.Tensor, layout: WordLayout,
                        num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Span decoding + Sequential on flattened start/end classes: (BIO ids at word tokens, entities
    per window). A start of type k at word i is closed by the nearest end of type k at a word j >= i
    of the same window before the next predicted start; unmatched starts are dropped."""
    position, none = layout.position, torch.full_like(layout.position, -1)
    is_start = layout.is_word & (starts != 0)
    latest_start = torch.cummax(torch.where(is_start, position, none), 0).values
    safe_start = latest_start.clamp(min=0)
    in_group = layout.is_word & (latest_start >= 0) & (layout.segment[safe_start] == layout.segment)
    group_class = torch.where(in_group, starts[safe_start], 0)
    candidate = in_group & (ends == group_class)
    running = torch.cumsum(candidate.long(), 0)
    before_group = running[safe_start] - candidate[safe_start].long()
    closes = candidate & (running - before_group == 1)  # the first matching end of its start
    group_end = torch.full_like(position, -1).scatter_reduce(
        0, torch.where(closes, latest_start, 0), torch.where(closes, position, none), "amax")
    inside = in_group & (group_end[safe_start] >= position)
    bio = torch.where(position == latest_start, 2 * group_class - 1, 2 * group_class)
    bio = torch.where(inside, bio, torch.zeros_like(bio))
    entities = torch.zeros(num_segments + 1, device=starts.device).index_add_(
        0, torch.where(closes, layout.segment, num_segments).clamp(min=0), closes.float())[:num_segments]
    return bio, entities


def build_pseudo_labels(teacher: HeadOutputs, word_index: torch.Tensor, segment_ids: torch.Tensor,
                        num_segments: int, label_set: LabelSet,
                        threshold: float | None = None) -> PseudoLabels:
    """Hard (argmax) pseudo labels at first-subword positions; IGNORE_INDEX elsewhere.

    With a threshold, a word's pseudo BIO label is dropped when the teacher's start or end
    probability there is below it, and its pseudo start/end labels when its BIO probability is."""
    shape = word_index.shape
    layout = WordLayout.of(word_index, segment_ids)
    start_conf, start_pred = teacher.start_logits.float().softmax(-1).max(-1)
    end_conf, end_pred = teacher.end_logits.float().softmax(-1).max(-1)
    seq_conf, seq_pred = teacher.seq_logits.float().softmax(-1).max(-1)
    span_bio, entities = decode_spans_tensor(start_pred.reshape(-1), end_pred.reshape(-1), layout, num_segments)
    starts, ends = extract_span_tensor(seq_pred.reshape(-1), layout)
    ignore = torch.full_like(span_bio, IGNORE_INDEX)
    words = layout.is_word
    seq_labels = torch.where(words, span_bio, ignore)
    start_labels = torch.where(words, starts, ignore)
    end_labels = torch.where(words, ends, ignore)
    agreement = (words & (span_bio == seq_pred.reshape(-1))).sum()
    if threshold is not None:
        span_unsure = torch.minimum(start_conf, end_conf).reshape(-1) < threshold
        seq_unsure = seq_conf.reshape(-1) < threshold
        seq_labels = torch.where(span_unsure, ignore, seq_labels)
        start_labels = torch.where(seq_unsure, ignore, start_labels)
        end_labels = torch.where(seq_unsure, ignore, end_labels)
    return PseudoLabels(seq_labels.reshape(shape), start_labels.reshape(shape), end_labels.reshape(shape),
                        agreement, words.sum(), entities)
