"""engine.kind=fsdp2: torch's own sharded data parallelism (torchtitan's recipe). Each encoder layer
and then the whole model are wrapped by `fully_shard` (FSDP2: parameters, gradients and optimizer
states sharded over the ranks as DTensors, gathered layer by layer for the forward and backward)
with a `MixedPrecisionPolicy`; torch's AdamW steps the shards; `torch.distributed.checkpoint` (DCP)
writes each rank's shards and reads them back on any number of ranks (it reshards on load).

A checkpoint step-N/ holds the engine's DCP folder (`engine_state/`: model and optimizer) and,
beside it, `components.pt`: the learning-rate schedule and the components the Checkpointer was
told of (the same on every rank: written once, by rank 0).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from dualner.backend import comm
from dualner.backend.optimizer import SkippableStep, build_optimizer, warmup_linear_decay
from dualner.backend.teacher import ReplicaTeacher
from dualner.config import Config, ConfigError, TrainConfig, bounded

KIND = "fsdp2"
ENGINE_STATE = "engine_state"  # the DCP folder of a checkpoint
COMPONENTS = "components.pt"  # beside it: the schedule and the Checkpointer's components
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class FSDP2Settings:
    """The `engine:` section's keys under kind: fsdp2."""
    # What the forward and backward compute in (MixedPrecisionPolicy's parameter dtype); parameters,
    # gradient reductions and optimizer states stay fp32. bf16 on a CPU follows train.cpu_bf16.
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_clipping: float = bounded(1.0, minimum=0.0)  # max 2-norm of all gradients; 0: no clipping
    # Parameters sharded again after each layer's forward (ZeRO-3's memory); false keeps them
    # gathered until the backward (ZeRO-2's: fewer all-gathers, more memory).
    reshard_after_forward: bool = True


SETTINGS = FSDP2Settings


def check_config(settings: FSDP2Settings, cfg: Config, world_size: int | None, parser: bool) -> None:
    if cfg.model.compile:
        raise ConfigError("model.compile=true works with engine.kind=deepspeed at ZeRO stages 0-2 only; "
                          "set model.compile=false for engine.kind=fsdp2")


def writes(checkpoint: Path) -> bool:
    return (checkpoint / ENGINE_STATE / ".metadata").is_file()


def compute_precision(settings: FSDP2Settings, device: torch.device, cpu_bf16: str) -> str:
    """settings.precision, but fp32 for bf16 on a CPU without bf16 instructions under
    train.cpu_bf16=auto (tens of times slower there), or under train.cpu_bf16=fp32; logged."""
    if settings.precision != "bf16" or device.type != "cpu" or cpu_bf16 == "bf16":
        return settings.precision
    from dualner.backend.placement import cpu_has_bf16
    from dualner.logging import get_logger
    if cpu_bf16 == "auto" and cpu_has_bf16():
        return "bf16"
    get_logger().warning("precision: fp32 instead of engine.precision=bf16 (train.cpu_bf16=%s%s)", cpu_bf16,
                         "" if cpu_bf16 == "fp32" else " and this CPU has no bf16 instructions")
    return "fp32"


@dataclass
class FSDP2Setup:
    settings: FSDP2Settings
    precision: str
    accumulation_steps: int
    device: torch.device
    kind: str = KIND

    def describe(self) -> str:
        return (f"FSDP2 (fully_shard per encoder layer, {self.precision} compute, reshard_after_forward="
                f"{self.settings.reshard_after_forward})")

    def check_resume(self, checkpoint: Path, record: dict) -> None:
        """Any FSDP2 checkpoint loads: DCP reshards to this job's ranks, and the states it holds
        (fp32 parameters and optimizer states) are the same whatever the compute precision."""

    def continuing(self, checkpoint: Path, record: dict) -> "FSDP2Setup":
        return self

    def build(self, model: torch.nn.Module, train: TrainConfig, total_steps: int, compile_encoder: bool = False,
              fixed_shapes: bool = False) -> "FSDP2TrainingEngine":
        return FSDP2TrainingEngine(model, self, train, total_steps)

    def build_teacher(self, model: torch.nn.Module, placement: str):
        """stage2.teacher_placement: "partitioned" shards the teacher like the student (gathered for
        each forward); "replica" and "auto" (where a whole copy fits in a quarter of the device) a
        whole copy on each rank."""
        dtype = _DTYPES[self.precision]
        if placement == "partitioned" or (placement == "auto" and not ReplicaTeacher.fits(model, dtype)):
            return ShardedTeacher(model, self)
        return ReplicaTeacher(model, dtype)


def prepare(settings: FSDP2Settings, layout, device: torch.device, cpu_bf16: str) -> FSDP2Setup:
    return FSDP2Setup(settings, compute_precision(settings, device, cpu_bf16), layout.accumulation_steps, device)


