"""Model I/O in one place: what a run saves beside its checkpoints (tokenizer, encoder config, label
set: `run/model/`), loading a trained model from a run or checkpoint folder (the student and teacher
of stage 2, evaluation, prediction), and the exported Hugging Face folder. One strict key check for
every load.

An exported folder is a Hugging Face token-classification model (`AutoModelForTokenClassification`
loads the encoder and the BIO head, with `id2label`), plus the start/end span heads' weights in the
same safetensors file and the entity types in the config, which `load_exported` reads back into the
full dual-head model. Tokenizer files sit beside it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

from dualner.checkpoint import load_model_state, resolve_checkpoint, select_checkpoint
from dualner.data.packing import Collator, packs_by_default
from dualner.encoders import check_model_files
from dualner.errors import CheckpointError, ConfigError, MissingPathError
from dualner.labels import LabelSet
from dualner.limits import usable_max_length
from dualner.model import DualNERModel, with_encoder_dropout
from dualner.run_layout import STEP_DIR, RunLayout, aside_name

ASSETS_FILE = "dualner.json"
WEIGHTS = "model.safetensors"  # of an exported folder


@dataclass
class LoadedModel:
    model: DualNERModel
    tokenizer: object
    label_set: LabelSet
    max_length: int
    checkpoint: Path  # the step-N folder (or exported folder) it came from
    variant: str = "mlt"  # which heads were trained (decides the default evaluation head)


def save_model_assets(run_dir: Path, tokenizer, encoder_config, label_set: LabelSet, variant: str,
                      max_length: int) -> None:
    directory = RunLayout(run_dir).model
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    encoder_config.save_pretrained(directory)
    (directory / ASSETS_FILE).write_text(json.dumps(
        {"entity_types": list(label_set.entity_types), "bio_tags": label_set.bio_tags,
         "variant": variant, "max_length": max_length}, indent=1), encoding="utf-8")


def assets_of(checkpoint: Path) -> Path:
    """The model assets of the run a step-N folder belongs to."""
    assets = RunLayout.of_checkpoint(checkpoint).model
    if not (assets / ASSETS_FILE).is_file():
        raise CheckpointError(f"{checkpoint}: no model assets at {assets} (not a DualNER run folder)")
    return assets


def load_weights(model: DualNERModel, state: dict[str, torch.Tensor], source: Path) -> DualNERModel:
    """The one strict key check: every parameter of the model, nothing else."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def load_trained_model(path: str | Path, encoder_dropout: float | None = None,
                       attention_mode: str = "auto") -> LoadedModel:
    """The model of a run folder (its best checkpoint) or a step-N folder, in eval mode; the encoder's
    dropout is the run's (its saved encoder config) unless `encoder_dropout` overrides it."""
    checkpoint = resolve_checkpoint(path)
    assets = assets_of(checkpoint)
    meta = json.loads((assets / ASSETS_FILE).read_text(encoding="utf-8"))
    label_set = LabelSet(tuple(meta["entity_types"]))
    encoder_config = with_encoder_dropout(AutoConfig.from_pretrained(assets), encoder_dropout)
    model = DualNERModel.from_encoder_config(encoder_config, len(label_set.entity_types),
                                             attention_mode=attention_mode)
    load_weights(model, load_model_state(checkpoint), checkpoint).eval()
    return LoadedModel(model, AutoTokenizer.from_pretrained(assets), label_set,
                       usable_max_length(meta["max_length"], encoder_config), checkpoint, meta.get("variant", "mlt"))


def inference_collator(loaded: LoadedModel, device: torch.device) -> Collator:
    """Packed rows where the encoder family allows it and packing pays on `device` (same results)."""
    offset = loaded.model.position_offset
    return Collator(pad_id=loaded.tokenizer.pad_token_id, packed=offset is not None and packs_by_default(device),
                    row_length=loaded.max_length, position_offset=offset or 0)


# -- exported folders -----------------------------------------------------------------------------
SPAN_HEADS = ("start_head", "end_head")


