"""Limits that come from the encoder, checked when a run starts (before anything is written) and
applied where a model is used: how many tokens a window may hold (its position embeddings), which
token ids the embeddings cover (its vocabulary)."""

from __future__ import annotations

from dualner.attention import position_offset
from dualner.errors import ConfigError


def window_limit(encoder_config) -> int | None:
    """Tokens one window may hold, special tokens included: the encoder's absolute position
    embeddings minus the first position a sequence uses (RoBERTa/XLM-R start at padding_idx + 1, so
    514 positions hold 512 tokens); None when the encoder does not say (relative positions)."""
    positions = getattr(encoder_config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        return None
    if getattr(encoder_config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return None
    return positions - (position_offset(encoder_config) or 0)


def check_max_length(max_length: int, encoder_config, where: str) -> None:
    """`data.max_length` must fit the encoder's positions (else training on a long sentence fails
    with an index error deep inside the encoder)."""
    limit = window_limit(encoder_config)
    if limit is not None and max_length > limit:
        raise ConfigError(f"data.max_length={max_length} is more than {where} can hold: its "
                          f"{encoder_config.max_position_embeddings} position embeddings take windows of at "
                          f"most {limit} tokens; set data.max_length={limit} or less (longer sentences are "
                          f"split into windows)")


def check_vocabulary(tokenizer, encoder_config, tokenizer_name: str, encoder_name: str) -> None:
    """Every id the tokenizer can produce must have an embedding."""
    size = getattr(encoder_config, "vocab_size", None)
    if isinstance(size, int) and len(tokenizer) > size:
        raise ConfigError(f"model.tokenizer: {tokenizer_name} has {len(tokenizer)} tokens but the encoder "
                          f"{encoder_name} has {size} embeddings; they do not belong together")


def usable_max_length(max_length: int, encoder_config) -> int:
    """A saved model's window length, capped to what its encoder holds (a run of an older version
    may have saved a longer one)."""
    limit = window_limit(encoder_config)
    return min(max_length, limit) if limit is not None else max_length
