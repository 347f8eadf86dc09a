"""Stage 2's loss terms (SPEC "Stage 2: dual teaching"), each a function of one micro batch's
`Forward`: `gold_seq`, `gold_start`, `gold_end` (the source's gold labels), `pseudo_seq`,
`pseudo_start`, `pseudo_end` (the teacher's cross-head pseudo labels; with stage2.teaching=self_kl,
each head's KL to the teacher's same head), `mse` (weight stage2.mse_weight, SPEC's lambda)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from dualner.config import Stage2Config
from dualner.labels import IGNORE_INDEX
from dualner.losses import centroid_mse, entity_representations, head_kl, parallel_mse, token_cross_entropy
from dualner.model import HeadOutputs
from dualner.teacher import PseudoLabels


class StepPool:
    """What the MSE term carries from one micro batch to the next within a step (mse_pool=step)."""

    def __init__(self):
        self.carried = None


class Forward(NamedTuple):
    student: HeadOutputs
    teacher: HeadOutputs
    pseudo: PseudoLabels
    batch: dict
    settings: Stage2Config
    pool: StepPool

    @property
    def denominator(self) -> torch.Tensor | None:
        """loss_normalization=shared: the micro batch's words, for every term; else each term's own."""
        return self.pseudo.words if self.settings.loss_normalization == "shared" else None


def _gold(head: str):
    def term(f: Forward) -> torch.Tensor:
        logits = getattr(f.student, f"{head}_logits")
        if f"{head}_labels" not in f.batch:  # no labeled source window in this micro batch
            return logits.sum() * 0.0
        return token_cross_entropy(logits, f.batch[f"{head}_labels"], f.denominator)
    return term


def _pseudo(head: str):
    def term(f: Forward) -> torch.Tensor:
        logits = getattr(f.student, f"{head}_logits")
        if f.settings.teaching == "self_kl":
            return head_kl(logits, getattr(f.teacher, f"{head}_logits"), f.batch["word_index"])
        return token_cross_entropy(logits, getattr(f.pseudo, f"{head}_labels"), f.denominator)
    return term


def entity_mse(f: Forward) -> torch.Tensor:
    """Entities come from gold labels where a window has them, else from pseudo labels."""
    batch, labels = f.batch, f.pseudo.start_labels
    if "start_labels" in batch:
        segments = batch["segment_ids"]
        labeled = _segments_with(batch["start_labels"] != IGNORE_INDEX, segments, batch["num_segments"])
        labeled_tokens = (segments >= 0) & labeled[segments.clamp(min=0)]
        labels = torch.where(labeled_tokens, batch["start_labels"], labels)
    representations, present = entity_representations(f.student, labels, batch["word_index"],
                                                       batch["segment_ids"], batch["num_segments"])
    reduction = f.settings.mse_reduction
    if f.settings.mse == "parallel":
        return parallel_mse(representations, present, batch["pairs"], reduction)
    if f.settings.mse_pool == "step":
        if f.pool.carried is None:
            zeros = torch.zeros(present.shape[1], device=present.device)
            f.pool.carried = (torch.zeros(present.shape[1], representations.shape[-1], device=present.device), zeros)
        loss, f.pool.carried = centroid_mse(representations, present, reduction, f.pool.carried)
        return loss
    return centroid_mse(representations, present, reduction)


def _segments_with(mask: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(segments,) bool: the windows with at least one True token in `mask`."""
    bins = torch.where(segment_ids >= 0, segment_ids, num_segments).reshape(-1)
    found = torch.zeros(num_segments + 1, device=mask.device).scatter_reduce(
        0, bins, mask.reshape(-1).float(), "amax")
    return found[:num_segments] > 0


STAGE2_TERMS = {**{f"gold_{head}": _gold(head) for head in ("seq", "start", "end")},
                **{f"pseudo_{head}": _pseudo(head) for head in ("seq", "start", "end")},
                "mse": entity_mse}
