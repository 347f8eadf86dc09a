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
    """The tokenizer must be the encoder's: every id it produces needs an embedding row, and a tokenizer
    that reaches under half of the rows is another model's (its ids would index the wrong embeddings,
    and training runs to the end at F1 0). A few rows past the vocabulary are padding (XLM-R and e5
    round the embedding matrix up) and stay accepted."""
    rows = getattr(encoder_config, "vocab_size", None)
    if not isinstance(rows, int):
        return
    ids = max(max(tokenizer.get_vocab().values(), default=-1) + 1, len(tokenizer))
    own = tokenizer_name == encoder_name
    tokenizer_of = f"model.encoder: the tokenizer of {encoder_name}" if own else f"model.tokenizer: {tokenizer_name}"
    embeddings = f"the encoder {encoder_name} has {rows} embeddings (vocab_size in its config.json)"
    remedy = ("its tokenizer files are another model's: put the encoder's own there, or set model.tokenizer "
              "to a folder (or hub name) holding it" if own else
              f"point model.tokenizer at the encoder's own tokenizer (or leave it empty: {encoder_name}'s)")
    if ids > rows:
        raise ConfigError(f"{tokenizer_of} has {ids} tokens but {embeddings}: ids past {rows - 1} have no "
                          f"embedding; {remedy}")
    if ids < rows / 2:
        raise ConfigError(f"{tokenizer_of} has {ids} tokens but {embeddings}: a tokenizer that reaches under "
                          f"half of the embeddings is another model's (training would end at F1 0); {remedy}")


def usable_max_length(max_length: int, encoder_config) -> int:
    """A saved model's window length, capped to what its encoder holds (a run of an older version
    may have saved a longer one)."""
    limit = window_limit(encoder_config)
    return min(max_length, limit) if limit is not None else max_length
