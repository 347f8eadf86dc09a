"""`dualner config --check`: a config judged as its job will judge it (every rule, the engine's
included, for the job's stage and world size) and the files it names looked for, before any rank
starts. The command line itself: dualner.cli.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dualner import backend
from dualner.config import Config, ConfigError, inferred_stage, load_config
from dualner.data.sources import refuse_shared_files
from dualner.data.source_kinds import expand_files
from dualner.errors import MissingPathError


def load_checked(path: str, overrides: list[str], stage: int | None = None, world_size: int | None = None) -> Config:
    """A config loaded with every rule, the engine's own parser's included (a refusal before any rank
    starts)."""
    return load_config(path, overrides, stage=stage, world_size=world_size, engine=backend.ConfigRules(parser=True))


def check_as_the_job(cfg: Config, path: str, overrides: list[str], given_stage: int | None,
                     given_world_size: int | None) -> str:
    """`config --check`: the rules the job applies, for the stage and world size given, else for those
    the job would take (the stage the config is for; the ranks of a launch from this environment).
    Says what it assumed, in its "ok" line and in a refusal."""
    stage, why = (given_stage, "") if given_stage else inferred_stage(cfg)
    world_size = given_world_size or backend.launch_world_size()
    scope = [f"stage {stage}" + (f" inferred: {why}; --stage {3 - stage} for the other" if why else ""),
             f"{world_size or 'unknown'} rank(s)"
             + ("" if given_world_size else " assumed: --world-size N for another")]
    if not given_stage or not given_world_size:
        try:
            load_checked(path, overrides, stage, world_size)
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
        refuse_shared_files({f"data.train.{language}": [path] for language, path in cfg.data.train.items()})
    if stage != 2:
        return
    if not Path(cfg.stage2.init_from).expanduser().exists():  # a job script may check before stage 1 has run
        print(f"dualner config --check: note: stage2.init_from={cfg.stage2.init_from} does not exist yet; the "
              f"stage-2 job needs it (the stage-1 run's folder or a step-N checkpoint)", file=sys.stderr)
    files = {f"data.train.{language}": [path] for language, path in cfg.data.train.items()}
    for group in ("target", "translations"):
        for language, pattern in getattr(cfg.stage2, group).items():
            files[f"stage2.{group}.{language}"] = expand_files(pattern, f"stage2.{group}.{language}")
    refuse_shared_files(files)  # one file under two keys would be trained twice
