"""Everything that knows about devices, process groups and the distributed engine.

- `comm`: the process group, rank facts and every collective (host values over gloo, device values
  on the accelerator).
- `deepspeed_engine`: the DeepSpeed training engine, the frozen teacher engine, checkpoint files and
  their consolidation. A second backend (FSDP2, say) is one more module beside it with the same
  methods (`TrainingEngine` below); nothing outside this package imports DeepSpeed or
  torch.distributed.
- `optimizer`: fused AdamW and the learning-rate schedule, shared by backends.
- `placement`: host batches to the device (pinned memory, non-blocking copies).
"""

from __future__ import annotations

from typing import Protocol

import torch


class TrainingEngine(Protocol):
    device: torch.device
    module: torch.nn.Module

    def __call__(self, *args, **kwargs): ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...
    def train(self) -> None: ...
    def eval(self) -> None: ...
    def lr(self) -> float: ...
    def save(self, root, tag: str, client_state: dict) -> None: ...
    def load(self, path, world_size: int | None = None) -> dict: ...
