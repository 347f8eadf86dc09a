"""Everything that knows about devices, process groups and the distributed engine.

- `comm`: the process group, rank facts and every collective (host values over gloo, device values
  on the accelerator).
- one module per engine kind (the config's `engine.kind`), each with its settings (the rest of the
  `engine:` section), their rules, its checkpoint files and the answer to "can this checkpoint
  resume here": `deepspeed_config` (its JSON read by `deepspeed_json`, the engine in
  `deepspeed_engine`, its checkpoint files outside the engine in `deepspeed_files`) and `fsdp2`
  (torch's fully_shard and distributed checkpoint).
- `optimizer`: AdamW and the learning-rate schedule, shared by the engines.
- `teacher`: the frozen teacher as a whole replica on each rank, for any engine.
- `placement`: host batches to the device (pinned memory, non-blocking copies).

The config knows no engine: the `engine:` section's rules reach dualner.config.validate as
`ConfigRules`, handed to it by the layers that know both (dualner.build, the CLI).

Outside this package the project names no engine (tests/test_structure.py checks): a job prepares
its `EngineSetup` here (`prepare_engine`), builds the student and teacher from it and uses them
through `TrainingEngine` and `TeacherEngine`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from dualner.backend import comm
from dualner.errors import CheckpointError, ConfigError
from dualner.run_layout import COMPLETE_MARKER

if TYPE_CHECKING:
    from dualner.config import Config, TrainConfig
    from dualner.data.batching import BatchLayout

# engine.kind -> the module that knows it; the first is the default of a config without `engine.kind`
ENGINE_KINDS = {"deepspeed": "dualner.backend.deepspeed_config", "fsdp2": "dualner.backend.fsdp2"}
DEFAULT_KIND = next(iter(ENGINE_KINDS))


class TrainingEngine(Protocol):
    """The student. A step: `accumulation_steps` x (`engine(**inputs)`, `backward(loss)`), then
    `optimizer_step()`. Nothing here waits for the device."""

    device: torch.device
    module: torch.nn.Module
    last_step_flag: torch.Tensor  # on the device: 1.0 when the last optimizer step was skipped on every rank

    @property
    def accumulation_steps(self) -> int: ...
    def __call__(self, *args, **kwargs): ...
    def backward(self, loss: torch.Tensor) -> torch.Tensor: ...  # its device flag: 1.0 when not finite
    def optimizer_step(self) -> None: ...
    def train(self) -> None: ...
    def eval(self) -> None: ...
    def lr(self) -> float: ...
    def checkpoint_record(self) -> dict: ...  # what a checkpoint's COMPLETE record says of the engine
    def save(self, root: Path, tag: str, client_state: dict) -> None: ...
    def load(self, path: Path, world_size: int | None = None) -> dict: ...  # returns the client state


class TeacherEngine(Protocol):
    """The frozen teacher of stage 2: forwards without gradients; `copy_from` takes the student's
    weights (every rank calls it)."""

    module: torch.nn.Module

    def __call__(self, *args, **kwargs): ...
    def copy_from(self, student: TrainingEngine) -> None: ...


class EngineSetup(Protocol):
    """A job's engine before it is built: its settings checked against the device and the batch
    layout; what it answers about checkpoints; the builder of the student and the teacher."""

    kind: str

    def describe(self) -> str: ...  # for the job's first log line
    def check_resume(self, checkpoint: Path, record: dict) -> None: ...  # CheckpointError: not here
    def continuing(self, checkpoint: Path, record: dict) -> "EngineSetup": ...  # as the checkpoint was trained
    def build(self, model: torch.nn.Module, train: "TrainConfig", total_steps: int, compile_encoder: bool = False,
              fixed_shapes: bool = False) -> TrainingEngine: ...
    def build_teacher(self, model: torch.nn.Module, placement: str) -> TeacherEngine: ...


def _kind_module(kind: str):
    return importlib.import_module(ENGINE_KINDS[kind])


def engine_settings(section: dict):
    """(the kind's module, its settings) of a config's `engine:` section: `kind` one of ENGINE_KINDS,
    the other keys those of the kind's settings (unknown ones refused, naming the valid ones)."""
    from dualner.config import build_dataclass
    kind = section.get("kind", DEFAULT_KIND)
    if kind not in ENGINE_KINDS:
        raise ConfigError(f"engine.kind: {kind!r} is not one of {list(ENGINE_KINDS)}")
    module = _kind_module(kind)
    own = {key: value for key, value in section.items() if key != "kind"}
    try:
        return module, build_dataclass(module.SETTINGS, own, prefix="engine")
    except ConfigError as error:
        raise ConfigError(f"{error} (the keys of engine.kind={kind}; a section of another kind: "
                          f"engine='{{kind: {kind}, ...}}' replaces it whole)") from None


def check_engine(cfg: "Config", stage: int | None, world_size: int | None, parser: bool) -> None:
    """The `engine:` section's keys always; with a stage, the rules of training with it (the engine's
    own parser too where `parser`)."""
    module, settings = engine_settings(cfg.engine)
    if stage is not None:
        module.check_config(settings, cfg, world_size, parser)


@dataclass(frozen=True)
class ConfigRules:
    """The engines' rules as dualner.config asks them (dualner.config.EngineRules): handed to its
    `load_config` / `validate` by the layers that know both (dualner.build, the CLI)."""

    parser: bool  # run the engine's own parser too (a job runs it later anyway, with the real layout)
    kinds: tuple[str, ...] = tuple(ENGINE_KINDS)

    def file_mistake(self, tree: dict, path: Path) -> str | None:
        return config_file_mistake(tree, path)

    def problems(self, cfg: "Config", stage: int | None, world_size: int | None) -> list[str]:
        try:
            check_engine(cfg, stage, world_size, self.parser)
        except ConfigError as error:
            return [str(error)]
        return []


def launch_world_size() -> int | None:
    """The job's number of ranks before its process group starts: the process group's where one
    exists already, else as comm.init_distributed will find it (WORLD_SIZE from torchrun or deepspeed,
    srun's SLURM_NTASKS, 1 for a plain `python`); None when the environment does not say (comm then
    refuses it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    value = comm.launch_ranks()["WORLD_SIZE"]
    return int(value) if value.isdigit() and int(value) > 0 else None


def prepare_engine(cfg: "Config", layout: "BatchLayout", device: torch.device) -> EngineSetup:
    """The job's engine setup: its settings read and checked for this layout and device (the engine's
    own parser included), nothing built."""
    module, settings = engine_settings(cfg.engine)
    return module.prepare(settings, layout, device, cfg.train.cpu_bf16)


def config_file_mistake(tree: dict, path: Path) -> str | None:
    """An engine's own config file given as the experiment config: what to do instead."""
    for kind in ENGINE_KINDS:
        mistake = getattr(_kind_module(kind), "config_file_mistake", lambda *_: None)(tree, path)
        if mistake:
            return mistake
    return None


