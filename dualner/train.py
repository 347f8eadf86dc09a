"""The training loop of every stage (`train`, below: torchtitan's train(), nanoGPT's loop) over a
recipe (dualner.recipe), and the run it drives: process group, engine, run folder and checkpoints,
evaluation, logging.

Nothing in a step waits for the device: loss terms and statistics are summed on the device and read
once per log window (one reduction, one copy); a non-finite loss makes the optimizer skip that step
on the device on every rank, and its flag is read one step later, when it is long computed;
preemption signals are agreed through a host collective that is also read one step later.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dualner import faults
from dualner.backend import comm
from dualner.backend.deepspeed_engine import DeepSpeedTrainingEngine, load_deepspeed_config, zero_stage
from dualner.backend.placement import AsyncHostCopy, HostSyncCounter, pin_memory_wanted, to_device
from dualner.checkpoint import CheckpointManager, write_json_atomic
from dualner.config import Config, evaluation_head
from dualner.data.batching import BatchLayout, derive_batch_layout
from dualner.data.loader import default_workers
from dualner.data.packing import Collator, packs_by_default
from dualner.errors import BadRecordsError, ConfigError, NonFiniteLossError, UserError
from dualner.evaluate import EvalSet, evaluate_sets, format_table
from dualner.logging import ScalarWriter, get_logger
from dualner.profiling import StepProfiler
from dualner.recipe import Recipe
from dualner.run_folder import FolderPlan, apply_plan, clear_incomplete, plan_folder


def train(run: "Run", recipe: Recipe) -> dict:
    """Train `recipe` from where the run's checkpoints stop; returns the run's summary."""
    cfg = run.cfg.train
    run.resume(recipe)
    batches = recipe.batches(run.state.step)
    if recipe.evaluate_initial_model and run.state.step == 0 and recipe.dev_sets:
        run.evaluate_dev(recipe)  # the model we start from is the one to beat (stage 2: the teacher)
        run.save(recipe)
        run.checkpoints.mark_best(0, run.state.history[-1])
    # Everything built so far (encoded data, model, modules) lives for the whole run: moved out of
    # the collector's reach, a full collection no longer walks millions of objects mid-step.
    gc.collect()
    gc.freeze()
    signals, window, steps_this_job = PreemptionSignal(), MetricWindow(), 0
    run.engine.train()
    profiler = StepProfiler.for_run(run)  # profile.enabled: torch.profiler over steps K..K+n-1
    while run.state.step < run.total_steps:
        faults.kill_if_due("kill", run.info.rank, run.state.step + 1)
        flags, samples = [], []
        with run.counting_syncs():
            for _ in range(run.layout.accumulation_steps):
                batch = window.wait_for(batches)
                samples.append(batch["meta"].get("sample_id") or batch["meta"].get("sentence_id") or [])
                terms = recipe.losses(to_device(batch, run.device))
                flags.append(run.backward(recipe.weights, terms, window))
        run.end_step(flags, samples)
        profiler.step()
        steps_this_job += 1
        step = run.state.step
        last = step == run.total_steps
        stop = signals.agreed() or steps_this_job == run.cfg.run.max_steps_per_job
        if step % cfg.log_every == 0 or last or stop:
            window = run.log_window(window, recipe)
        run.check_nonfinite(step if last or stop else step - 1, recipe)  # lag one
        problem = recipe.data_problem(final=last or stop)  # bad corpus records past data.max_bad_records
        if problem:
            run.save(recipe)
            raise BadRecordsError(f"{problem}. Stopped with checkpoint {run.checkpoints.root / f'step-{step}'}: "
                                  f"fix or remove the record(s), or raise data.max_bad_records, and run again "
                                  f"(run.resume=auto continues after them)")
        with window.paused():  # evaluation and saving stay out of the throughput window
            improved = bool(recipe.dev_sets) and (step % cfg.eval_every == 0 or last) and run.evaluate_dev(recipe)
            if run.checkpoints.due(step, last=last, improved=improved, job_done=stop):
                run.save(recipe)
                if improved:
                    run.checkpoints.mark_best(step, run.state.history[-1])
            if improved:
                recipe.on_new_best()
        if stop and not last:
            return run.stop(signals, steps_this_job)
    signals.restore()
    return run.finish(recipe)


class PreemptionSignal:
    """SIGTERM / SIGUSR1 (what Slurm and other schedulers send before preempting or at the time
    limit) and SIGINT (Ctrl-C) ask for a checkpoint at the end of a step, then the run exits 75
    (resumable). The ranks agree on the step through a host all-reduce started at the end of one
    step and read at the end of the next (nobody waits for it), since the signal reaches them at
    different moments. A second Ctrl-C stops at once, without a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signal_name = ""
        self._pending: comm.PendingHostReduce | None = None
        self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}

    def restore(self) -> None:
        """Outside the training loop a signal ends the process as usual."""
        if self._pending is not None:  # every rank started it; finish it before leaving
            self._pending.result()
            self._pending = None
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, _frame) -> None:
        if number == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name

    def agreed(self) -> bool:
        """Called by every rank at the end of every step: whether the reduction started one step
        ago saw a signal on some rank (then all ranks stop after this same step)."""
        requested = self._pending is not None and self._pending.result()[0] > 0
        self._pending = comm.PendingHostReduce([float(bool(self.signal_name))], "max")
        if requested and not self.signal_name:
            self.signal_name = "on another rank"
        return requested


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


