"""Shared command-line shape of the training launchers: --config FILE plus key=value overrides."""

from __future__ import annotations

import argparse
import sys

from dualner.config import Config, ConfigError, load_config


def parse_training_args(description: str, argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML experiment file (configs/*.yaml)")
    # The `deepspeed` launcher appends --local_rank; LOCAL_RANK in the environment is what we use.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-5")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as error:
        sys.exit(f"config error: {error}")
