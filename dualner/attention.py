"""Block-diagonal attention for packed rows, per encoder family.

A packed row holds several windows (segments, dualner.data.packing). Two things make the encoder
compute for each segment exactly what it computes for the window alone:
1. attention never crosses a segment boundary;
2. position ids restart at every segment, with the family's first position (BERT: 0; RoBERTa /
   XLM-R / CamemBERT: padding_idx + 1, what `create_position_ids_from_input_ids` gives).
Families outside `POSITION_RULES` (relative positions, encoders that do not route attention through
transformers' attention interface) are trained unpacked, one window per row.

Attention paths (`model.attention`), chosen per forward:
- `varlen`: torch's variable-length FlashAttention (`torch.nn.attention.varlen`, CUDA) over the
  segments' cumulative lengths: no mask, no wasted work. Its kernel has no attention-probability
  dropout, so `auto` uses it only where none is needed: evaluation, the frozen teacher, or an
  encoder configured without attention dropout.
- `sdpa`: `scaled_dot_product_attention` with a boolean block-diagonal mask built once per forward
  (the memory-efficient kernel on CUDA, which takes masks and dropout; the fused CPU kernel on CPU).
  Rows are short (128 tokens by default), so the masked-out work is small.
- `auto` (default): `varlen` where it applies and is installed, else `sdpa`.
FlexAttention (document masks) would skip empty blocks too, but needs torch.compile for speed and
recompiles per row count; with 128-token rows the mask costs little, so it is not used.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IMPLEMENTATION = "dualner_packed"

# model_type -> how position ids start ("absolute": 0; "padding": padding_idx + 1)
POSITION_RULES = {"bert": "absolute", "electra": "absolute", "xlm-roberta": "padding",
                  "roberta": "padding", "camembert": "padding", "xlm-roberta-xl": "padding"}


def position_offset(config) -> int | None:
    """The first position id of a segment for this encoder family; None when it cannot be packed."""
    rule = POSITION_RULES.get(getattr(config, "model_type", ""))
    if rule == "absolute":
        return 0
    if rule == "padding":
        return int(config.pad_token_id) + 1
    return None


_varlen_failed = False  # set when the kernel refused a call under "auto": SDPA from then on


def varlen_available() -> bool:
    if _varlen_failed:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@dataclass
class PackedLayout:
    """What every attention layer of one forward needs; the mask is built once and shared."""

    segment_ids: torch.Tensor  # (rows, length), -1 on padding
    cu_seqlens: torch.Tensor | None  # int32 (segments + padding runs + 1,), on the device
    max_seqlen: int
    mode: str = "auto"  # "auto" | "sdpa" | "varlen"
    _mask: torch.Tensor | None = field(default=None, init=False, repr=False)

    def block_mask(self) -> torch.Tensor:
        if self._mask is None:
            segments = self.segment_ids
            self._mask = (segments[:, :, None] == segments[:, None, :])[:, None]  # (rows, 1, L, L)
        return self._mask

    def use_varlen(self, dropout: float) -> bool:
        if self.cu_seqlens is None or self.mode == "sdpa" or not self.segment_ids.is_cuda:
            return False
        if self.mode == "varlen":
            return True
        return dropout == 0.0 and varlen_available()


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: (batch, heads, length, dim) in, (batch, length,
    heads, dim) out. Without a packed layout it is plain SDPA with the mask transformers built."""
    global _varlen_failed
    layout: PackedLayout | None = kwargs.get("dualner_layout")
    dropout = dropout if module.training else 0.0
    if layout is not None and layout.use_varlen(dropout):
        from torch.nn.attention.varlen import varlen_attn
        rows, heads, length, dim = query.shape
        flat = [t.transpose(1, 2).reshape(rows * length, heads, dim) for t in (query, key, value)]
        try:
            output = varlen_attn(*flat, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen,
                                 layout.max_seqlen, scale=scaling)
            return output.reshape(rows, length, heads, dim), None
        except Exception as error:  # noqa: BLE001 (a kernel or signature this torch lacks)
            if layout.mode == "varlen":
                raise
            # e.g. a torch build without the flash kernel for this GPU or dtype: same results via SDPA
            _varlen_failed = True
            warnings.warn(f"variable-length attention unavailable ({error}); using SDPA with a block mask")
    mask = layout.block_mask() if layout is not None else attention_mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                            scale=scaling)
    return output.transpose(1, 2).contiguous(), None


_registered = False


def register() -> None:
    """Make `IMPLEMENTATION` known to transformers (attention function and mask factory)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(IMPLEMENTATION, packed_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    _registered = True
