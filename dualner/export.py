"""Export: one consolidated model folder from a checkpoint of any ZeRO stage.

The folder is a Hugging Face token-classification model (`AutoModelForTokenClassification` loads the
encoder and the BIO head, with `id2label`), plus the start/end span heads' weights in the same
safetensors file and the entity types in the config, which `load_exported` reads back into the full
dual-head model. Tokenizer files sit beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

from dualner.inference import LoadedModel, load_trained_model
from dualner.labels import LabelSet
from dualner.model import DualNERModel

WEIGHTS = "model.safetensors"
SPAN_HEADS = ("start_head", "end_head")


def _token_classification_layout(config) -> tuple[str, str]:
    """(class name, attribute holding the encoder) of the encoder's token-classification model,
    read off an instance on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = AutoModelForTokenClassification.from_config(config)
    return type(model).__name__, model.base_model_prefix


def export_model(checkpoint: str | Path, output: str | Path) -> Path:
    loaded = load_trained_model(checkpoint)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config = loaded.model.encoder.config
    tags = loaded.label_set.bio_tags
    config.id2label = dict(enumerate(tags))
    config.label2id = {tag: index for index, tag in enumerate(tags)}
    config.dualner_entity_types = list(loaded.label_set.entity_types)
    config.dualner_max_length = loaded.max_length
    class_name, prefix = _token_classification_layout(config)
    config.architectures = [class_name]
    state = {}
    for name, tensor in loaded.model.state_dict().items():
        if name.startswith("encoder."):
            state[f"{prefix}.{name[len('encoder.'):]}"] = tensor
        elif name.startswith("seq_head."):
            state[f"classifier.{name[len('seq_head.'):]}"] = tensor
        else:
            state[name] = tensor
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(output / WEIGHTS),
              metadata={"format": "pt"})
    config.save_pretrained(output)
    loaded.tokenizer.save_pretrained(output)
    return output


def is_export(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and "dualner_entity_types" in config.read_text(encoding="utf-8")


def load_exported(path: str | Path) -> LoadedModel:
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    label_set = LabelSet(tuple(config.dualner_entity_types))
    model = DualNERModel.from_encoder_config(config, len(label_set.entity_types))
    _, prefix = _token_classification_layout(config)
    state = {}
    for name, tensor in load_file(str(path / WEIGHTS)).items():
        if name.startswith(f"{prefix}."):
            state[f"encoder.{name[len(prefix) + 1:]}"] = tensor
        elif name.startswith("classifier."):
            state[f"seq_head.{name[len('classifier.'):]}"] = tensor
        else:
            state[name] = tensor
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(model, AutoTokenizer.from_pretrained(path), label_set,
                       config.dualner_max_length, path)


def load_any(path: str | Path) -> LoadedModel:
    """An exported folder, or a run / step-N checkpoint folder."""
    return load_exported(path) if is_export(path) else load_trained_model(path)
