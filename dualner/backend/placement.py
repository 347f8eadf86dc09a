"""Host batches to the compute device. Batches come from the loaders in pinned (page-locked) memory
when the device is a GPU, so the copies below are asynchronous and overlap the previous step."""

from __future__ import annotations

from typing import Any

import torch


def pin_memory_wanted(device: torch.device) -> bool:
    return device.type == "cuda"


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to `device` (non-blocking); everything else (per-window metadata, Python numbers)
    stays on the host as it is."""
    return {name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for name, value in batch.items()}


class AsyncHostCopy:
    """A small device tensor copied into pinned host memory without waiting for it; `value()` later
    waits for that copy alone. Read one step after it was taken, it is long done, so the host never
    stalls the device for it (the lag-one pattern). On the CPU it is a plain copy."""

    _buffers: dict[tuple, list[torch.Tensor]] = {}

    def __init__(self, tensor: torch.Tensor):
        tensor = tensor.detach()
        self.event = None
        if tensor.is_cuda:
            # two pinned buffers per shape, used in turn: pinning memory each step would cost more
            # than the copy
            key = (tuple(tensor.shape), tensor.dtype)
            pair = self._buffers.setdefault(key, [torch.empty(tensor.shape, dtype=tensor.dtype).pin_memory()
                                                  for _ in range(2)])
            pair.reverse()
            self.host = pair[0]
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor.clone()

    def value(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host
