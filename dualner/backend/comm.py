"""The process group, rank facts and every collective the project issues; the one place that knows
which device a collective needs.

Two kinds of values cross ranks, and each has its own path:
- host values (signal flags, token counts, loader wait times, small Python objects) are reduced
  through a CPU backend (gloo), so reading them never waits for the accelerator;
- device values (loss sums, pseudo-label statistics, the non-finite flag) stay on the accelerator
  and are reduced there (NCCL on CUDA) without a host round trip.
On an accelerator the default process group is therefore opened as "cpu:gloo,cuda:nccl": a group
that serves both. Callers never build the tensors a collective sends: they hand over Python numbers
(host) or device tensors (device) and this module builds the buffer itself (`_host_buffer`,
`_device_buffer`, `_in_place_buffer`). That is what failed on the first GPU run (a CPU tensor sent to
an NCCL-only group). The multi-process tests audit the rule on any machine (tests/hooks/collective_audit.py).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from dualner.errors import ConfigError

TIMEOUT_ENV = "DUALNER_COLLECTIVE_TIMEOUT_S"  # seconds a collective may wait for the slowest rank


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


def launch_ranks(environ=os.environ) -> dict[str, str]:
    """RANK, WORLD_SIZE and LOCAL_RANK as the launcher gave them: `deepspeed` and `torchrun` set them,
    `srun` gives SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, a plain `python` is a world of one."""
    if "RANK" in environ:
        return {name: environ.get(name, "") for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
                "LOCAL_RANK": environ.get("SLURM_LOCALID", "0")}
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def init_distributed() -> DistInfo:
    """Join (or create) the process group of `deepspeed`, `torchrun`, `srun` or plain `python`."""
    if "RANK" not in os.environ:
        plain = "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ
        os.environ.update(launch_ranks())
        if plain:  # plain `python launchers/...`: its own one-rank group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        device = accelerator_device(int(os.environ.get("LOCAL_RANK", 0)))
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL and object collectives use the current device
        dist.init_process_group(backend=process_group_backend(device), timeout=collective_timeout(),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return current()


def collective_timeout() -> timedelta:
    """How long a collective of the default process group waits for the slowest rank before failing:
    `DUALNER_COLLECTIVE_TIMEOUT_S`, else torch's default (30 minutes, which groups created without a
    timeout, e.g. DeepSpeed's, keep)."""
    configured = os.environ.get(TIMEOUT_ENV, "")
    if not configured:
        return dist.default_pg_timeout
    try:
        seconds = float(configured)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={configured!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def current() -> DistInfo:
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(0, 1, 0)


def is_main_process() -> bool:
    return current().is_main


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class PatientBarrier:
    """A barrier for a wait whose length is known ahead and may pass the collective timeout (a
    resume's catch-up): its timeout is twice the collective timeout plus four times the longest
    `expected_seconds` of any rank. Every rank builds it before the wait (that is a collective, at the
    usual timeout) and passes it after; training's own collectives then start together."""

    def __init__(self, expected_seconds: float):
        self.timeout = 2 * collective_timeout() + timedelta(seconds=4 * max(0.0, expected_seconds))
        self._group = None
        if _several_ranks():
            longest = host_all_reduce([max(0.0, expected_seconds)], "max")[0]  # every rank: one timeout
            self.timeout = 2 * collective_timeout() + timedelta(seconds=4 * longest)
            self._group = dist.new_group(backend="gloo", timeout=self.timeout)

    def wait(self) -> None:
        if self._group is not None:
            dist.barrier(group=self._group)
            dist.destroy_process_group(self._group)
            self._group = None


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
    """What a host collective sends: the numbers in a CPU tensor (gloo)."""
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


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
def _device_buffer(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """What a device collective sends: the tensors flattened into one float32 buffer on `device`."""
    if not tensors:
        return torch.zeros(0, device=device)
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float32) for t in tensors])


def _in_place_buffer(tensor: torch.Tensor) -> torch.Tensor:
    """A caller's tensor reduced where it lies: it must be on this rank's accelerator (in a
    "cpu:gloo,cuda:nccl" group a CPU tensor would go through gloo, not where the optimizer reads it)."""
    expected = accelerator_device().type
    if tensor.device.type != expected:
        raise RuntimeError(f"an in-place device reduction of a {tensor.device} tensor; this rank computes on {expected}")
    return tensor


def device_all_reduce(tensors: Sequence[torch.Tensor], device: torch.device, op: str = "sum") -> torch.Tensor:
    """Reduce device tensors over ranks on the device (one flat buffer, one collective); returns the
    reduced flat buffer on the device. The caller reads it (one copy to the host) when it needs to."""
    buffer = _device_buffer(tensors, device)
    if _several_ranks() and buffer.numel():
        dist.all_reduce(buffer, op=getattr(dist.ReduceOp, _OPS[op]))
    return buffer


def broadcast_tensors_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """In place, on the device: every rank's tensors become rank `src`'s (a model's initial weights,
    which each rank drew with its own seed, before an engine shards them)."""
    if _several_ranks():
        for tensor in tensors:
            dist.broadcast(_in_place_buffer(tensor), src=src)


def device_all_reduce_(tensor: torch.Tensor, op: str = "max") -> torch.Tensor:
    """In place, on the device, asynchronously with respect to the host (for the per-step
    non-finite flag, which the optimizer reads on the device)."""
    if _several_ranks():
        dist.all_reduce(_in_place_buffer(tensor), op=getattr(dist.ReduceOp, _OPS[op]))
    return tensor