def written_by(checkpoint: Path, record: dict) -> str | None:
    """The engine kind whose files `checkpoint` holds: its COMPLETE record's, else told by the files."""
    if record.get("engine") in ENGINE_KINDS:
        return record["engine"]
    return next((kind for kind in ENGINE_KINDS if _kind_module(kind).writes(checkpoint)), None)


def check_resume(setup: EngineSetup, checkpoint: Path, record: dict) -> None:
    """Can this job's engine continue `checkpoint`? Refused (CheckpointError) before anything is
    written where another engine kind wrote it or the engine says no."""
    kind = written_by(checkpoint, record)
    if kind is not None and kind != setup.kind:
        raise CheckpointError(
            f"run.resume: {checkpoint} was written by engine.kind={kind}, and this job's engine is "
            f"engine.kind={setup.kind}; the two engines' states do not load into each other. Resume with "
            f"engine.kind={kind}, or start a new run from its weights (stage2.init_from, or run.overwrite=true)")
    setup.check_resume(checkpoint, record)


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights from a checkpoint of any engine, in one process, reading no code."""
    try:
        record = json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    kind = written_by(checkpoint, record if isinstance(record, dict) else {})
    if kind is None:
        raise CheckpointError(f"{checkpoint}: holds no engine's files (neither {' nor '.join(ENGINE_KINDS)})")
    return _kind_module(kind).consolidated_state_dict(checkpoint)