@dataclass
class RunState:
    step: int = 0
    best_score: float = float("-inf")
    best_step: int = -1
    history: list = field(default_factory=list)  # dev results of every evaluation
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss (train.nonfinite_loss=skip)


def rng_state() -> dict:
    """Plain lists and tensors (no numpy objects), so a checkpoint reads with weights_only=True."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), position, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, rank: int) -> None:
    # Each rank draws different dropout masks, reproducibly.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def check_output_dir(path: Path) -> None:
    """Before anything is written: the run folder must be a folder we can write in."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run.output_dir={path} is a file; choose a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.output_dir={path}: cannot write in {existing} (read-only or no permission); "
                          f"choose another run.output_dir")


class Run:
    """A stage's training run. Built in this order, nothing written until `open_folder`: the run
    (process group, device, batch layout, DeepSpeed JSON: all checked), the stage's data and model,
    `build_engine`, then `open_folder` (lock, config, model assets), then `train(run, recipe)`."""

    def __init__(self, cfg: Config, stage_name: str):
        self.cfg, self.stage_name = cfg, stage_name
        self.info = comm.init_distributed()
        self.log = get_logger()
        if cfg.eval.select_on == "source" and cfg.data.source_language not in cfg.data.dev:
            raise ConfigError(f"eval.select_on=source needs data.dev.{cfg.data.source_language}")
        self.run_dir = Path(cfg.run.output_dir)
        check_output_dir(self.run_dir)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.train.keep_last,
                                             cfg.train.save_every or cfg.train.eval_every, self.log)
        seed_everything(cfg.run.seed, self.info.rank)
        self.layout: BatchLayout = derive_batch_layout(cfg.train, self.info.world_size)
        self.device = comm.accelerator_device(self.info.local_rank)
        self.ds_config = load_deepspeed_config(cfg.deepspeed.config, self.layout, self.device)
        faults.check()
        self.folder: FolderPlan = self._plan_folder()  # refusals about the folder: nothing written yet
        self.loader_workers = default_workers(cfg.data.loader_workers, self.device,
                                              int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        self.pin_memory = pin_memory_wanted(self.device)
        self.state = RunState()
        # (step, flags copied to the host as they complete, samples per micro batch), read a step later
        self._pending_flags: list[tuple[int, AsyncHostCopy, list]] = []
        self._syncs = (HostSyncCounter() if os.environ.get("DUALNER_COUNT_SYNCS") == "1"
                       and self.device.type == "cuda" else None)
        self._last_logged_step = 0

    # -- set-up -----------------------------------------------------------------------------------
    def collator(self, pad_id: int, position_offset: int | None, **extra) -> Collator:
        """Packed rows when the config asks for them and the encoder family allows it."""
        cfg = self.cfg
        packing = cfg.data.packing
        if packing == "auto":
            packing = cfg.train.batch_unit == "tokens" or packs_by_default(self.device)
        packed = packing and position_offset is not None
        if cfg.train.batch_unit == "tokens" and not packed:
            raise ConfigError("train.batch_unit=tokens needs packed rows (data.packing=true and an "
                              "encoder family dualner.attention knows)")
        row_length = cfg.data.pack_length or cfg.data.max_length
        if row_length < cfg.data.max_length:
            raise ConfigError(f"data.pack_length={row_length} must hold a whole window "
                              f"(data.max_length={cfg.data.max_length})")
        rows = None
        if cfg.train.batch_unit == "tokens":
            if cfg.train.micro_batch_size % row_length:
                raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size} tokens is not a whole "
                                  f"number of rows of data.pack_length={row_length}")
            rows = cfg.train.micro_batch_size // row_length
        return Collator(pad_id=pad_id, packed=packed, row_length=row_length,
                        position_offset=position_offset or 0, rows=rows, **extra)

    def build_engine(self, model: torch.nn.Module, total_steps: int, pad_id: int, label_set) -> None:
        self.total_steps, self.label_set = total_steps, label_set
        self.engine = DeepSpeedTrainingEngine(model, self.ds_config, self.cfg.train, total_steps,
                                              compile_encoder=self.cfg.model.compile,
                                              fixed_shapes=self.cfg.train.batch_unit == "tokens")
        self.device = self.engine.device
        self.eval_collator = self.collator(pad_id, model.position_offset)
        self.eval_collator.rows = None  # evaluation batches count sentences
        self.log.info(
            "%s: %d steps, global batch %d %s = micro %d x accumulation %d x world %d (derived into "
            "the DeepSpeed config), ZeRO stage %d from %s, %s rows", self.stage_name, total_steps,
            self.layout.global_batch_size, self.layout.unit, self.layout.micro_batch_size,
            self.layout.accumulation_steps, self.info.world_size, zero_stage(self.ds_config),
            self.cfg.deepspeed.config,
            f"packed {self.eval_collator.row_length}-token" if self.eval_collator.packed else "padded")

    def _plan_folder(self) -> FolderPlan:
        """What this job does with its folder (dualner.run_folder), decided by rank 0 reading only;
        every rank gets the answer, or raises the same refusal."""
        outcome = None
        if self.info.is_main:
            try:
                outcome = ("ok", plan_folder(self.cfg, self.checkpoints, zero_stage(self.ds_config), self.log))
            except UserError as error:
                outcome = ("refused", error)
        outcome = comm.broadcast_object(outcome)
        if outcome[0] == "refused":
            raise outcome[1]
        return outcome[1]

    def open_folder(self, write_assets: Callable[[Path], None]) -> None:
        """Take the run lock, carry out the folder plan (move an earlier run aside, save the config,
        record the job in config_history.jsonl), write (rank 0) the model assets, start TensorBoard."""
        cfg, manager = self.cfg, self.checkpoints
        manager.take_lock()
        atexit.register(manager.release_lock)
        if self.info.is_main:
            apply_plan(self.folder, cfg, self.run_dir, self.log)
            if self.folder.resume_from is None or not (self.run_dir / "model").is_dir():
                write_assets(self.run_dir)
        comm.barrier()
        self.writer = ScalarWriter(self.run_dir / "tensorboard", cfg.logging.tensorboard)
        self.progress = _progress(self.info.is_main and cfg.logging.progress_bar, self.total_steps,
                                  self.stage_name)

    @contextmanager
    def counting_syncs(self):
        """`DUALNER_COUNT_SYNCS=1`: count the host synchronisations of the steps (not of logging,
        evaluation or saving)."""
        if self._syncs is not None:
            self._syncs.enabled = True
        yield
        if self._syncs is not None:
            self._syncs.enabled = False

    # -- checkpoints ------------------------------------------------------------------------------
    def resume(self, recipe: Recipe) -> None:
        self.checkpoints.clear_stopped()
        if self.info.is_main:
            clear_incomplete(self.checkpoints)
        path = Path(self.folder.resume_from) if self.folder.resume_from else None
        if path is not None:
            client_state = self.checkpoints.load(self.engine, path, self.info.world_size)
            if "trainer" not in client_state or "ranks" not in client_state:
                raise ConfigError(f"{path}: not a DualNER checkpoint of this version (no trainer/rank state); "
                                  f"start a new run.output_dir or set run.overwrite=true")
            state = dict(client_state["trainer"])
            state.setdefault("skipped_steps", state.pop("skipped_micro_batches", 0))
            self.state = RunState(**state)
            ranks = client_state["ranks"]
            mine = ranks[self.info.rank] if len(ranks) == self.info.world_size else None
            if mine is not None:
                set_rng_state(mine["rng"])
            else:
                self.log.warning("checkpoint written by %d ranks, resuming on %d: dropout draws differ "
                                 "from the uninterrupted run", len(ranks), self.info.world_size)
                seed_everything(self.cfg.run.seed + self.state.step, self.info.rank)
            recipe.load_state(client_state, mine)
            self.log.info("resumed from %s at step %d", path, self.state.step)
        self._last_logged_step = self.state.step
        self.progress.update(self.state.step - self.progress.n)

    def save(self, recipe: Recipe) -> None:
        mine = {"rng": rng_state(), **recipe.rank_state()}
        client_state = {"trainer": self.state.__dict__.copy(), "ranks": comm.all_gather_objects(mine),
                        **recipe.shared_state()}
        self.checkpoints.save(self.engine, self.state.step, client_state)

    # -- the step ---------------------------------------------------------------------------------
    def backward(self, weights: dict[str, float], terms: dict[str, torch.Tensor],
                 window: MetricWindow) -> torch.Tensor:
        """Backward of the weighted sum of a micro batch's terms; returns its device flag (1.0: the
        loss was not finite)."""
        total = sum(weights[name] * value for name, value in terms.items())
        if faults.nan_if_due(self.info.rank, self.state.step + 1):
            total = total * float("nan")
        bad = self.engine.backward(total)
        self.engine.step()
        window.add({"total": total, **terms}, bad)
        return bad

    def end_step(self, flags: list[torch.Tensor], samples: list) -> None:
        """Keep the step's flags, copied to the host as they complete: [flag reduced over ranks (the
        optimizer skipped the step), this rank's micro-batch flags]; read one step later."""
        self.state.step += 1
        self.progress.update(1)
        self._pending_flags.append((self.state.step, AsyncHostCopy(
            torch.stack([self.engine.last_step_flag, *flags])), samples))

    def check_nonfinite(self, upto: int, recipe: Recipe) -> None:
        """The flags of the steps up to `upto`: if the optimizer skipped one, stop or count
        (train.nonfinite_loss). Every rank reads the same reduced flag, so all decide together."""
        while self._pending_flags and self._pending_flags[0][0] <= upto:
            step, copy, samples = self._pending_flags.pop(0)
            flags = copy.value().tolist()
            if flags[0] == 0:
                continue
            mine = [index for index, flag in enumerate(flags[1:]) if flag > 0]
            where = (f"step {step}, micro batch {mine[0]} (rank {self.info.rank} samples "
                     f"{samples[mine[0]][:4]}{' ...' if len(samples[mine[0]]) > 4 else ''})" if mine
                     else f"step {step} (on another rank)")
            if self.cfg.train.nonfinite_loss == "stop":
                # The optimizer skipped that step on every rank, so the current state holds no
                # update from it: checkpoint it, then stop.
                self.save(recipe)
                raise NonFiniteLossError(
                    f"non-finite loss at {where}; the step was skipped and training stopped "
                    f"(train.nonfinite_loss=stop) with checkpoint "
                    f"{self.checkpoints.root / f'step-{self.state.step}'}, where resume=auto restarts; "
                    f"lower train.lr or set train.nonfinite_loss=skip")
            self.state.skipped_steps += 1
            self.log.warning("non-finite loss at %s: the step was skipped on every rank (%d so far)", where,
                             self.state.skipped_steps)

    # -- logging ----------------------------------------------------------------------------------
    def log_window(self, window: MetricWindow, recipe: Recipe) -> MetricWindow:
        """One device reduction + one copy to the host, one host reduction: the window's only syncs.
        Returns the next window."""
        names = ["total", *recipe.TERMS]
        device_values = {name: window.device.get(name, torch.zeros((), device=self.device))
                         for name in [*names, "good_micro_batches"]} | recipe.device_statistics()
        reduced = comm.device_all_reduce(list(device_values.values()), self.device).cpu().tolist()
        sums, offset = {}, 0
        for name, value in device_values.items():
            sums[name] = reduced[offset] if value.numel() == 1 else reduced[offset:offset + value.numel()]
            offset += value.numel()
        host = dict(zip(window.host, comm.host_all_reduce(list(window.host.values()))))
        good = max(1.0, sums["good_micro_batches"])
        losses = {f"loss/{name}": sums[name] / good for name in names if name in window.device or name == "total"}
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        steps = max(1, self.state.step - self._last_logged_step)
        self._last_logged_step = self.state.step
        scalars = losses | recipe.window_scalars(sums) | {
            "lr": self.engine.lr(), "throughput/tokens_per_s": host["tokens"] / elapsed,
            "throughput/step_seconds": elapsed / steps, "throughput/tokens_per_step": host["tokens"] / steps,
            "throughput/windows_per_step": host["windows"] / steps,
            "data/packing_efficiency": host["tokens"] / max(1.0, host["computed_tokens"]),
            "data/wait_seconds": host["data/wait_seconds"] / self.info.world_size,
            "nonfinite/skipped_steps": float(self.state.skipped_steps)}
        self.writer.scalars(scalars, self.state.step)
        if self._syncs is not None:  # the JSON log only (a breakdown, not a scalar)
            scalars["debug/host_syncs_per_step"] = {k: v / steps for k, v in self._syncs.take().items()}
        self.log.info("step %d/%d loss %.4f lr %.2e %.0f tokens/s", self.state.step, self.total_steps,
                      losses["loss/total"], scalars["lr"], scalars["throughput/tokens_per_s"])
        if self.info.is_main:  # appended as we go, so a crash loses none of it
            with (self.run_dir / "losses.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": self.state.step, **scalars}) + "\n")
        return MetricWindow()

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, eval_sets: list[EvalSet]) -> dict:
        self.engine.eval()
        results = evaluate_sets(self.engine, eval_sets, self.label_set,
                                evaluation_head(self.cfg.model.variant, self.cfg.eval.head),
                                self.cfg.eval.batch_size, self.eval_collator, self.device)
        self.engine.train()
        return results

    def evaluate_dev(self, recipe: Recipe) -> bool:
        """Evaluate, log, and report whether the model is the best so far."""
        results = self.evaluate(recipe.dev_sets)
        score = (results["per_language"][self.cfg.data.source_language] if self.cfg.eval.select_on == "source"
                 else results["average"])
        self.state.history.append({"step": self.state.step, **results})
        self.writer.scalars({f"dev/f1/{lang}": f1 for lang, f1 in results["per_language"].items()}
                            | {"dev/f1/average": results["average"]}, self.state.step)
        improved = score > self.state.best_score
        if improved:
            self.state.best_score, self.state.best_step = score, self.state.step
        self.log.info("step %d dev F1 average %.2f (%s) %s", self.state.step, results["average"],
                      ", ".join(f"{k} {v:.1f}" for k, v in results["per_language"].items()),
                      "new best" if improved else f"best {self.state.best_score:.2f} @ {self.state.best_step}")
        return improved

    # -- the end ----------------------------------------------------------------------------------
    def stop(self, signals: PreemptionSignal, steps_this_job: int) -> dict:
        preempted = bool(signals.signal_name)
        reason = (f"signal {signals.signal_name} (preemption or time limit)" if preempted
                  else "run.max_steps_per_job")
        step = self.state.step
        self.log.info("stopping after %d steps in this job (%s) with checkpoint step-%d; run again with "
                      "run.resume=auto to continue", steps_this_job, reason, step)
        self.checkpoints.mark_stopped(step, reason)
        signals.restore()
        self.progress.close()
        self.writer.close()
        self.checkpoints.release_lock()
        return {"steps": step, "stopped_early": True, "preempted": preempted}

    def finish(self, recipe: Recipe) -> dict:
        self.progress.close()
        summary: dict = {"steps": self.state.step, "best_step": self.state.best_step,
                         "best_score": self.state.best_score}
        best = self.checkpoints.best()
        if best is not None:
            summary["dev"] = {"per_language": best["per_language"], "average": best["average"]}
            self.log.info("best dev F1 (step %d):\n%s", best["step"], format_table(summary["dev"], "dev F1"))
        if recipe.test_sets:
            if best is not None and best["step"] != self.state.step:
                # Test F1 of the selected model, not the last one. A full load: DeepSpeed's
                # load_module_only ignores the tag under ZeRO-3.
                # Any number of ranks: a best written by another number goes through the
                # universal checkpoint, like a resume.
                self.checkpoints.load(self.engine, self.checkpoints.root / best["path"], self.info.world_size)
            summary["test"] = self.evaluate(recipe.test_sets)
            self.log.info("test F1:\n%s", format_table(summary["test"], "test F1"))
        if self.info.is_main:
            write_json_atomic(self.run_dir / "results.json", summary)
        self.writer.close()
        comm.barrier()
        self.checkpoints.release_lock()
        return summary


def _progress(enabled: bool, total: int, description: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, desc=description, unit="step", dynamic_ncols=True)
