"""Where a run's numbers go: TensorBoard, losses.jsonl (rank 0, appended as we go, so a crash loses
none of it), the log line and the progress bar.

Nothing in a step waits for the device: loss terms and statistics are summed on the device over a
log window (`MetricWindow`) and read once at its end (one device reduction, one copy, one host
reduction).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import torch

from dualner.backend import comm
from dualner.backend.placement import HostSyncCounter
from dualner.logging import ScalarWriter, get_logger
from dualner.run_layout import RunLayout


class MetricWindow:
    """One log window's sums: loss terms on the device, counts and waits on the host."""

    def __init__(self):
        self.device: dict[str, torch.Tensor] = {}
        self.host = {"tokens": 0.0, "computed_tokens": 0.0, "windows": 0.0, "data/wait_seconds": 0.0}
        self.started = time.perf_counter()

    def wait_for(self, batches) -> dict:
        waited = time.perf_counter()
        batch = next(batches)
        self.host["data/wait_seconds"] += time.perf_counter() - waited
        self.host["tokens"] += batch["real_tokens"]
        self.host["computed_tokens"] += batch["input_ids"].numel()
        self.host["windows"] += batch["num_segments"]
        return batch

    def add(self, terms: dict[str, torch.Tensor], bad: torch.Tensor) -> None:
        """A micro batch's terms, summed on the device (a skipped micro batch adds nothing)."""
        for name, value in terms.items():
            value = torch.where(bad > 0, 0.0, value.detach().float())
            self.device[name] = self.device[name] + value if name in self.device else value
        good = 1.0 - bad
        self.device["good_micro_batches"] = self.device.get("good_micro_batches", 0) + good

    @contextmanager
    def paused(self):
        paused = time.perf_counter()
        yield
        self.started += time.perf_counter() - paused


class TrainingMetrics:
    def __init__(self, layout: RunLayout, tensorboard: bool, progress_bar: bool, total_steps: int,
                 stage_name: str, device: torch.device, first_step: int = 1):
        self.info, self.log, self.layout, self.device = comm.current(), get_logger(), layout, device
        self.total_steps = total_steps
        self.writer = ScalarWriter(layout.tensorboard, tensorboard, first_step)
        self.progress = _progress(self.info.is_main and progress_bar, total_steps, stage_name)
        self._last_logged_step = 0
        self._syncs = (HostSyncCounter() if os.environ.get("DUALNER_COUNT_SYNCS") == "1"
                       and device.type == "cuda" else None)

    @contextmanager
    def counting_syncs(self):
        """`DUALNER_COUNT_SYNCS=1`: count the host synchronisations of the steps (not of logging,
        evaluation or saving)."""
        if self._syncs is not None:
            self._syncs.enabled = True
        yield
        if self._syncs is not None:
            self._syncs.enabled = False

    def start_at(self, step: int) -> None:
        """Where this job starts (a resumed run: its checkpoint's step)."""
        self._last_logged_step = step
        self.progress.update(step - self.progress.n)

    def step_done(self) -> None:
        self.progress.update(1)

    def log_window(self, window: MetricWindow, step: int, term_names: list[str], recipe_statistics: dict,
                   recipe_scalars, extra: dict[str, float]) -> MetricWindow:
        """One device reduction + one copy to the host, one host reduction: the window's only syncs.
        `recipe_scalars(sums)` turns the reduced sums into the recipe's scalars. Returns the next window."""
        names = ["total", *term_names]
        device_values = {name: window.device.get(name, torch.zeros((), device=self.device))
                         for name in [*names, "good_micro_batches"]} | recipe_statistics
        reduced = comm.device_all_reduce(list(device_values.values()), self.device).cpu().tolist()
        sums, offset = {}, 0
        for name, value in device_values.items():
            sums[name] = reduced[offset] if value.numel() == 1 else reduced[offset:offset + value.numel()]
            offset += value.numel()
        host = dict(zip(window.host, comm.host_all_reduce(list(window.host.values()))))
        good = max(1.0, sums["good_micro_batches"])
        losses = {f"loss/{name}": sums[name] / good for name in names if name in window.device or name == "total"}
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        steps = max(1, step - self._last_logged_step)
        self._last_logged_step = step
        scalars = losses | recipe_scalars(sums) | {
            "lr": extra.pop("lr"), "throughput/tokens_per_s": host["tokens"] / elapsed,
            "throughput/step_seconds": elapsed / steps, "throughput/tokens_per_step": host["tokens"] / steps,
            "throughput/windows_per_step": host["windows"] / steps,
            "data/packing_efficiency": host["tokens"] / max(1.0, host["computed_tokens"]),
            "data/wait_seconds": host["data/wait_seconds"] / self.info.world_size} | extra
        self.writer.scalars(scalars, step)
        if self._syncs is not None:  # the JSON log only (a breakdown, not a scalar)
            scalars["debug/host_syncs_per_step"] = {k: v / steps for k, v in self._syncs.take().items()}
        self.log.info("step %d/%d loss %.4f lr %.2e %.0f tokens/s", step, self.total_steps,
                      losses["loss/total"], scalars["lr"], scalars["throughput/tokens_per_s"])
        if self.info.is_main:
            with self.layout.losses.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **scalars}) + "\n")
        return MetricWindow()

    def log_dev(self, step: int, results: dict, improved: bool, best_score: float, best_step: int) -> None:
        self.writer.scalars({f"dev/f1/{lang}": f1 for lang, f1 in results["per_language"].items()}
                            | {"dev/f1/average": results["average"]}, step)
        self.log.info("step %d dev F1 average %.2f (%s) %s", step, results["average"],
                      ", ".join(f"{k} {v:.1f}" for k, v in results["per_language"].items()),
                      "new best" if improved else f"best {best_score:.2f} @ {best_step}")

    def close(self) -> None:
        self.progress.close()
        self.writer.close()


def _progress(enabled: bool, total: int, description: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, desc=description, unit="step", dynamic_ncols=True)
