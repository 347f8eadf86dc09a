"""DeepSpeed's JSON (engine.config) as read for both the rules of engine.kind=deepspeed
(dualner.backend.deepspeed_config) and its engine (dualner.backend.deepspeed_engine): a file holding one
JSON object with a known ZeRO stage, no optimizer or scheduler, and batch keys that agree with the
derived ones.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from dualner.config.loading import unique_keys
from dualner.errors import ConfigError

KIND = "deepspeed"
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def read_deepspeed_json(name: str | Path) -> tuple[dict, Path]:
    """engine.config's JSON: a file holding a JSON object whose zero_optimization.stage is known."""
    path = Path(name)
    if path.is_dir():
        raise ConfigError(f"engine.config: {path} is a folder; name a JSON file (ds_configs/*.json)")
    if not path.is_file():
        raise ConfigError(f"engine.config: file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ConfigError(f"engine.config: {path} is empty; a DeepSpeed config is a JSON object (ds_configs/*.json)")
        ds_config = json.loads(text, object_pairs_hook=functools.partial(unique_keys, path))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    if not isinstance(ds_config, dict):
        raise ConfigError(f"{path}: a DeepSpeed config is a JSON object ({{...}}), found a {type(ds_config).__name__}")
    if not isinstance(ds_config.get("zero_optimization", {}), dict):
        raise ConfigError(f"{path}: zero_optimization must be an object")
    stage = zero_stage(ds_config)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if "optimizer" in ds_config or "scheduler" in ds_config:
        raise ConfigError(f"{path}: optimizer and scheduler come from the train section "
                          f"(AdamW, warmup then linear decay); remove them from the JSON")
    return ds_config, path


def zero_stage(ds_config: dict) -> Any:
    """The JSON's ZeRO stage (0 when it names none)."""
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def check_deepspeed_batch_sizes(ds_config: dict, path: Path, global_batch: int, micro: int, accumulation: int,
                                world_size: int) -> dict:
    """The three batch sizes derived for `world_size` ranks; one the JSON sets must agree."""
    derived = dict(zip(BATCH_KEYS, (global_batch, micro, accumulation)))
    for key, value in derived.items():
        if key in ds_config and ds_config[key] != value:
            raise ConfigError(
                f"{path}: {key}={ds_config[key]!r} disagrees with {value} derived from "
                f"train.global_batch_size={global_batch} on {world_size} rank(s); "
                f"remove it from the JSON or make them agree")
    return derived
