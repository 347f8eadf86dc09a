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


def wants_varlen(mode: str, dropout: float, on_cuda: bool) -> bool:
    """Whether a packed forward uses the variable-length kernel (see the module docstring)."""
    if mode == "sdpa" or not on_cuda:
        return False
    if mode == "varlen":
        return True
    return dropout == 0.0 and varlen_available()


def block_diagonal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(rows, 1, length, length) boolean: token i may attend to token j of its own segment (the
    padding of a row is a segment of its own, so no row of the mask is empty)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: (batch, heads, length, dim) in, (batch, length,
    heads, dim) out. The model hands it either the packed rows' cumulative segment lengths
    (`dualner_cu_seqlens`, `dualner_max_seqlen`: variable-length FlashAttention) or a mask (its own
    block-diagonal one, or the padding mask transformers built): plain tensors and ints, so
    torch.compile traces through it."""
    global _varlen_failed
    dropout = dropout if module.training else 0.0
    cu_seqlens = kwargs.get("dualner_cu_seqlens")
    if cu_seqlens is not None:
        from torch.nn.attention.varlen import varlen_attn
        rows, heads, length, dim = query.shape
        flat = [t.transpose(1, 2).reshape(rows * length, heads, dim) for t in (query, key, value)]
        longest = kwargs["dualner_max_seqlen"]
        try:
            output = varlen_attn(*flat, cu_seqlens, cu_seqlens, longest, longest, scale=scaling)
            return output.reshape(rows, length, heads, dim), None
        except Exception as error:  # noqa: BLE001 (a kernel or signature this torch lacks)
            if kwargs.get("dualner_varlen_forced"):
                raise
            # e.g. a torch build without the flash kernel for this GPU or dtype: same results via SDPA
            _varlen_failed = True
            warnings.warn(f"variable-length attention unavailable ({error}); using SDPA with a block mask")
            attention_mask = block_diagonal_mask(kwargs["dualner_segment_ids"])
    mask = kwargs.get("dualner_mask", attention_mask)
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
