"""Token-level cross-entropy losses of the three heads (SPEC "Model", "Stage 1")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dualner.data.encoding import IGNORE_INDEX
from dualner.model import HeadOutputs

# Which heads each variant trains (SPEC "Ablations and variants").
VARIANT_TERMS = {"mlt": ("seq", "start", "end"), "cla": ("seq",), "span": ("start", "end")}


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over labeled positions; exactly 0 (with a gradient path) when none is labeled."""
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_labels,
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (flat_labels != IGNORE_INDEX).sum().clamp(min=1)


def supervised_losses(outputs: HeadOutputs, batch: dict[str, torch.Tensor],
                      variant: str = "mlt") -> dict[str, torch.Tensor]:
    """L_seq, L_start, L_end for the terms the variant trains, plus their sum under `total`."""
    logits = {"seq": outputs.seq_logits, "start": outputs.start_logits, "end": outputs.end_logits}
    terms = {name: token_cross_entropy(logits[name], batch[f"{name}_labels"])
             for name in VARIANT_TERMS[variant]}
    terms["total"] = sum(terms.values())
    return terms


def entity_representations(outputs: HeadOutputs, start_labels: torch.Tensor,
                           word_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC's entity representation, for every (row, type): the concatenated encoder states of the
    word with the highest student start probability for the type and of the word with the highest
    end probability. Returns (representations (rows, types, 2 x hidden), present (rows, types)),
    where `present` marks the rows whose labels hold an entity of that type."""
    valid = word_index >= 0
    blocked = torch.finfo(torch.float32).min
    start_scores = outputs.start_logits.float().softmax(-1)[..., 1:].masked_fill(~valid[..., None], blocked)
    end_scores = outputs.end_logits.float().softmax(-1)[..., 1:].masked_fill(~valid[..., None], blocked)
    start_words = start_scores.argmax(1)  # (rows, types)
    end_words = end_scores.argmax(1)
    hidden = outputs.hidden_states
    index = lambda words: words[..., None].expand(-1, -1, hidden.shape[-1])  # noqa: E731
    representations = torch.cat([hidden.gather(1, index(start_words)), hidden.gather(1, index(end_words))], -1)
    types = torch.arange(1, start_scores.shape[-1] + 1, device=start_labels.device)
    present = (start_labels[..., None] == types).any(1)
    return representations.float(), present


def centroid_mse(representations: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean over types with at least two entities in the batch of the mean squared distance of each
    representation to their mean; 0 (keeping the graph) when no type qualifies."""
    terms = []
    for entity_type in range(present.shape[1]):
        group = representations[present[:, entity_type], entity_type]
        if group.shape[0] >= 2:
            terms.append((group - group.mean(0, keepdim=True)).pow(2).mean())
    return torch.stack(terms).mean() if terms else representations.sum() * 0.0


def parallel_mse(representations: torch.Tensor, present: torch.Tensor,
                 pairs: list[tuple[int, int]]) -> torch.Tensor:
    """For (translation row, source row) pairs: pull each type's entity of one onto the other's."""
    terms = [(representations[a, k] - representations[b, k]).pow(2).mean()
             for a, b in pairs for k in range(present.shape[1]) if present[a, k] and present[b, k]]
    return torch.stack(terms).mean() if terms else representations.sum() * 0.0


def self_kl(student: HeadOutputs, teacher: HeadOutputs, word_index: torch.Tensor,
            variant: str = "mlt") -> dict[str, torch.Tensor]:
    """w/ selfKL: each head towards the teacher's soft distribution of the same head, KL(teacher ||
    student) averaged over first-subword positions."""
    valid = (word_index >= 0).reshape(-1)
    terms = {}
    for name in VARIANT_TERMS[variant]:
        s = getattr(student, f"{name}_logits").float().reshape(-1, getattr(student, f"{name}_logits").shape[-1])
        t = getattr(teacher, f"{name}_logits").float().reshape(s.shape)
        kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        terms[name] = (kl * valid).sum() / valid.sum().clamp(min=1)
    return terms