def _token_classification_layout(config) -> tuple[str, str]:
    """(class name, attribute holding the encoder) of the encoder's token-classification model,
    read off an instance on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = AutoModelForTokenClassification.from_config(config)
    return type(model).__name__, model.base_model_prefix


def check_export_output(output: Path, checkpoint: str | Path, overwrite: bool) -> None:
    """Before the model loads: an export goes in a folder of its own, outside the run it comes from,
    and replaces a non-empty folder only when asked."""
    if not Path(checkpoint).exists():
        raise MissingPathError(f"checkpoint not found: {checkpoint}")
    run = RunLayout.of_checkpoint(select_checkpoint(Path(checkpoint))[0]).root.resolve()
    target = output.resolve()
    if target == run or run in target.parents or target in run.parents:
        where = "is" if target == run else "is inside" if run in target.parents else "holds"
        raise ConfigError(f"--output {output} {where} the run folder {run}; export into a folder of its own, "
                          f"e.g. {run.parent / (run.name + '-exported')}")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; name the folder to export into")
    if output.is_dir() and not overwrite and any(output.iterdir()):
        names = sorted(entry.name for entry in output.iterdir())
        raise ConfigError(f"--output {output} is not empty ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); "
                          f"choose a new folder, or add --overwrite (its files are then moved to "
                          f"{output.name}.old-<time>)")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {output}: cannot write in {existing} (read-only or no permission)")


def export_model(checkpoint: str | Path, output: str | Path, overwrite: bool = False, log=None) -> Path:
    """The exported folder is written whole beside `output`, then renamed into place: a failure
    leaves nothing half-written. A non-empty `output` is refused, or with `overwrite` moved to
    `<output>.old-<time>` first."""
    output = Path(output)
    check_export_output(output, checkpoint, overwrite)
    loaded = load_trained_model(checkpoint)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        partial.mkdir()
        _write_export(loaded, partial)
        _put_in_place(partial, output, overwrite, log)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return output


def _put_in_place(partial: Path, output: Path, overwrite: bool, log) -> None:
    if overwrite and output.is_dir() and any(output.iterdir()):
        aside = aside_name(output)
        os.replace(output, aside)
        if log is not None:
            log.warning("--output %s: its earlier files moved to %s", output, aside)
    try:
        os.rename(partial, output)  # over a missing or empty folder only, never over files
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise ConfigError(f"--output {output}: files appeared there while this export ran (another export?); "
                          f"they are kept and this export is discarded; run it again with another --output, "
                          f"or --overwrite") from None


def _write_export(loaded: LoadedModel, output: Path) -> None:
    config = loaded.model.encoder.config
    tags = loaded.label_set.bio_tags
    config.id2label = dict(enumerate(tags))
    config.label2id = {tag: index for index, tag in enumerate(tags)}
    config.dualner_entity_types = list(loaded.label_set.entity_types)
    config.dualner_max_length = loaded.max_length
    config.dualner_variant = loaded.variant
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


def is_export(path: str | Path) -> bool:
    """A model folder (config.json) that is no run, checkpoints or step-N folder: an export, read as
    one (so that a damaged config.json is named, not taken for "no checkpoint")."""
    path = Path(path)
    layout = RunLayout(path)
    run_or_checkpoint = (STEP_DIR.match(path.name) or path.name == RunLayout.checkpoints.name
                         or layout.checkpoints.is_dir() or layout.config.is_file())
    return (path / "config.json").is_file() and not run_or_checkpoint


EXPORT_REMEDY = "export the run again (python -m dualner export --checkpoint RUN --output NEW_FOLDER)"


def load_exported(path: str | Path, flag: str = "--model") -> LoadedModel:
    path = Path(path)
    check_model_files(path, f"{flag} {path} (an exported folder)", EXPORT_REMEDY)
    config = AutoConfig.from_pretrained(path)
    if not isinstance(getattr(config, "dualner_entity_types", None), list):
        raise CheckpointError(f"{flag} {path}: {path / 'config.json'} has no dualner_entity_types: not a folder "
                              f"written by `dualner export` (a plain Hugging Face model has no span heads); "
                              f"name a run folder, a step-N folder, or {EXPORT_REMEDY}")
    label_set = LabelSet(tuple(config.dualner_entity_types))
    model = DualNERModel.from_encoder_config(config, len(label_set.entity_types))
    _, prefix = _token_classification_layout(config)
    state = {}
    try:
        weights = load_file(str(path / WEIGHTS))
    except Exception as error:  # noqa: BLE001 (safetensors raises its own error types)
        raise CheckpointError(f"{path / WEIGHTS}: cannot read the exported weights ({error})") from None
    for name, tensor in weights.items():
        if name.startswith(f"{prefix}."):
            state[f"encoder.{name[len(prefix) + 1:]}"] = tensor
        elif name.startswith("classifier."):
            state[f"seq_head.{name[len('classifier.'):]}"] = tensor
        else:
            state[name] = tensor
    load_weights(model, state, path).eval()
    return LoadedModel(model, AutoTokenizer.from_pretrained(path), label_set,
                       usable_max_length(config.dualner_max_length, config), path, getattr(config, "dualner_variant", "mlt"))


def load_any(path: str | Path, flag: str = "--model") -> LoadedModel:
    """An exported folder, or a run / step-N checkpoint folder."""
    if not Path(path).exists():
        raise MissingPathError(f"{flag}: no such folder {path}")
    if not Path(path).is_dir():
        raise MissingPathError(f"{flag}: {path} is a file; name an exported folder, a run folder or a step-N folder")
    return load_exported(path, flag) if is_export(path) else load_trained_model(path)
