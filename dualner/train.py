"""The training loop of every stage (`train`, below: torchtitan's train(), nanoGPT's loop) over a
`Trainer`: the components of a run, assembled once in a fixed order by `assemble`.

    trainer = build(spec, cfg)              dualner.build: the one order in which every stage is built
                                            (config validated once and frozen, job, inputs, model, engines,
                                            run folder, data, recipe), ending with assemble(...) below:
                                            checkpointer, metrics, evaluation
    train(trainer)

Each component exists only once it is usable (a RunFolder, with the run's one CheckpointManager,
only once the lock is held), and the checkpointer is told once what to save: the engine's files, the
trainer's progress, the recipe's state, and per rank its random generators and (stage 2) its stream
position. Stage 2's teacher saves nothing of its own: it is rebuilt from the run's best checkpoint
(dualner.stage2_teacher).

Nothing in a step waits for the device: loss terms are summed on the device and read once per log
window (dualner.metrics); a non-finite loss makes the optimizer skip that step on the device on every
rank, and its flag is read one step later, when it is long computed; preemption signals are agreed
through a host collective that is also read one step later.
"""

from __future__ import annotations

import gc
import random
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from dualner.backend import TrainingEngine, comm
from dualner.backend.placement import AsyncHostCopy, to_device
from dualner.checkpoint import Checkpointer, best_record, write_json_atomic
from dualner.config import evaluation_head
from dualner.data.packing import Collator
from dualner.errors import BadRecordsError, NonFiniteLossError
from dualner.evaluate import EvalSet, evaluate_sets, format_table
from dualner.job import Job, seed_everything
from dualner.metrics import MetricWindow, TrainingMetrics
from dualner.profiling import StepProfiler
from dualner.recipe import Recipe
from dualner.run_folder import RunFolder, clear_incomplete


def train(trainer: "Trainer") -> dict:
    """Train the recipe from where the run's checkpoints stop; returns the run's summary."""
    engine, recipe, progress, metrics = trainer.engine, trainer.recipe, trainer.progress, trainer.metrics
    cfg = trainer.job.cfg
    trainer.resume()
    batches = recipe.batches(progress.step)
    if recipe.evaluate_initial_model and progress.step == 0 and recipe.dev_sets:
        trainer.evaluate_dev()  # the model we start from is the one to beat (stage 2: the teacher)
        trainer.save(best=True)
    # Everything built so far (encoded data, model, modules) lives for the whole run: moved out of
    # the collector's reach, a full collection no longer walks millions of objects mid-step.
    gc.collect()
    gc.freeze()
    signals, window, guard, steps_this_job = PreemptionSignal(), MetricWindow(), NonFiniteGuard(), 0
    profiler = StepProfiler(cfg.profile, trainer.folder.layout.profile, trainer.job.info.rank, engine.device,
                            progress.step, trainer.total_steps)  # profile.enabled: steps K..K+n-1
    engine.train()
    while progress.step < trainer.total_steps:
        step = progress.step + 1
        recipe.begin_step(step)
        flags, samples = [], []
        with metrics.counting_syncs():
            for _ in range(engine.accumulation_steps):
                batch = window.wait_for(batches)
                samples.append(batch["meta"].get("sample_id") or batch["meta"].get("sentence_id") or [])
                terms = recipe.losses(to_device(batch, engine.device))  # the forward passes
                loss = sum(recipe.weights[name] * value for name, value in terms.items())
                flags.append(engine.backward(loss))  # 1.0 on the device when the loss is not finite
                window.add({"total": loss, **terms}, flags[-1])
            engine.optimizer_step()  # skipped on every rank when a micro batch's loss was not finite
        progress.step = step
        guard.record(step, engine.last_step_flag, flags, samples)
        metrics.step_done()
        profiler.step()
        steps_this_job += 1
        last = step == trainer.total_steps
        stop = signals.agreed() or steps_this_job == cfg.run.max_steps_per_job
        if step % cfg.train.log_every == 0 or last or stop:
            window = trainer.log_window(window)
        trainer.check_nonfinite(guard, step if last or stop else step - 1)  # lag one
        problem = recipe.data_problem(final=last or stop)  # bad corpus records past data.max_bad_records
        if problem:
            path = trainer.save()
            raise BadRecordsError(f"{problem}. Stopped with checkpoint {path}: fix or remove the record(s), or "
                                  f"raise data.max_bad_records, and run again (run.resume=auto continues after them)")
        with window.paused():  # evaluation and saving stay out of the throughput window
            improved = (bool(recipe.dev_sets) and (step % cfg.train.eval_every == 0 or last)
                        and trainer.evaluate_dev())
            if trainer.folder.checkpoints.due(step, last=last, improved=improved, job_done=stop):
                trainer.save(best=improved)
            if improved:
                recipe.on_new_best()
        if stop and not last:
            return trainer.stop(signals, steps_this_job)
    signals.restore()
    return trainer.finish()


