"""The DeepSpeed engine: ds_configs JSON validated, batch sizes derived, AdamW + warmup/decay.

The JSON files are read, never rewritten. The only keys the code fills are the three batch sizes,
which depend on the world size; when the JSON sets one of them it must agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dualner.config import ConfigError, TrainConfig

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True)
class BatchLayout:
    global_batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    world_size: int


def derive_batch_layout(train: TrainConfig, world_size: int) -> BatchLayout:
    """Keep the global batch whatever the world size: global = micro x accumulation x world."""
    if train.global_batch_size % world_size:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} is not divisible by "
                          f"the world size {world_size}")
    per_rank = train.global_batch_size // world_size
    micro = min(train.micro_batch_size, per_rank)
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_size={micro} does not divide the {per_rank} sentences "
                          f"each of {world_size} rank(s) takes per step of "
                          f"train.global_batch_size={train.global_batch_size}")
    return BatchLayout(train.global_batch_size, micro, per_rank // micro, world_size)


def load_deepspeed_config(path: str | Path, layout: BatchLayout) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: file not found: {path}")
    try:
        ds_config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from error
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    derived = dict(zip(_BATCH_KEYS, (layout.global_batch_size, layout.micro_batch_size,
                                     layout.accumulation_steps)))
    for key, value in derived.items():
        if key in ds_config and ds_config[key] != value:
            raise ConfigError(
                f"{path}: {key}={ds_config[key]} disagrees with {value} derived from "
                f"train.global_batch_size={layout.global_batch_size} on {layout.world_size} rank(s); "
                f"remove it from the JSON or make them agree")
    if "optimizer" in ds_config or "scheduler" in ds_config:
        raise ConfigError(f"{path}: optimizer and scheduler come from the train section "
                          f"(AdamW, warmup then linear decay); remove them from the JSON")
    return {**ds_config, **derived}


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def warmup_linear_decay(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "LayerNorm" in name or "norm" in name else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr)


def build_engine(model: torch.nn.Module, ds_config: dict, train: TrainConfig, total_steps: int):
    """Wrap the model in a DeepSpeed engine (ZeRO stage and precision from the JSON)."""
    import deepspeed

    optimizer = build_optimizer(model, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear_decay(train.warmup_steps, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine
