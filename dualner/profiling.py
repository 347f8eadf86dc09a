"""`profile:` in the config: torch.profiler over training steps K..K+n-1 of the real launcher step.

    python -m dualner stage1 --config configs/tiny.yaml profile.enabled=true profile.start_step=3 profile.steps=2

The loop (dualner.train) builds a `StepProfiler` once and `step()` after every optimizer
step; nothing else changes, and with `profile.enabled=false` both are no-ops. Every rank writes,
into `<run.output_dir>/profile/`:
- `<worker>.*.pt.trace.json`: the trace (torch.profiler.tensorboard_trace_handler), viewable with
  `tensorboard --logdir <run.output_dir>/profile` (torch-tb-profiler) or chrome://tracing / Perfetto;
- `top_ops_rank<r>.txt`: the top `profile.top` operators by self time (key_averages().table);
- `summary_rank<r>.json`: steps profiled, operator calls per step (all; aten::*; aten calls made
  from outside another aten op, i.e. dispatches from the host), and the top operators with their
  calls and self time per step.
Step numbers are the run's optimizer steps (1-based, as in losses.jsonl); the step before K is the
profiler's warm-up (not recorded). A run resumed past K profiles nothing and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dualner.config import ProfileConfig
from dualner.logging import get_logger


class StepProfiler:
    def __init__(self, cfg: ProfileConfig, folder: Path, rank: int, device: torch.device, first_step: int,
                 total_steps: int):
        self.cfg, self.folder, self.rank, self.device = cfg, folder, rank, device
        self.steps = 0
        self._profiler = None
        if not cfg.enabled:
            return
        before = cfg.start_step - 1 - first_step  # steps of this job before step K
        if before < 0 or cfg.start_step > total_steps:
            get_logger().warning("profile: step %d is not ahead of this job (steps %d-%d); nothing profiled",
                                 cfg.start_step, first_step + 1, total_steps)
            return
        self.last_step = min(cfg.start_step + cfg.steps - 1, total_steps)
        self.steps = self.last_step - cfg.start_step + 1
        warmup = min(1, before)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        folder.mkdir(parents=True, exist_ok=True)
        self._trace = torch.profiler.tensorboard_trace_handler(str(folder), worker_name=f"rank{rank}")
        self._profiler = torch.profiler.profile(
            activities=activities, record_shapes=cfg.record_shapes,
            schedule=torch.profiler.schedule(skip_first=before - warmup, wait=0, warmup=warmup,
                                             active=self.steps, repeat=1),
            on_trace_ready=self._write)
        self._profiler.start()
        self._step = first_step

    def step(self) -> None:
        """After every optimizer step; stops the profiler after the last profiled step."""
        if self._profiler is None:
            return
        self._step += 1
        self._profiler.step()
        if self._step >= self.last_step:
            self._profiler.stop()
            self._profiler = None

    def _write(self, profiler) -> None:
        self._trace(profiler)
        cuda = self.device.type == "cuda"
        events = profiler.key_averages()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = events.table(sort_by=sort, row_limit=self.cfg.top)
        (self.folder / f"top_ops_rank{self.rank}.txt").write_text(
            f"steps {self.cfg.start_step}-{self.last_step} ({self.steps}), sorted by {sort}\n{table}\n",
            encoding="utf-8")
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        operators = [event for event in events if not event.key.startswith("ProfilerStep")]
        top = sorted(operators, key=lambda e: getattr(e, key, 0), reverse=True)[:self.cfg.top]
        # aten calls made by code (Python, autograd, DeepSpeed), not by another aten op: each one a
        # dispatch from the host, and on a GPU at least one kernel launch
        dispatched = sum(1 for e in profiler.events() if e.name.startswith("aten::")
                         and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
        summary = {
            "steps": [self.cfg.start_step, self.last_step], "device": str(self.device),
            "operator_calls_per_step": sum(e.count for e in operators) / self.steps,
            "aten_calls_per_step": sum(e.count for e in operators if e.key.startswith("aten::")) / self.steps,
            "aten_dispatches_per_step": dispatched / self.steps,
            "top": [{"op": e.key, "calls_per_step": e.count / self.steps,
                     "self_ms_per_step": getattr(e, key, 0) / 1000 / self.steps} for e in top]}
        (self.folder / f"summary_rank{self.rank}.json").write_text(json.dumps(summary, indent=1) + "\n",
                                                                  encoding="utf-8")
        get_logger().info("profile: steps %d-%d written to %s (%.0f operator calls per step)", self.cfg.start_step,
                          self.last_step, self.folder, summary["operator_calls_per_step"])
