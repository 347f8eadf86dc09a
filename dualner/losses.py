"""Token-level cross-entropy losses of the three heads (SPEC "Model", "Stage 1")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dualner.labels import IGNORE_INDEX
from dualner.model import HeadOutputs

# Which heads each variant trains (SPEC "Ablations and variants").
VARIANT_TERMS = {"mlt": ("seq", "start", "end"), "cla": ("seq",), "span": ("start", "end")}


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                        denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over labeled positions divided by their number (or by `denominator`: one shared by
    several terms); exactly 0 (with a gradient path) when none is labeled."""
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_labels,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if denominator is None:
        denominator = (flat_labels != IGNORE_INDEX).sum()
    return total / denominator.clamp(min=1)


def entity_representations(outputs: HeadOutputs, start_labels: torch.Tensor, word_index: torch.Tensor,
                           segment_ids: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC's entity representation, for every (window, type): the concatenated encoder states of the
    window's word with the highest student start probability for the type and of its word with the
    highest end probability (the first such word on ties, as argmax). Returns (representations
    (windows, types, 2 x hidden), present (windows, types)), where `present` marks the windows whose
    labels hold an entity of that type. Segment-wise on the device: no host copy, either layout."""
    is_word = word_index.reshape(-1) >= 0
    # padding and non-word tokens go to an extra bin that is dropped
    segment = torch.where(is_word, segment_ids.reshape(-1), num_segments)
    hidden = outputs.hidden_states.reshape(-1, outputs.hidden_states.shape[-1])
    types = outputs.start_logits.shape[-1] - 1
    position = torch.arange(segment.numel(), device=segment.device)
    bins = segment[:, None].expand(-1, types)

    def best_word(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.reshape(-1, types + 1).float().softmax(-1)[:, 1:]
        scores = scores.masked_fill(~is_word[:, None], float("-inf"))
        best = torch.full((num_segments + 1, types), float("-inf"), device=scores.device).scatter_reduce(
            0, bins, scores, "amax")
        is_best = (scores == best[segment]) & is_word[:, None]
        first = torch.full((num_segments + 1, types), segment.numel(), device=scores.device,
                           dtype=torch.long).scatter_reduce(
            0, bins, torch.where(is_best, position[:, None], segment.numel()), "amin")
        return first[:num_segments].clamp(max=segment.numel() - 1)

    representations = torch.cat([hidden[best_word(outputs.start_logits)],
                                 hidden[best_word(outputs.end_logits)]], -1)
    labels = start_labels.reshape(-1)
    has_type = labels[:, None] == torch.arange(1, types + 1, device=labels.device)
    present = torch.zeros((num_segments + 1, types), dtype=torch.float32, device=labels.device).scatter_reduce(
        0, bins, has_type.float(), "amax")[:num_segments] > 0
    return representations.float(), present


def _squared(difference: torch.Tensor, reduction: str) -> torch.Tensor:
    squared = difference.pow(2)
    return squared.sum(-1) if reduction == "sum" else squared.mean(-1)


def centroid_mse(representations: torch.Tensor, present: torch.Tensor, reduction: str = "mean",
                 carried: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Mean over types with at least two entities of the mean squared distance of each
    representation to their mean (over the 2 x hidden dimensions: their "mean", or their "sum", the
    squared Euclidean distance); 0 (keeping the graph) when no type qualifies.

    With `carried` = (sum of representations, count) per type from earlier micro batches of the step
    (constants), the centroid and the two-entity rule cover them too; then returns (loss, carried
    for the next micro batch)."""
    weight = present.float()
    count = weight.sum(0)  # (types,)
    total = (representations * weight[..., None]).sum(0)  # (types, 2 x hidden)
    pooled_total, pooled_count = (total, count) if carried is None else (total + carried[0], count + carried[1])
    centroid = pooled_total / pooled_count.clamp(min=1)[:, None]
    distance = _squared(representations - centroid, reduction) * weight  # (windows, types)
    per_type = distance.sum(0) / count.clamp(min=1)
    qualifies = ((pooled_count >= 2) & (count >= 1)).float()
    loss = (per_type * qualifies).sum() / qualifies.sum().clamp(min=1)
    if carried is None:
        return loss
    return loss, (pooled_total.detach(), pooled_count.detach())


def parallel_mse(representations: torch.Tensor, present: torch.Tensor, pairs: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
    """For (translation window, source window) pairs: pull each type's entity of one onto the other's."""
    if pairs.shape[0] == 0:
        return representations.sum() * 0.0
    translation, source = pairs[:, 0], pairs[:, 1]
    both = (present[translation] & present[source]).float()  # (pairs, types)
    distance = _squared(representations[translation] - representations[source], reduction)
    return (distance * both).sum() / both.sum().clamp(min=1)


def head_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, word_index: torch.Tensor) -> torch.Tensor:
    """w/ selfKL, one head: KL(teacher || student) of its soft distributions, averaged over
    first-subword positions."""
    valid = (word_index >= 0).reshape(-1)
    student = student_logits.float().reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.float().reshape(student.shape)
    kl = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return (kl * valid).sum() / valid.sum().clamp(min=1)


def self_kl(student: HeadOutputs, teacher: HeadOutputs, word_index: torch.Tensor,
            variant: str = "mlt") -> dict[str, torch.Tensor]:
    """w/ selfKL: each head towards the teacher's soft distribution of the same head."""
    return {name: head_kl(getattr(student, f"{name}_logits"), getattr(teacher, f"{name}_logits"), word_index)
            for name in VARIANT_TERMS[variant]}