def _shard(model: torch.nn.Module, setup: FSDP2Setup) -> torch.nn.Module:
    """fully_shard on each layer of the encoder's layer lists (one all-gather per layer), then on
    the whole model (embeddings and heads), from rank 0's weights: each rank drew its heads with its
    own seed, and a shard keeps only its rank's part."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    model.to(setup.device)
    comm.broadcast_tensors_([tensor.data for tensor in (*model.parameters(), *model.buffers())])
    mesh = init_device_mesh(setup.device.type, (comm.current().world_size,))
    compute = _DTYPES[setup.precision]
    policy = MixedPrecisionPolicy(param_dtype=None if compute == torch.float32 else compute,
                                  reduce_dtype=torch.float32)
    options = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": setup.settings.reshard_after_forward}
    for layers in [module for module in model.modules() if isinstance(module, torch.nn.ModuleList)]:
        for layer in layers:
            fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


class FSDP2TrainingEngine:
    """The student (dualner.backend.TrainingEngine) under FSDP2. A step is `accumulation_steps` micro
    batches of `engine(**inputs)` and `backward(loss)` (gradients reduce-scattered after the last
    one only), then `optimizer_step()`: clipping, the fused AdamW step, skipped on the device when
    any rank's loss was not finite (as DeepSpeed's engine here), and the schedule."""

    def __init__(self, model: torch.nn.Module, setup: FSDP2Setup, train: TrainConfig, total_steps: int):
        self.device, self.precision = setup.device, setup.precision
        self.module = _shard(model, setup)
        self._trained = [parameter for parameter in self.module.parameters() if parameter.requires_grad]
        self.optimizer = build_optimizer(self.module, train, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_linear_decay(train.warmup_steps, total_steps))
        self._skip = SkippableStep(self.optimizer, self.device)
        if not self._skip.supported:
            raise ConfigError(f"no fused AdamW kernel on {self.device}: the non-finite guard needs it")
        self.last_step_flag = torch.zeros((), dtype=torch.float32, device=self.device)
        self._clipping = setup.settings.gradient_clipping
        self._accumulation, self._micro_batches = setup.accumulation_steps, 0

    @property
    def accumulation_steps(self) -> int:
        return self._accumulation

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward of one micro batch of the step's mean loss; returns its device flag (1.0 when its
        loss is not finite)."""
        bad = (~torch.isfinite(loss.detach())).float()
        self._skip.flag.copy_(torch.maximum(self._skip.flag, bad))
        self._micro_batches += 1
        self.module.set_requires_gradient_sync(self._micro_batches == self._accumulation)
        (loss / self._accumulation).backward()
        return bad

    def optimizer_step(self) -> None:
        if self._micro_batches != self._accumulation:
            raise RuntimeError(f"optimizer_step after {self._micro_batches} of the {self._accumulation} micro "
                               f"batches of a step")
        comm.device_all_reduce_(self._skip.flag, "max")
        for parameter in self._trained:  # no gradient: a zero one, so AdamW still decays it (as DeepSpeed)
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        if self._clipping > 0:
            torch.nn.utils.clip_grad_norm_(self._trained, self._clipping, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_step_flag.copy_(self._skip.flag)
        self._skip.flag.zero_()
        self._micro_batches = 0

    def whole_parameters(self):
        """The module's parameters, each gathered whole in turn (every rank iterates them all)."""
        for parameter in self.module.parameters():
            yield parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter.data

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint_record(self) -> dict:
        return {"engine": KIND, "precision": self.precision}

    def _engine_state(self, with_optimizer: bool) -> dict:
        """The model's (and the optimizer's) sharded state, to write or to read into. Before the first
        step the optimizer has no state, and asking for it would make one with a step of its own
        (torch fills it with a zero-learning-rate step, which counts in AdamW's bias correction):
        such a checkpoint holds the model alone."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        state = {"model": get_model_state_dict(self.module)}
        if with_optimizer:
            state["optimizer"] = get_optimizer_state_dict(self.module, self.optimizer)
        return state

    def save(self, root: Path, tag: str, client_state: dict) -> None:
        """Every rank writes its shards (DCP); rank 0 the components beside them."""
        import torch.distributed.checkpoint as dcp
        path = Path(root) / tag
        dcp.save(self._engine_state(with_optimizer=bool(self.optimizer.state)), checkpoint_id=path / ENGINE_STATE)
        if comm.is_main_process():
            torch.save({"scheduler": self.scheduler.state_dict(), "client_state": client_state}, path / COMPONENTS)

    def load(self, path: Path, world_size: int | None = None) -> dict:
        """Load `path` on this job's ranks, however many wrote it (DCP reshards); returns the client
        state. Resume checkpoints are trusted input: the components file is unpickled fully (it
        holds random generator states), as DeepSpeed's own files are."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        folder = path / ENGINE_STATE
        written = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
        with_optimizer = any(key.startswith("optimizer.") for key in written)
        state = self._engine_state(with_optimizer)  # the shapes and shards to read into
        dcp.load(state, checkpoint_id=folder)
        set_model_state_dict(self.module, state["model"])
        if with_optimizer:
            set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"])
        components = torch.load(path / COMPONENTS, map_location="cpu", weights_only=False)
        self.scheduler.load_state_dict(components["scheduler"])
        return components["client_state"]


class ShardedTeacher:
    """The frozen teacher sharded like the student (stage2.teacher_placement=partitioned): its
    forward gathers each layer, so every rank runs the same number of teacher forwards; a refresh
    copies the student's shards, which lie on the same ranks."""

    def __init__(self, model: torch.nn.Module, setup: FSDP2Setup):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.module = _shard(model, setup).eval()

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def copy_from(self, student: FSDP2TrainingEngine) -> None:
        for source, target in zip(student.module.parameters(), self.module.parameters()):
            target.to_local().copy_(source.to_local())


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's whole fp32 weights from an FSDP2 checkpoint, in one process without a process group
    (DCP reads every rank's shards); reads tensors only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    folder = checkpoint / ENGINE_STATE
    metadata = dcp.FileSystemReader(folder).read_metadata()
    weights = {key.removeprefix("model."): torch.empty(item.size, dtype=item.properties.dtype)
               for key, item in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(item, TensorStorageMetadata)}
    state = {"model": weights}
    with warnings.catch_warnings():  # DCP warns that it reads in one process: what is asked of it here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=folder, no_dist=True)
    return {name: tensor.float() for name, tensor in state["model"].items()}
