"""What inference needs beside the weights (tokenizer, encoder config, label set), saved once per run
in `run/model/`, and loading a trained model from any checkpoint folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from dualner.checkpoint import (ASSETS_FILE, CheckpointError, load_model_state, model_assets_dir,
                                resolve_checkpoint)
from dualner.data.packing import Collator
from dualner.labels import LabelSet
from dualner.model import DualNERModel, with_encoder_dropout


def inference_collator(loaded: "LoadedModel") -> Collator:
    """Packed rows where the encoder family allows it (same results, no padding computed)."""
    offset = loaded.model.position_offset
    return Collator(pad_id=loaded.tokenizer.pad_token_id, packed=offset is not None,
                    row_length=loaded.max_length, position_offset=offset or 0)


@dataclass
class LoadedModel:
    model: DualNERModel
    tokenizer: object
    label_set: LabelSet
    max_length: int
    checkpoint: Path


def save_model_assets(directory: Path, tokenizer, encoder_config, label_set: LabelSet,
                      variant: str, max_length: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    encoder_config.save_pretrained(directory)
    (directory / ASSETS_FILE).write_text(json.dumps(
        {"entity_types": list(label_set.entity_types), "bio_tags": label_set.bio_tags,
         "variant": variant, "max_length": max_length}, indent=1), encoding="utf-8")


def read_label_set(assets: Path) -> LabelSet:
    return LabelSet(tuple(json.loads((assets / ASSETS_FILE).read_text())["entity_types"]))


def load_trained_model(path: str | Path, encoder_dropout: float | None = None,
                       attention_mode: str = "auto") -> LoadedModel:
    """The model of a run or step-N folder; the encoder's dropout is the run's (its saved encoder
    config) unless `encoder_dropout` overrides it."""
    checkpoint = resolve_checkpoint(path)
    assets = model_assets_dir(checkpoint)
    if not (assets / ASSETS_FILE).is_file():
        raise CheckpointError(f"{checkpoint}: no model assets at {assets} (not a DualNER run folder)")
    meta = json.loads((assets / ASSETS_FILE).read_text())
    label_set = LabelSet(tuple(meta["entity_types"]))
    encoder_config = with_encoder_dropout(AutoConfig.from_pretrained(assets), encoder_dropout)
    model = DualNERModel.from_encoder_config(encoder_config, len(label_set.entity_types),
                                             attention_mode=attention_mode)
    state = load_model_state(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: weights do not match the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return LoadedModel(model, AutoTokenizer.from_pretrained(assets), label_set, meta["max_length"],
                       checkpoint)
