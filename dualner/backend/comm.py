"""The process group, rank facts and every collective the project issues; the one place that knows
which device a collective needs.

Two kinds of values cross ranks, and each has its own path:
- host values (signal flags, token counts, loader wait times, small Python objects) are reduced
  through a CPU backend (gloo), so reading them never waits for the accelerator;
- device values (loss sums, pseudo-label statistics, the non-finite flag) stay on the accelerator
  and are reduced there (NCCL on CUDA) without a host round trip.
On an accelerator the default process group is therefore opened as "cpu:gloo,cuda:nccl": a group
that serves both. Callers never build the tensors a collective sends: they hand over Python numbers
(host) or device tensors (device) and this module places the buffer itself. That is what failed on
the first GPU run (a CPU tensor sent to an NCCL-only group), and `DUALNER_STRICT_COLLECTIVES=1` (set
by the multi-process tests) turns the rule into an error on any machine: a collective issued from
project code outside this module, or with a buffer this module did not place, is refused the way NCCL
refuses a CPU tensor.
"""

from __future__ import annotations

import os
import socket
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

STRICT_ENV = "DUALNER_STRICT_COLLECTIVES"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A free TCP port on this host (for a world of one, tests and benchmarks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerator_device(local_rank: int = 0) -> torch.device:
    """Where this rank computes: its GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def process_group_backend(device: torch.device) -> str:
    """One group for both kinds of values: gloo for host tensors, the accelerator's own backend for
    device tensors."""
    if device.type == "cuda":
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_distributed() -> DistInfo:
    """Join (or create) the process group of `deepspeed`, `torchrun`, `srun` or plain `python`."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    if "RANK" not in os.environ:  # plain `python launchers/...`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        device = accelerator_device(int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL and object collectives use the current device
        dist.init_process_group(backend=process_group_backend(device),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        if os.environ.get(STRICT_ENV) == "1":
            _install_strict_audit()
    return current()


def current() -> DistInfo:
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(0, 1, 0)


def is_main_process() -> bool:
    return current().is_main


def shutdown() -> None:
    """A collective end (left to interpreter exit, gloo's threads can abort a rank)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()



def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- objects -------------------------------------------------------------------------------------
def all_gather_objects(value: Any) -> list[Any]:
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# -- host values (gloo; no accelerator involved) ---------------------------------------------------
_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def _host_buffer(values: Sequence[float]) -> torch.Tensor:
    buffer = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return _placed(buffer)


def _several_ranks() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def host_all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    """Reduce Python numbers over ranks through the CPU backend; no device synchronisation."""
    if not _several_ranks():
        return [float(v) for v in values]
    buffer = _host_buffer(values)
    dist.all_reduce(buffer, op=getattr(dist.ReduceOp, _OPS[op]))
    return buffer.tolist()


class PendingHostReduce:
    """A host all-reduce started now and read later (one step later, say): every rank reads the same
    value without anyone waiting for it in the meantime."""

    def __init__(self, values: Sequence[float], op: str = "max"):
        self._buffer = _host_buffer(values)
        self._work = (dist.all_reduce(self._buffer, op=getattr(dist.ReduceOp, _OPS[op]), async_op=True)
                      if _several_ranks() else None)

    def result(self) -> list[float]:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._buffer.tolist()


def all_reduce_max(value: int) -> int:
    return int(host_all_reduce([value], "max")[0])


# -- device values -------------------------------------------------------------------------------
def collective_device(device: torch.device) -> torch.device:
    """The device a collective of device values runs on: the accelerator itself (NCCL), or the CPU
    when that is where training runs."""
    return device


def device_all_reduce(tensors: Sequence[torch.Tensor], device: torch.device, op: str = "sum") -> torch.Tensor:
    """Reduce device tensors over ranks on the device (one flat buffer, one collective); returns the
    reduced flat buffer on the device. The caller reads it (one copy to the host) when it needs to."""
    buffer = _placed(torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float32)
                                for t in tensors]) if tensors else torch.zeros(0, device=device))
    if buffer.device != collective_device(device):
        raise RuntimeError(f"device collective buffer on {buffer.device}, expected {device}")
    if _several_ranks() and buffer.numel():
        dist.all_reduce(buffer, op=getattr(dist.ReduceOp, _OPS[op]))
    return buffer


def device_all_reduce_(tensor: torch.Tensor, op: str = "max") -> torch.Tensor:
    """In place, on the device, asynchronously with respect to the host (for the per-step
    non-finite flag, which the optimizer reads on the device)."""
    if _several_ranks():
        _placed(tensor)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]))
    return tensor


# -- strict audit ----------------------------------------------------------------------------------
# Buffers this module placed for a collective. Under the audit, a collective from project code is
# accepted only with one of them, and only when issued here.
_PLACED: dict[int, weakref.ref] = {}  # id -> weak reference (tensors compare elementwise, not by identity)
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                "reduce_scatter", "broadcast", "reduce", "all_to_all_single", "gather", "scatter")


def _placed(tensor: torch.Tensor) -> torch.Tensor:
    key = id(tensor)
    _PLACED[key] = weakref.ref(tensor, lambda _ref, key=key: _PLACED.pop(key, None))
    return tensor


def _was_placed(tensor: torch.Tensor) -> bool:
    reference = _PLACED.get(id(tensor))
    return reference is not None and reference() is tensor


class CollectiveDeviceError(RuntimeError):
    pass


def _install_strict_audit() -> None:
    """Wrap torch.distributed's tensor collectives. DeepSpeed's and torch's own calls pass (they
    place their buffers themselves); a call from a `dualner` module must come from this module with
    a buffer it placed."""
    for name in _COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None or getattr(original, "_dualner_audited", False):
            continue

        def audited(*args, __original=original, __name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("dualner"):
                tensor = args[0] if args else next(iter(kwargs.values()), None)
                if caller != __name__:
                    raise CollectiveDeviceError(
                        f"torch.distributed.{__name} called from {caller}: collectives go through "
                        f"dualner.backend.comm, which places their buffers on the right device")
                if isinstance(tensor, torch.Tensor) and not _was_placed(tensor):
                    raise CollectiveDeviceError(
                        f"torch.distributed.{__name} with a {tensor.device} tensor that "
                        f"dualner.backend.comm did not place (no backend type associated with it)")
            return __original(*args, **kwargs)

        audited._dualner_audited = True
        setattr(dist, name, audited)
