"""The frozen teacher of stage 2 as a whole copy on each rank's device, for any engine."""

from __future__ import annotations

import os

import torch

from dualner.backend import comm


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ReplicaTeacher:
    """The frozen teacher as a whole copy on this rank's device, outside the engine, in the student's
    compute dtype: its forward gathers nothing, so under an engine that partitions parameters it
    costs one forward and no collectives. A refresh takes the student's parameters whole one at a
    time (`whole_parameters` of the student's engine: a gather where they are partitioned)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, autocast: torch.dtype | None = None):
        self.device = comm.accelerator_device(comm.current().local_rank)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self._module = model.to(device=self.device, dtype=dtype).eval()
        self._autocast = autocast

    @staticmethod
    def fits(model: torch.nn.Module, dtype: torch.dtype, fraction: float = 0.25) -> bool:
        """Whether a whole copy takes under `fraction` of the device's memory (teacher_placement=auto)."""
        device = comm.accelerator_device(comm.current().local_rank)
        size = sum(p.numel() for p in model.parameters()) * torch.tensor([], dtype=dtype).element_size()
        return size < fraction * device_memory_bytes(device)

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        if self._autocast is None:
            return self._module(*args, **kwargs)
        with torch.autocast(self.device.type, dtype=self._autocast):
            return self._module(*args, **kwargs)

    @torch.no_grad()
    def copy_from(self, student) -> None:
        """Student -> teacher (every rank calls this: the student's parameters may be gathered)."""
        for source, target in zip(student.whole_parameters(), self._module.parameters()):
            target.copy_(source.to(target.dtype))