@dataclass
class TrainerState:
    """The run's progress, the same on every rank (saved once per checkpoint, as `trainer`)."""
    step: int = 0
    best_score: float = float("-inf")
    best_step: int = -1
    history: list = field(default_factory=list)  # dev results of every evaluation
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss (train.nonfinite_loss=skip)

    def state_dict(self) -> dict:
        return asdict(self)

    def best(self) -> dict | None:
        """best.json as of now (None before the first evaluation)."""
        scores = next((entry for entry in reversed(self.history) if entry["step"] == self.best_step), None)
        return best_record(self.best_step, scores) if scores is not None else None

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        state.setdefault("skipped_steps", state.pop("skipped_micro_batches", 0))
        self.__init__(**state)


@dataclass
class Trainer:
    """A run's components (built by `assemble`); its methods are the loop's steps that touch several."""
    job: Job
    engine: TrainingEngine
    folder: RunFolder
    recipe: Recipe
    total_steps: int
    label_set: object
    eval_collator: Collator
    progress: TrainerState
    checkpointer: Checkpointer
    metrics: TrainingMetrics

    def resume(self) -> None:
        """Continue from the checkpoint the folder plan chose, if any: every component's state back."""
        self.folder.checkpoints.clear_stopped()
        if self.job.info.is_main:
            clear_incomplete(self.folder.layout)
        resume_from = self.folder.plan.resume_from
        if resume_from is not None:
            self.checkpointer.load(resume_from)
            self.job.log.info("resumed from %s at step %d", resume_from, self.progress.step)
        self.metrics.start_at(self.progress.step)

    def save(self, best: bool = False) -> Path:
        path = self.checkpointer.save(self.progress.step, self.progress.best())
        if best:
            self.folder.checkpoints.mark_best(self.progress.best())
        return path

    def evaluate(self, eval_sets: list[EvalSet]) -> dict:
        cfg = self.job.cfg
        self.engine.eval()
        results = evaluate_sets(self.engine, eval_sets, self.label_set,
                                evaluation_head(cfg.model.variant, cfg.eval.head), cfg.eval.batch_size,
                                self.eval_collator, self.engine.device)
        self.engine.train()
        return results

    def evaluate_dev(self) -> bool:
        """Evaluate, log, and report whether the model is the best so far."""
        results, state = self.evaluate(self.recipe.dev_sets), self.progress
        select_on = self.job.cfg.eval.select_on
        score = (results["per_language"][self.job.cfg.data.source_language] if select_on == "source"
                 else results["average"])
        state.history.append({"step": state.step, **results})
        improved = score > state.best_score
        if improved:
            state.best_score, state.best_step = score, state.step
        self.metrics.log_dev(state.step, results, improved, state.best_score, state.best_step)
        return improved

    def log_window(self, window: MetricWindow) -> MetricWindow:
        recipe = self.recipe
        return self.metrics.log_window(window, self.progress.step, list(recipe.TERMS), recipe.device_statistics(),
                                       recipe.window_scalars, {"lr": self.engine.lr(), "nonfinite/skipped_steps":
                                                               float(self.progress.skipped_steps)})

    def check_nonfinite(self, guard: "NonFiniteGuard", upto: int) -> None:
        """Steps up to `upto` the optimizer skipped: stop with a checkpoint or count
        (train.nonfinite_loss). Every rank reads the same reduced flag, so all decide together."""
        for where in guard.skipped(upto):
            if self.job.cfg.train.nonfinite_loss == "stop":
                # The optimizer skipped that step on every rank, so the current state holds no
                # update from it: checkpoint it, then stop.
                path = self.save()
                raise NonFiniteLossError(
                    f"non-finite loss at {where}; the step was skipped and training stopped "
                    f"(train.nonfinite_loss=stop) with checkpoint {path}, where resume=auto restarts; "
                    f"lower train.lr or set train.nonfinite_loss=skip")
            self.progress.skipped_steps += 1
            self.job.log.warning("non-finite loss at %s: the step was skipped on every rank (%d so far)", where,
                                 self.progress.skipped_steps)

    def stop(self, signals: "PreemptionSignal", steps_this_job: int) -> dict:
        preempted = bool(signals.signal_name)
        reason = (f"signal {signals.signal_name} (preemption or time limit)" if preempted
                  else "run.max_steps_per_job")
        step = self.progress.step
        self.job.log.info("stopping after %d steps in this job (%s) with checkpoint step-%d; run again with "
                          "run.resume=auto to continue", steps_this_job, reason, step)
        self.folder.checkpoints.mark_stopped(step, reason)
        signals.restore()
        self.metrics.close()
        self.folder.close()
        return {"steps": step, "stopped_early": True, "preempted": preempted}

    def finish(self) -> dict:
        checkpoints, log = self.folder.checkpoints, self.job.log
        self.metrics.progress.close()
        summary: dict = {"steps": self.progress.step, "best_step": self.progress.best_step,
                         "best_score": self.progress.best_score}
        best = checkpoints.best()
        if best is not None:
            summary["dev"] = {"per_language": best["per_language"], "average": best["average"]}
            log.info("best dev F1 (step %d):\n%s", best["step"], format_table(summary["dev"], "dev F1"))
        if self.recipe.test_sets:
            if best is not None and best["step"] != self.progress.step:
                # Test F1 of the selected model, not the last one. A full load (DeepSpeed's module-only
                # load ignores the tag under ZeRO-3), by any number of ranks: a best written by another
                # number goes through the universal checkpoint, like a resume.
                checkpoints.load(self.engine, checkpoints.root / best["path"], self.job.info.world_size)
            summary["test"] = self.evaluate(self.recipe.test_sets)
            log.info("test F1:\n%s", format_table(summary["test"], "test F1"))
        if self.job.info.is_main:
            write_json_atomic(self.folder.layout.results, summary)
        self.metrics.close()
        comm.barrier()
        self.folder.close()
        return summary


