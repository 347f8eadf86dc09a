"""engine.kind=deepspeed: its settings (`engine.config`, a ds_configs JSON), the JSON's own rules
(a known ZeRO stage, no optimizer or scheduler, the three batch keys agreeing with the derived ones)
and what its checkpoints are (file names, ZeRO stage, precision) for the question "can this
checkpoint resume here". The engine itself: dualner.backend.deepspeed_engine.

The JSON files are read, never rewritten. The only keys the code fills are the three batch sizes,
which depend on the world size; when the JSON sets one of them it must agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dualner.backend import deepspeed_files
from dualner.backend.deepspeed_json import (BATCH_KEYS, KIND, check_deepspeed_batch_sizes, read_deepspeed_json,
                                            zero_stage)
from dualner.config import Config, ConfigError, TrainConfig, batch_split
from dualner.errors import CheckpointError


@dataclass
class DeepSpeedSettings:
    """The `engine:` section's keys under kind: deepspeed."""
    config: str = "ds_configs/zero2.json"  # the DeepSpeed JSON (ds_configs/*.json), relative to the working folder


def check_config(settings: DeepSpeedSettings, cfg: Config, world_size: int | None, parser: bool) -> None:
    """The rules of training with this JSON that the config decides alone; `parser`: DeepSpeed's own
    parser as well, with batch sizes for the process's world (one rank before the process group
    starts: the job's world size is checked above), which imports DeepSpeed (seconds, once)."""
    ds_config, path = read_deepspeed_json(settings.config)
    if world_size is not None:
        check_deepspeed_batch_sizes(ds_config, path, cfg.train.global_batch_size,
                                    *batch_split(cfg.train, world_size), world_size)
    if cfg.model.compile and zero_stage(ds_config) == 3:
        raise ConfigError("model.compile=true works with ZeRO stages 0-2 (ZeRO-3 gathers "
                          "parameters inside the module)")
    if parser:
        from dualner.backend import comm
        from dualner.backend.deepspeed_engine import check_with_deepspeed
        ranks = comm.current().world_size
        micro, accumulation = batch_split(cfg.train, world_size or ranks)
        parsed = {key: value for key, value in ds_config.items() if key not in BATCH_KEYS}
        parsed |= dict(zip(BATCH_KEYS, (micro * accumulation * ranks, micro, accumulation)))
        check_with_deepspeed(parsed, path)


def config_file_mistake(tree: dict, path: Path) -> str | None:
    """A DeepSpeed JSON given where the experiment config belongs: what to do instead."""
    if "zero_optimization" in tree:
        return (f"{path} is a DeepSpeed JSON, not an experiment config: give it as engine.config={path} "
                f"and --config a YAML file (configs/*.yaml)")
    return None


# -- its checkpoints -------------------------------------------------------------------------------
def writes(checkpoint: Path) -> bool:
    """Whether `checkpoint` holds DeepSpeed's files (model states of ZeRO-0, or ZeRO 1-3 partitions)."""
    return any(checkpoint.glob("*model_states.pt"))


def checkpoint_zero_stage(record: dict, checkpoint: Path) -> int | None:
    """The ZeRO stage a checkpoint was written under: recorded in its COMPLETE record; for older
    checkpoints told by the file names (ZeRO-3 only: 0-2 look alike), else None."""
    if isinstance(record.get("zero_stage"), int):
        return record["zero_stage"]
    return 3 if any(checkpoint.glob("zero_pp_rank_*_model_states.pt")) else None


@dataclass
class DeepSpeedSetup:
    """A job's DeepSpeed engine before it is built: the JSON as it will run (batch sizes derived into
    it, the precision the device runs), and what it answers about checkpoints."""

    settings: DeepSpeedSettings
    ds_config: dict
    device: torch.device
    cpu_bf16: str
    kind: str = KIND

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)

    def describe(self) -> str:
        return f"DeepSpeed ZeRO stage {self.zero_stage} from {self.settings.config} (batch sizes derived into it)"

    def check_resume(self, checkpoint: Path, record: dict) -> None:
        """Refused before anything is written: a checkpoint of another ZeRO stage (its partitions do
        not load into this one's)."""
        written = checkpoint_zero_stage(record, checkpoint)
        # checkpoints that do not record it: ZeRO-3's files are told apart by their names, 0-2 are not
        differs = written != self.zero_stage if written is not None else self.zero_stage == 3
        if differs:
            told = f"ZeRO stage {written}" if written is not None else "ZeRO stage 0, 1 or 2"
            raise CheckpointError(
                f"run.resume: {checkpoint} was written under {told}, but engine.config={self.settings.config} "
                f"is stage {self.zero_stage}; resume with a DeepSpeed JSON of the checkpoint's stage, or start a new "
                f"run (run.overwrite=true, or another run.output_dir)")

    def continuing(self, checkpoint: Path, record: dict) -> "DeepSpeedSetup":
        """The setup a resumed run continues in: the precision its checkpoint was trained in."""
        from dualner.backend.deepspeed_engine import resume_precision
        written = record.get("precision") if isinstance(record.get("precision"), str) else None
        ds_config = resume_precision(self.ds_config, Path(self.settings.config), self.device, self.cpu_bf16,
                                     checkpoint, written)
        return DeepSpeedSetup(self.settings, ds_config, self.device, self.cpu_bf16)

    def build(self, model: torch.nn.Module, train: TrainConfig, total_steps: int, compile_encoder: bool = False,
              fixed_shapes: bool = False):
        from dualner.backend.deepspeed_engine import DeepSpeedTrainingEngine
        return DeepSpeedTrainingEngine(model, self.ds_config, train, total_steps, compile_encoder=compile_encoder,
                                       fixed_shapes=fixed_shapes)

    def build_teacher(self, model: torch.nn.Module, placement: str):
        from dualner.backend.deepspeed_engine import build_teacher
        return build_teacher(model, self.ds_config, placement)


def prepare(settings: DeepSpeedSettings, layout, device: torch.device, cpu_bf16: str) -> DeepSpeedSetup:
    from dualner.backend.deepspeed_engine import load_deepspeed_config
    return DeepSpeedSetup(settings, load_deepspeed_config(settings.config, layout, device, cpu_bf16), device, cpu_bf16)


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    return deepspeed_files.consolidated_state_dict(checkpoint)


SETTINGS = DeepSpeedSettings
