"""Everything that knows about devices, process groups and the distributed engine.

- `comm`: the process group, rank facts and every collective (host values over gloo, device values
  on the accelerator).
- `deepspeed_engine`: the DeepSpeed implementation of the engines below, checkpoint files and their
  consolidation.
- `optimizer`: fused AdamW and the learning-rate schedule, shared by backends.
- `placement`: host batches to the device (pinned memory, non-blocking copies).

Outside this package the project names no DeepSpeed module, class or attribute (tests/test_structure.py
checks): it builds engines with the functions below and uses them through `TrainingEngine` and
`TeacherEngine`. A second backend (FSDP2, say) is one more module implementing these two, chosen here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from dualner.config import TrainConfig
    from dualner.data.batching import BatchLayout


class TrainingEngine(Protocol):
    """The student. A step: `accumulation_steps` x (`engine(**inputs)`, `backward(loss)`), then
    `optimizer_step()`. Nothing here waits for the device."""

    device: torch.device
    module: torch.nn.Module
    zero_stage: int
    last_step_flag: torch.Tensor  # on the device: 1.0 when the last optimizer step was skipped on every rank

    @property
    def accumulation_steps(self) -> int: ...
    def __call__(self, *args, **kwargs): ...
    def backward(self, loss: torch.Tensor) -> torch.Tensor: ...  # its device flag: 1.0 when not finite
    def optimizer_step(self) -> None: ...
    def train(self) -> None: ...
    def eval(self) -> None: ...
    def lr(self) -> float: ...
    def save(self, root: Path, tag: str, client_state: dict) -> None: ...
    def load(self, path: Path, world_size: int | None = None) -> dict: ...  # returns the client state


class TeacherEngine(Protocol):
    """The frozen teacher of stage 2: forwards without gradients; `copy_from` takes the student's
    weights (every rank calls it)."""

    module: torch.nn.Module

    def __call__(self, *args, **kwargs): ...
    def copy_from(self, student: TrainingEngine) -> None: ...


def load_engine_config(path: str | Path, layout: "BatchLayout", device: torch.device | None = None,
                       cpu_bf16: str = "auto") -> dict:
    """The engine's config file (ds_configs/*.json), checked, with the batch sizes derived into it
    and, on a CPU, the precision train.cpu_bf16 chooses."""
    from dualner.backend.deepspeed_engine import load_deepspeed_config
    return load_deepspeed_config(path, layout, device, cpu_bf16)


def keep_run_precision(engine_config: dict, path: str | Path, device: torch.device, cpu_bf16: str,
                       checkpoint: Path, written: str | None) -> dict:
    """The engine config a resumed run continues in: the precision its checkpoint was trained in
    (`written`, from its COMPLETE record), or a refusal where the two cannot load into each other."""
    from dualner.backend.deepspeed_engine import resume_precision
    return resume_precision(engine_config, Path(path), device, cpu_bf16, checkpoint, written)


def check_engine_config(engine_config: dict, path: Path) -> None:
    """The engine's own parser on a config (its rejections and the keys it never reads refused)."""
    from dualner.backend.deepspeed_engine import _check_with_deepspeed
    _check_with_deepspeed(engine_config, Path(path))


def zero_stage(engine_config: dict) -> int:
    from dualner.config import zero_stage as stage_of  # the one reading of the JSON's stage
    return stage_of(engine_config)


def build_training_engine(model: torch.nn.Module, engine_config: dict, train: "TrainConfig", total_steps: int,
                          compile_encoder: bool = False, fixed_shapes: bool = False) -> TrainingEngine:
    from dualner.backend.deepspeed_engine import DeepSpeedTrainingEngine
    return DeepSpeedTrainingEngine(model, engine_config, train, total_steps, compile_encoder=compile_encoder,
                                   fixed_shapes=fixed_shapes)


def build_teacher(model: torch.nn.Module, engine_config: dict, placement: str) -> TeacherEngine:
    """stage2.teacher_placement: a whole replica on each rank, or partitioned like the student."""
    from dualner.backend.deepspeed_engine import build_teacher as build
    return build(model, engine_config, placement)


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights from a checkpoint of any ZeRO stage, in one process, reading no code."""
    from dualner.backend.deepspeed_engine import consolidated_state_dict as consolidate
    return consolidate(checkpoint)