def assemble(job: Job, engine: TrainingEngine, folder: RunFolder, recipe: Recipe, total_steps: int,
             label_set, pad_id: int) -> Trainer:
    """The run's remaining components, in the one order they can be built in."""
    cfg = job.cfg
    progress = TrainerState()
    eval_collator = job.collator(pad_id, engine.module.position_offset)
    eval_collator.rows = None  # evaluation batches count sentences
    checkpointer = Checkpointer(folder.checkpoints, engine, shared={"trainer": progress, "recipe": recipe},
                                per_rank={"rng": RandomState(cfg.run.seed, progress, job.log),
                                          **recipe.per_rank_state()})
    metrics = TrainingMetrics(folder.layout, cfg.logging.tensorboard, cfg.logging.progress_bar, total_steps,
                              job.stage_name, engine.device, folder.plan.start_step + 1)
    layout = job.layout
    job.log.info(
        "%s: %d steps, global batch %d %s = micro %d x accumulation %d x world %d, engine %s, %s rows",
        job.stage_name, total_steps, layout.global_batch_size, layout.unit, layout.micro_batch_size,
        engine.accumulation_steps, job.info.world_size, job.engine_setup.describe(),
        f"packed {eval_collator.row_length}-token" if eval_collator.packed else "padded")
    return Trainer(job, engine, folder, recipe, total_steps, label_set, eval_collator, progress, checkpointer,
                   metrics)


class RandomState:
    """This rank's random generators (dropout masks), saved per rank. Resumed on the same number of
    ranks, each rank continues its own; on another number, they are reseeded from the step (the
    dropout draws then differ from the uninterrupted run's, which the log says)."""

    def __init__(self, seed: int, progress: TrainerState, log):
        self.seed, self.progress, self.log = seed, progress, log

    def state_dict(self) -> dict:
        """Plain lists and tensors (no numpy objects), so a checkpoint reads with weights_only=True."""
        name, keys, position, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(), "numpy": [name, keys.tolist(), position, has_gauss, cached],
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, every_rank: list[dict]) -> None:
        info = comm.current()
        if len(every_rank) != info.world_size:
            self.log.warning("checkpoint written by %d ranks, resuming on %d: dropout draws differ from the "
                             "uninterrupted run", len(every_rank), info.world_size)
            seed_everything(self.seed + self.progress.step, info.rank)
            return
        state = every_rank[info.rank]
        random.setstate(state["python"])
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class PendingFlags(NamedTuple):
    step: int
    flags: AsyncHostCopy  # [the step's flag reduced over ranks, this rank's flag per micro batch]
    samples: list  # this rank's sample ids per micro batch


class NonFiniteGuard:
    """Each step's flags, copied to the host as they complete and read one step later: the flag
    reduced over ranks (the optimizer skipped the step), then this rank's flag per micro batch."""

    def __init__(self):
        self._pending: list[PendingFlags] = []

    def record(self, step: int, step_flag: torch.Tensor, micro_batch_flags: list[torch.Tensor],
               samples: list) -> None:
        self._pending.append(PendingFlags(step, AsyncHostCopy(torch.stack([step_flag, *micro_batch_flags])), samples))

    def skipped(self, upto: int) -> list[str]:
        """Where each skipped step up to `upto` went wrong, as the error message names it."""
        found = []
        while self._pending and self._pending[0].step <= upto:
            step, copy, samples = self._pending.pop(0)
            step_flag, *micro_batch_flags = copy.value().tolist()
            if step_flag == 0:
                continue
            mine = [index for index, flag in enumerate(micro_batch_flags) if flag > 0]
            found.append(f"step {step}, micro batch {mine[0]} (rank {comm.current().rank} samples "
                         f"{samples[mine[0]][:4]}{' ...' if len(samples[mine[0]]) > 4 else ''})" if mine
                         else f"step {step} (on another rank)")
        return found


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
