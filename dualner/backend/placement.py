"""Host batches to the compute device. Batches come from the loaders in pinned (page-locked) memory
when the device is a GPU, so the copies below are asynchronous and overlap the previous step."""

from __future__ import annotations

from typing import Any

import torch


def pin_memory_wanted(device: torch.device) -> bool:
    return device.type == "cuda"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware: oneDNN's bf16 path (AVX-512 BF16 or AMX
    on x86, the BF16 extension on Arm). Without it torch falls back to a reference kernel, measured
    tens of times slower than fp32 (bench/cpu_precision.py)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: ask the CPU itself
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


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


class HostSyncCounter:
    """Counts the operations that make the host wait for the GPU (torch's sync debug mode) while
    enabled, by the package that issued them; `DUALNER_COUNT_SYNCS=1` turns it on (CUDA only; the
    trainer logs `debug/host_syncs_per_step`)."""

    def __init__(self):
        import warnings
        self.counts: dict[str, int] = {}
        self.enabled = False
        torch.cuda.set_sync_debug_mode("warn")
        previous = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                if self.enabled:
                    origin = next((name for name in ("dualner", "deepspeed", "transformers", "torch")
                                   if f"/{name}/" in filename), "other")
                    self.counts[origin] = self.counts.get(origin, 0) + 1
                return
            previous(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        warnings.simplefilter("always")

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts
