"""The dual-head NER model: any Hugging Face encoder + a BIO head + start/end span heads.

Knows nothing of DeepSpeed or of the data pipeline (nanoGPT's rule), so it can be used, exported
and tested as a plain `torch.nn.Module`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from dualner import attention


class HeadOutputs(NamedTuple):
    # A NamedTuple, not a dataclass: ZeRO-3's hooks find tensors inside tuples only.
    seq_logits: torch.Tensor  # (batch, length, 2|E|+1)
    start_logits: torch.Tensor  # (batch, length, |E|+1)
    end_logits: torch.Tensor  # (batch, length, |E|+1)
    hidden_states: torch.Tensor  # (batch, length, hidden): the encoder's last layer


class DualNERModel(nn.Module):
    """`forward` takes a micro batch of either layout (dualner.data.packing): `attention_mask` for
    padded rows, or `segment_ids` + `position_ids` (+ `cu_seqlens`, `max_seqlen`) for packed rows."""

    def __init__(self, encoder: nn.Module, num_entity_types: int, dropout: float = 0.1,
                 attention_mode: str = "auto"):
        super().__init__()
        self.encoder = encoder
        self.attention_mode = attention_mode
        # Families whose positions we know get the block-diagonal attention (dualner.attention).
        self.position_offset = attention.position_offset(encoder.config)
        if self.position_offset is not None:
            attention.register()
            encoder.set_attn_implementation(attention.IMPLEMENTATION)
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.seq_head = nn.Linear(hidden, 2 * num_entity_types + 1)
        self.start_head = nn.Linear(hidden, num_entity_types + 1)
        self.end_head = nn.Linear(hidden, num_entity_types + 1)
        for head in (self.seq_head, self.start_head, self.end_head):
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    @property
    def supports_packing(self) -> bool:
        return self.position_offset is not None

    @classmethod
    def from_encoder_config(cls, encoder_config: PretrainedConfig, num_entity_types: int,
                            dropout: float = 0.1, attention_mode: str = "auto") -> "DualNERModel":
        """Random weights; used before loading a checkpoint's state dict."""
        return cls(AutoModel.from_config(encoder_config, add_pooling_layer=False)
                   if _accepts_pooling_flag(encoder_config) else AutoModel.from_config(encoder_config),
                   num_entity_types, dropout, attention_mode)

    @classmethod
    def from_pretrained_encoder(cls, name_or_path: str, num_entity_types: int, dropout: float = 0.1,
                                encoder_dropout: float | None = None,
                                attention_mode: str = "auto") -> "DualNERModel":
        config = with_encoder_dropout(AutoConfig.from_pretrained(name_or_path), encoder_dropout)
        kwargs = {"add_pooling_layer": False} if _accepts_pooling_flag(config) else {}
        return cls(AutoModel.from_pretrained(name_or_path, config=config, **kwargs), num_entity_types,
                   dropout, attention_mode)

    def freeze_word_embeddings(self) -> None:
        self.encoder.get_input_embeddings().weight.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0) -> HeadOutputs:
        if segment_ids is None:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            if not self.supports_packing:
                raise ValueError(f"{self.encoder.config.model_type} encoders are not packed (unknown "
                                 f"position ids); set data.packing=false")
            dropout = getattr(self.encoder.config, "attention_probs_dropout_prob", 0.0) if self.training else 0.0
            if cu_seqlens is not None and attention.wants_varlen(self.attention_mode, dropout, input_ids.is_cuda):
                layout = {"dualner_cu_seqlens": cu_seqlens, "dualner_max_seqlen": max_seqlen,
                          "dualner_segment_ids": segment_ids,
                          "dualner_varlen_forced": self.attention_mode == "varlen"}
            else:
                layout = {"dualner_mask": attention.block_diagonal_mask(segment_ids)}
            hidden = self.encoder(input_ids=input_ids, position_ids=position_ids, **layout).last_hidden_state
        features = self.dropout(hidden)
        return HeadOutputs(self.seq_head(features), self.start_head(features),
                           self.end_head(features), hidden)


_DROPOUT_NAMES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout")


def with_encoder_dropout(config: PretrainedConfig, encoder_dropout: float | None) -> PretrainedConfig:
    """The encoder config with its hidden and attention dropout set (names differ between families)."""
    if encoder_dropout is not None:
        for name in _DROPOUT_NAMES:
            if hasattr(config, name):
                setattr(config, name, encoder_dropout)
    return config


def _accepts_pooling_flag(config: PretrainedConfig) -> bool:
    # BERT-family encoders carry an unused pooler; leaving it out avoids parameters with no gradient.
    return config.model_type in {"bert", "roberta", "xlm-roberta", "camembert"}
