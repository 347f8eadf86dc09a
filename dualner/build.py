"""One build order for both stages (torchtitan's TrainSpec): a stage supplies what is its own as
callables in a `TrainSpec` (its inputs, model, engines, data and recipe), and `build` owns the order:

    settle the config -> validate it (once, every problem at once) -> freeze it -> start the job ->
    inputs -> model -> engines -> run folder -> data -> recipe -> trainer

The inputs (every file read and checked: encoder, data, the stage-1 run) come before anything is
built or written, so that a bad input is refused with nothing created; the model is built before
the engine, the engine before the folder is opened (a refused engine leaves the folder untouched),
and the data that remembers its position in the run folder after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol

import torch

from dualner import backend
from dualner.config import Config, freeze, thawed_copy, validate
from dualner.config.loading import attributed
from dualner.errors import ConfigError
from dualner.job import Job, start_job
from dualner.labels import LabelSet
from dualner.model_io import save_model_assets
from dualner.recipe import Recipe
from dualner.run_folder import RunFolder
from dualner.train import Trainer, assemble


class StageInputs(Protocol):
    """What every stage's inputs tell the build (a stage's own dataclass holds more)."""

    tokenizer: Any
    label_set: LabelSet
    total_steps: int


class Engines(NamedTuple):
    student: backend.TrainingEngine
    teacher: backend.TeacherEngine | None = None


def student_engine(job: Job, inputs: StageInputs, model: torch.nn.Module) -> Engines:
    """The engines of a stage that trains one model."""
    return Engines(job.build_engine(model, inputs.total_steps))


def settled_as_given(cfg: Config) -> None:
    """A stage whose config needs nothing from elsewhere before its validation."""


@dataclass(frozen=True)
class TrainSpec:
    stage: int  # 1 or 2: the rules its config is validated by
    read_inputs: Callable[[Job], StageInputs]  # every input read and checked; nothing built or written
    build_model: Callable[[Job, StageInputs], torch.nn.Module]  # the model the student engine trains
    build_data: Callable[[Job, StageInputs, RunFolder], Any]  # what the recipe reads, once the folder is open
    build_recipe: Callable[[Job, StageInputs, Engines, RunFolder, Any], Recipe]
    build_engines: Callable[[Job, StageInputs, torch.nn.Module], Engines] = student_engine
    # what the config takes from elsewhere before it is validated (stage 2: the stage-1 run's encoder)
    settle: Callable[[Config], None] = settled_as_given


def build(spec: TrainSpec, cfg: Config) -> Trainer:
    """The trainer of `spec`'s stage for `cfg`, built in the one order (the module's docstring). The
    job's config is its own copy, validated once and frozen: what was checked is what runs."""
    cfg = thawed_copy(cfg)
    spec.settle(cfg)
    world_size, rules = backend.launch_world_size(), backend.ConfigRules(parser=False)  # parser: in start_job
    try:
        validate(cfg, spec.stage, world_size, rules)
    except ConfigError as error:  # named as the launcher's loading names its mistakes: the file or an override
        raise attributed(error, getattr(cfg, "origin", None), spec.stage, world_size, rules) from None
    job = start_job(freeze(cfg), spec.stage)
    inputs = spec.read_inputs(job)
    model = spec.build_model(job, inputs)
    engines = spec.build_engines(job, inputs, model)
    # the encoder's config as trained (model.encoder_dropout included): stage 2 builds from it
    folder = RunFolder.open(job.cfg, job.folder_plan, job.engine_setup, job.log,
                            lambda run_dir: save_model_assets(run_dir, inputs.tokenizer, model.encoder.config,
                                                              inputs.label_set, cfg.model.variant,
                                                              cfg.data.max_length))
    data = spec.build_data(job, inputs, folder)
    recipe = spec.build_recipe(job, inputs, engines, folder, data)
    return assemble(job, engines.student, folder, recipe, inputs.total_steps, inputs.label_set,
                    inputs.tokenizer.pad_token_id)
