"""The rules across a config's fields that the config decides alone (`validate`), and the few
questions about a config that the rest of the package asks (the evaluation head, the batch split,
the stage a config is for, the stage-1 run of stage 2).

The config knows no engine: the `engine:` section's rules are the backend's, handed to `validate` by
the layer that knows both (dualner.build, the CLI) as an `EngineRules`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection, Protocol

from dualner.config.schema import Config, TrainConfig
from dualner.errors import ConfigError
from dualner.run_layout import STEP_DIR, RunLayout

# `hf:NAME[:CONFIG]@SPLIT`: a corpus streamed with `datasets` (dualner.data.hub_source reads it)
HUB_PREFIX = "hf:"

# The heads each variant trains, by the head evaluation reads (SPEC "Ablations and variants").
_TRAINED_HEADS = {"mlt": {"span", "seq"}, "cla": {"seq"}, "span": {"span"}}


class EngineRules(Protocol):
    """What the config asks of the engines without knowing them (dualner.backend.ConfigRules)."""

    kinds: Collection[str]  # engine kinds; a top-level section named after one is an old engine section

    def file_mistake(self, tree: dict, path: Path) -> str | None: ...  # an engine's own file given as --config
    def problems(self, cfg: Config, stage: int | None, world_size: int | None) -> list[str]: ...


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
             engine: EngineRules | None = None) -> None:
    """Every rule across fields that the config (and the engine's files it names) decides alone, in one
    place, so that a job script can refuse a config before any rank starts (`dualner config --check`).
    Every broken rule is reported at once: one ConfigError listing them all, each naming its keys.

    - always: the evaluation head is one the variant trains; with `world_size` (the number of ranks),
      the global batch divides over the ranks and the micro batch divides each rank's share.
    - `stage` (1 or 2: this config is about to train that stage): the stage's own rules (stage 1 needs
      data.train and an encoder; stage 2 needs stage2.init_from outside run.output_dir, exactly one of
      train.max_steps / stage2.epochs, stage2.epochs only with stage2.mix=size and
      train.batch_unit=sentences, stage2.mix=size only with corpora that tell their size (no `hf:`
      dataset), and model.variant=mlt), and those of every training run: a run folder;
      eval.select_on=source needs the source's dev set; data.pack_length holds a window; token
      batches need packing and a micro batch of whole rows.
    - `engine` (the backend's rules, given by the layer above): the `engine:` section's keys for its
      kind always; with a stage, its files and what it supports, with `world_size` for that many ranks.

    What needs more than the config stays where it is read, later: the encoder (its vocabulary,
    positions, packable family: dualner.limits, the collator), the data (files, the global batch
    against the data, corpora, translation pairs), the stage-1 run of stage 2 (its encoder, split),
    the run folder (output_dir writable, its earlier run), the machine (fp16 on a CPU, bf16 on the
    GPU, the fused AdamW kernel), and the names in train.loss_weights (the stage's loss terms are its
    recipe's TERMS, a registry in code that a new term joins without touching this file).
    """
    if stage not in (None, 1, 2):
        raise ConfigError(f"stage {stage!r}: expected 1 or 2")
    if world_size is not None and world_size < 1:
        raise ConfigError(f"world size {world_size}: expected at least 1")
    problems = config_problems(cfg, stage, world_size)
    if engine is not None:
        problems += engine.problems(cfg, stage, world_size)
    problems = list(dict.fromkeys(problems))  # a rule both sides check (the batch split) is one problem
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems: " + "; ".join(f"({number}) {problem}"
                                                                     for number, problem in enumerate(problems, 1)))


def config_problems(cfg: Config, stage: int | None, world_size: int | None) -> list[str]:
    """validate's rules but the engine's: the message of each one broken."""
    problems = []
    head = evaluation_head(cfg.model.variant, cfg.eval.head)
    if head not in _TRAINED_HEADS[cfg.model.variant]:
        problems.append(f"eval.head={cfg.eval.head} reads a head that model.variant={cfg.model.variant} never "
                        f"trains; use eval.head=auto (or {sorted(_TRAINED_HEADS[cfg.model.variant])[0]})")
    if world_size is not None:
        try:
            batch_split(cfg.train, world_size)
        except ConfigError as error:
            problems.append(str(error))
    if stage is None:
        return problems
    problems += _stage1_problems(cfg) if stage == 1 else _stage2_problems(cfg)
    return problems + _training_problems(cfg)


def _stage1_problems(cfg: Config) -> list[str]:
    problems = []
    if not cfg.data.train:
        problems.append("data.train: no labeled training file given (language: path)")
    if not cfg.model.encoder.strip():
        problems.append("model.encoder is empty; name a model folder, a hub name or a built-in alias "
                        "(multilingual-e5-small, tiny-random)")
    return problems


def _stage2_problems(cfg: Config) -> list[str]:
    stage2, problems = cfg.stage2, []
    if not stage2.init_from:
        problems.append("stage2.init_from: name the stage-1 run folder or step-N checkpoint")
    if (cfg.train.max_steps is None) == (stage2.epochs is None):
        problems.append("stage 2's length: set train.max_steps (optimizer steps) or stage2.epochs (passes over "
                        "the mixed corpus), one of them")
    if stage2.epochs is not None and (stage2.mix != "size" or cfg.train.batch_unit != "sentences"):
        problems.append("stage2.epochs counts passes over the mixed corpus: it needs stage2.mix=size and "
                        "train.batch_unit=sentences")
    if stage2.mix == "size":
        problems += [f"stage2.{group}.{language}: stage2.mix=size counts every corpus's sentences, which a hub "
                     f"dataset ({pattern}) does not tell in advance; use stage2.mix=equal"
                     for group in ("target", "translations")
                     for language, pattern in getattr(stage2, group).items() if pattern.startswith(HUB_PREFIX)]
    if cfg.model.variant != "mlt":
        problems.append(f"model.variant={cfg.model.variant}: dual teaching needs both heads (mlt)")
    if cfg.run.output_dir.strip() and stage2.init_from:
        try:
            refuse_output_over_init_from(cfg.run.output_dir, stage2.init_from)
        except ConfigError as error:
            problems.append(str(error))
    return problems


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


def _training_problems(cfg: Config) -> list[str]:
    """The rules of every training run, whichever the stage."""
    problems = []
    if not cfg.run.output_dir.strip():  # it would be the working folder
        problems.append("run.output_dir is empty; name the run folder (runs/<name>)")
    if cfg.eval.select_on == "source" and cfg.data.source_language not in cfg.data.dev:
        problems.append(f"eval.select_on=source needs data.dev.{cfg.data.source_language}")
    if cfg.train.batch_unit == "tokens" and cfg.data.packing is False:
        problems.append("train.batch_unit=tokens needs packed rows (data.packing=true and an "
                        "encoder family dualner.attention knows)")
    row_length = cfg.data.pack_length or cfg.data.max_length
    if row_length < cfg.data.max_length:
        problems.append(f"data.pack_length={row_length} must hold a whole window "
                        f"(data.max_length={cfg.data.max_length})")
    if cfg.train.batch_unit == "tokens" and cfg.train.micro_batch_size % row_length:
        problems.append(f"train.micro_batch_size={cfg.train.micro_batch_size} tokens is not a whole "
                        f"number of rows of data.pack_length={row_length}")
    return problems


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


def inferred_stage(cfg: Config) -> tuple[int, str]:
    """The stage a config is for, when no one says: 2 where it names what only stage 2 reads (its
    stage-1 model, target or translation corpora), else 1; and why, for the user to see."""
    stage2_keys = [f"stage2.{name}" for name in ("init_from", "target", "translations") if getattr(cfg.stage2, name)]
    if stage2_keys:
        return 2, f"it sets {', '.join(stage2_keys)}"
    return 1, "no stage2.init_from, target or translations"
