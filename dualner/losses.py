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
