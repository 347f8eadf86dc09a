"""The DeepSpeed engine (engine.kind=deepspeed): ds_configs JSON checked by DeepSpeed's parser, the
training engine (ZeRO 0-3, bf16/fp16/fp32, fused AdamW + warmup/decay), the frozen teacher engine,
checkpoint files and their consolidation. Every `import deepspeed` of the project is in this file;
the JSON's own rules and what its checkpoints are: dualner.backend.deepspeed_config.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from dualner.backend import comm
from dualner.backend.deepspeed_files import to_universal, written_by_ranks
from dualner.backend.deepspeed_json import KIND, check_deepspeed_batch_sizes, read_deepspeed_json, zero_stage
from dualner.backend.optimizer import SkippableStep, build_optimizer, warmup_linear_decay
from dualner.backend.teacher import ReplicaTeacher
from dualner.config import TrainConfig
from dualner.errors import CheckpointError, ConfigError
from dualner.data.batching import BatchLayout



def load_deepspeed_config(path: str | Path, layout: BatchLayout, device: torch.device | None = None,
                          cpu_bf16: str = "auto") -> dict:
    """The JSON, checked before anything is written: valid JSON holding an object, a known ZeRO stage,
    batch sizes agreeing with the derived ones, no optimizer/scheduler, a precision the device runs
    (bf16 on a CPU as train.cpu_bf16 decides), and every key one DeepSpeed reads (unknown keys refused
    with the valid ones listed; DeepSpeed's own rejections reported as one line)."""
    ds_config, path = read_deepspeed_json(path)  # the checks dualner.config.validate also makes (dualner.backend.deepspeed_json)
    derived = check_deepspeed_batch_sizes(ds_config, path, layout.global_batch_size, layout.micro_batch_size,
                                          layout.accumulation_steps, layout.world_size)
    merged = {**ds_config, **derived}
    _check_precision(merged, path, device)
    merged = cpu_precision(merged, path, device, cpu_bf16)
    check_with_deepspeed(merged, path)
    return merged


def _enabled(value) -> bool:
    """A JSON `enabled` as DeepSpeed's parser reads it ("false" in quotes is false)."""
    return value.strip().lower() in ("true", "1", "yes", "on") if isinstance(value, str) else bool(value)


def _bf16_sections(ds_config: dict) -> list[str]:
    """The config's sections that compute in bf16: DeepSpeed's bf16 engine or torch autocast to bf16."""
    sections = []
    for key in ("bf16", "bfloat16"):
        if isinstance(ds_config.get(key), dict) and _enabled(ds_config[key].get("enabled")):
            sections.append(key)
    if _autocast_dtype(ds_config) == torch.bfloat16:
        sections.append("torch_autocast")
    return sections


def precision_of(ds_config: dict) -> str:
    """What a config trains in: "bf16", "fp16" (DeepSpeed's engines or torch autocast) or "fp32"."""
    if _bf16_sections(ds_config):
        return "bf16"
    fp16 = ds_config.get("fp16")
    if (isinstance(fp16, dict) and _enabled(fp16.get("enabled"))) or _autocast_dtype(ds_config) == torch.float16:
        return "fp16"
    return "fp32"


def resume_precision(ds_config: dict, path: Path, device: torch.device, choice: str, checkpoint: Path,
                     written: str | None) -> dict:
    """A run keeps the precision it was trained in: DeepSpeed's bf16 and fp32 optimizer states do not
    load into each other. Under train.cpu_bf16=auto on a CPU a run written in bf16 (on a CPU with
    bf16, or before this choice existed) or in fp32 (auto on a CPU without) continues so, with a log
    line; any other difference is refused before anything is written. Checkpoints that do not record
    their precision are loaded as they are."""
    now = precision_of(ds_config)
    if written is None or written == now:
        return ds_config
    from dualner.logging import get_logger
    as_written = read_deepspeed_json(path)[0]
    if (device.type == "cpu" and choice == "auto" and precision_of(as_written) == "bf16"
            and {written, now} == {"bf16", "fp32"}):
        if written == "bf16":
            get_logger().warning("precision: bf16, as %s was trained (train.cpu_bf16=auto keeps a run's precision); "
                                 "this CPU has no bf16 instructions, so its steps are slow: finish it on a CPU "
                                 "with bf16 or start a new run", checkpoint)
            return {**ds_config, **{key: {**ds_config[key], "enabled": True}
                                    for key in _bf16_sections(as_written)}}
        get_logger().info("precision: fp32, as %s was trained (train.cpu_bf16=auto keeps a run's precision)",
                          checkpoint)
        return cpu_precision(ds_config, path, device, "fp32")
    raise CheckpointError(
        f"run.resume: {checkpoint} was trained in {written}, but this job would train in {now} "
        f"(engine.config={path}, train.cpu_bf16={choice}); the optimizer states of the two do not load "
        f"into each other. Resume with the run's precision, or start a new run (run.overwrite=true, or "
        f"another run.output_dir)")


def cpu_precision(ds_config: dict, path: Path, device: torch.device | None, choice: str) -> dict:
    """train.cpu_bf16 on a CPU: the config as written ("bf16", or "auto" on a CPU with bf16
    instructions), or a copy with its bf16 sections switched off, so the job trains in fp32 ("fp32",
    or "auto" on a CPU without them: torch's bf16 matmuls then run a reference kernel, 46x slower
    than fp32 in the issue's measurement and bench/cpu_precision.py). The file is not rewritten; the
    log says what ran and why."""
    sections = _bf16_sections(ds_config)
    if device is None or device.type != "cpu" or not sections or choice == "bf16":
        return ds_config
    from dualner.backend.placement import cpu_has_bf16
    from dualner.logging import get_logger
    if choice == "auto" and cpu_has_bf16():
        get_logger().info("precision: bf16 as %s sets it (this CPU has bf16 instructions)", path)
        return ds_config
    reason = ("train.cpu_bf16=fp32" if choice == "fp32" else
              "train.cpu_bf16=auto and this CPU has no bf16 instructions (AVX-512 BF16 / AMX / Arm BF16), "
              "where bf16 runs tens of times slower than fp32; train.cpu_bf16=bf16 keeps bf16")
    get_logger().warning("precision: fp32 instead of the bf16 of %s (%s): %s", path, ", ".join(sections), reason)
    return {**ds_config, **{key: {**ds_config[key], "enabled": False} for key in sections}}


def _check_precision(ds_config: dict, path: Path, device: torch.device | None) -> None:
    fp16 = ds_config.get("fp16", {}).get("enabled", False) if isinstance(ds_config.get("fp16"), dict) else False
    bf16 = ds_config.get("bf16", {}).get("enabled", False) if isinstance(ds_config.get("bf16"), dict) else False
    if device is None:
        return
    if fp16 and device.type == "cpu":
        raise ConfigError(f"{path}: fp16 does not run on a CPU; use a bf16 or fp32 config "
                          f"(ds_configs/zero*_fp32.json, ds_configs/zero*.json)")
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{path}: this GPU has no bf16; use an fp16 config (ds_configs/zero*_fp16.json)")


class _ReadKeys(dict):
    """A dict that remembers which keys were looked up: DeepSpeed reads every key it knows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def check_with_deepspeed(ds_config: dict, path: Path) -> None:
    """Parse the JSON with DeepSpeed's own config class, as deepspeed.initialize will, and refuse
    the top-level keys it never reads (DeepSpeed ignores them silently: a typo would be lost)."""
    import deepspeed
    import torch.distributed
    from deepspeed.runtime.config import DeepSpeedConfig
    if torch.distributed.is_initialized():  # DeepSpeed's parser checks the batch sizes against its world size
        deepspeed.init_distributed(verbose=False)
    tracked = _ReadKeys(ds_config)
    try:
        DeepSpeedConfig(tracked)
    except Exception as error:  # noqa: BLE001 (pydantic and DeepSpeed's own errors, reported as one line)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = "; ".join(lines[:3])[:400]
        raise ConfigError(f"{path}: DeepSpeed rejects this config: {detail}") from None
    unknown = sorted(set(ds_config) - tracked.read)
    if unknown:
        raise ConfigError(f"{path}: unknown DeepSpeed key '{unknown[0]}'; valid top-level keys: "
                          f"{', '.join(sorted(key for key in tracked.read if key.islower()))}")


class DeepSpeedTrainingEngine:
    """The student (dualner.backend.TrainingEngine): a DeepSpeed engine around the model with fused
    AdamW. A step is `accumulation_steps` micro batches of `engine(**inputs)` and `backward(loss)`,
    then one `optimizer_step()`; a step whose loss was not finite on any rank is skipped by the
    optimizer on the device (no host synchronisation), and its flag (`last_step_flag`) kept on the
    device for the trainer to read one step later."""

    def __init__(self, model: torch.nn.Module, ds_config: dict, train: TrainConfig, total_steps: int,
                 compile_encoder: bool = False, fixed_shapes: bool = False):
        import deepspeed
        device = comm.accelerator_device(comm.current().local_rank)
        if compile_encoder:  # ZeRO 0-2 only (dualner.config.validate): ZeRO-3 gathers inside the module
            # Token budgets give every training micro batch one shape: one static graph (CUDA
            # graphs apply); evaluation's other shapes then recompile once as dynamic. Else every
            # micro batch has its own row count and width: dynamic from the start.
            model.encoder.compile(dynamic=None if fixed_shapes else True)
        optimizer = build_optimizer(model, train, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(train.warmup_steps, total_steps))
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config)
        self.device = self.engine.device
        self.zero_stage = zero_stage(ds_config)
        self.precision = precision_of(ds_config)  # recorded in each checkpoint's COMPLETE
        self._skip = SkippableStep(optimizer, self.device)
        if not self._skip.supported:
            raise ConfigError(f"no fused AdamW kernel on {self.device}: the non-finite guard needs it")
        # the last optimizer step's flag, reduced over ranks (1.0: skipped on every rank)
        self.last_step_flag = torch.zeros((), dtype=torch.float32, device=self.device)
        self.gradient_path = self._take_over_gradient_work()

    def _take_over_gradient_work(self) -> str:
        """At ZeRO-0 with fp32 parameters and gradients (the fp32 and torch-autocast configs; not
        DeepSpeed's fp16/bf16 wrappers, which keep their own gradient buffers), DeepSpeed clips with one
        norm kernel per parameter plus a collective, and at world size 1 still flattens every gradient
        into buckets, "all-reduces" them with itself and copies them back. The same arithmetic in a few
        launches: clipping with torch's foreach norm and scale (DeepSpeed still decides when to clip),
        and no reduction where there is nothing to reduce. DUALNER_DEEPSPEED_GRADIENTS=deepspeed keeps
        DeepSpeed's own path (the comparison in tests and benchmarks). Returns the path taken."""
        engine = self.engine
        if (os.environ.get("DUALNER_DEEPSPEED_GRADIENTS", "direct") == "deepspeed" or self.zero_stage != 0
                or engine.fp16_enabled() or engine.bfloat16_enabled()
                or engine.communication_data_type != torch.float32):
            return "deepspeed"
        self._trained = [p for p in engine.module.parameters() if p.requires_grad and p.numel() > 0]
        engine.clip_fp32_gradients = self._clip_gradients  # DeepSpeed calls it at the boundary, as before
        if comm.current().world_size == 1:
            engine.enable_backward_allreduce = False
            return "direct"
        return "direct-clip"

    def _clip_gradients(self) -> None:
        """DeepSpeed's clip_grad_norm_ (2-norm over every gradient, coefficient max_norm / (norm +
        1e-6) capped at 1) with foreach kernels; gradients are identical on every rank after its
        all-reduce, so each rank's norm is the global one."""
        torch.nn.utils.clip_grad_norm_(self._trained, self.engine.gradient_clipping(), foreach=True)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @property
    def accumulation_steps(self) -> int:
        """Micro batches per optimizer step: the layout's, written into the DeepSpeed config."""
        return self.engine.gradient_accumulation_steps()

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward of one micro batch; returns its device flag (1.0 when its loss is not finite)."""
        bad = (~torch.isfinite(loss.detach())).float()
        self._skip.flag.copy_(torch.maximum(self._skip.flag, bad))
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed counts micro batches in its step(); before the step's last micro batch that
            # is all it does (no optimizer work). The last one's step is optimizer_step().
            self.engine.step()
        return bad

    def optimizer_step(self) -> None:
        """After the step's last micro batch: the non-finite flag is reduced over ranks on the device
        first, so every rank skips the same steps; then the optimizer and the schedule step."""
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(f"optimizer_step after fewer than the {self.accumulation_steps} micro batches "
                               f"of a step")
        comm.device_all_reduce_(self._skip.flag, "max")
        if self.gradient_path == "direct":
            # DeepSpeed's reduction gives a parameter that received no gradient a zero one (AdamW
            # then still decays it); keep that without the reduction
            for parameter in self._trained:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
        self.engine.step()
        self.last_step_flag.copy_(self._skip.flag)
        self._skip.flag.zero_()

    def whole_parameters(self):
        """The module's parameters, each whole in turn (ZeRO-3 gathers one at a time; every rank
        iterates them all)."""
        import deepspeed
        for parameter in self.module.parameters():
            if hasattr(parameter, "ds_tensor"):
                with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
                    yield parameter.data
            else:
                yield parameter.data

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_record(self) -> dict:
        return {"engine": KIND, "zero_stage": self.zero_stage, "precision": self.precision}

    def save(self, root: Path, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)

    def load(self, path: Path, world_size: int | None = None) -> dict:
        """Load `path` into the engine; on another number of ranks than wrote it, through DeepSpeed's
        universal checkpoint format (model and optimizer states re-partitioned)."""
        writers = written_by_ranks(path)
        if world_size is not None and writers is not None and writers != world_size:
            universal = to_universal(path)
            with _loading_universal(self.engine):
                load_path, client_state = self.engine.load_checkpoint(str(path), tag=universal.name)
            if load_path is None:
                raise CheckpointError(f"{universal}: DeepSpeed could not load this universal checkpoint")
            return client_state
        load_path, client_state = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint")
        return client_state


@contextmanager
def _loading_universal(engine):
    """DeepSpeed reads `checkpoint.load_universal` from its config at load time and has no public way
    to change it after `initialize`; one engine loads both kinds (a resume on other ranks, then this
    job's own best), so it is switched for one load. Checked, so a DeepSpeed that renames it fails
    here, by name."""
    config = getattr(engine, "_config", None)
    if config is None or not hasattr(config, "load_universal_checkpoint"):
        raise CheckpointError("this DeepSpeed version has no load_universal_checkpoint setting: a resume on "
                              "another number of ranks is not supported with it")
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = False


class DeepSpeedTeacher:
    """The frozen teacher under DeepSpeed with the student's ZeRO stage and precision, without
    optimizer: under ZeRO-3 its parameters are partitioned and gathered for each forward like the
    student's, so every rank must run the same number of teacher forwards."""

    def __init__(self, model: torch.nn.Module, ds_config: dict):
        import deepspeed
        teacher_config = {key: value for key, value in ds_config.items()
                          if key not in ("gradient_clipping", "optimizer", "scheduler")}
        if zero_stage(ds_config) < 3:
            # ZeRO 1-2 partition optimizer state and gradients, which a teacher has none of; its
            # parameters are whole on every rank either way.
            teacher_config["zero_optimization"] = {"stage": 0}
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.engine, *_ = deepspeed.initialize(model=model, config=teacher_config)
        self.engine.eval()

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    @torch.no_grad()
    def copy_from(self, student: DeepSpeedTrainingEngine) -> None:
        """Student -> teacher, shard by shard: under ZeRO-3 both hold the same partition on a rank."""
        for source, target in zip(student.module.parameters(), self.module.parameters()):
            if hasattr(source, "ds_tensor"):
                target.ds_tensor.copy_(source.ds_tensor)
            else:
                target.data.copy_(source.data)


def _compute_dtype(ds_config: dict) -> torch.dtype:
    """The dtype a model's weights have under this config (torch autocast keeps fp32 weights)."""
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        section = ds_config.get(key)
        if isinstance(section, dict) and section.get("enabled"):
            return dtype
    return torch.float32


def _autocast_dtype(ds_config: dict) -> torch.dtype | None:
    section = ds_config.get("torch_autocast")
    if isinstance(section, dict) and section.get("enabled"):
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(section.get("dtype", "bfloat16")),
                                                                           torch.bfloat16)
    return None


def build_teacher(model: torch.nn.Module, ds_config: dict, placement: str):
    """The frozen teacher: a replica (ReplicaTeacher) under ZeRO-3 when `placement` asks for it (or
    "auto" and it fits in a quarter of the device), else DeepSpeed's (DeepSpeedTeacher: whole on
    every rank under ZeRO 0-2, partitioned like the student under ZeRO-3)."""
    dtype = _compute_dtype(ds_config)
    if zero_stage(ds_config) == 3 and (placement == "replica" or (
            placement == "auto" and ReplicaTeacher.fits(model, dtype))):
        return ReplicaTeacher(model, dtype, _autocast_dtype(ds_config))
    return DeepSpeedTeacher(model, ds_config)
