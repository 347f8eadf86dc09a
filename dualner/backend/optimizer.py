"""AdamW (torch's, fused where the device has the kernel) and the warmup + linear decay schedule,
shared by every backend."""

from __future__ import annotations

import torch

from dualner.config import TrainConfig


def warmup_linear_decay(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "LayerNorm" in name or "norm" in name else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The fused kernel updates every parameter of a group in one launch (GPU and CPU) and can skip
    a step on the device (`found_inf`) without the host looking at the gradients."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(parameter_groups(model, train.weight_decay), lr=train.lr, fused=fused or None)


class SkippableStep:
    """The device-side flag that makes the fused optimizer skip a step: set to 1 by any rank whose
    loss was not finite, reduced over ranks on the device, read by the optimizer kernel. The host
    never waits for it: the trainer reads each step's flag one step later, when it is long computed."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.flag = torch.zeros((), dtype=torch.float32, device=device)
        self.supported = bool(optimizer.defaults.get("fused"))
        if self.supported:
            optimizer.found_inf = self.flag  # read by torch's fused AdamW in step()
