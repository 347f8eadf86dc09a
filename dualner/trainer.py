"""The training loop shared by stage 1 and stage 2: run folder, engine, dev evaluation and model
selection, checkpoints with the trainer state, resume, logging. Stages supply their micro batches
(`next_micro_batch`) and their loss terms (`micro_batch_losses`).

Nothing in a step waits for the device: loss terms and statistics are summed on the device and
read once per log window (one reduction, one copy); a non-finite loss makes the optimizer skip that
step on the device on every rank, and its flag is read one step later, when it is long computed;
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from dualner import faults
from dualner.checkpoint import CheckpointManager, write_json_atomic
from dualner.backend import comm
from dualner.backend.comm import DistInfo
from dualner.backend.deepspeed_engine import DeepSpeedTrainingEngine, load_deepspeed_config, zero_stage
from dualner.backend.placement import AsyncHostCopy, HostSyncCounter, pin_memory_wanted, to_device
from dualner.config import Config, config_to_dict, save_config
from dualner.errors import ConfigError, NonFiniteLossError
from dualner.data.batching import BatchLayout, derive_batch_layout
from dualner.data.encoding import SentenceEncoder
from dualner.data.loader import default_workers
from dualner.data.packing import Collator, model_inputs
from dualner.data.sources import check_entity_types, read_labeled
from dualner.evaluate import EvalSet, evaluate_sets, format_table
from dualner.labels import LabelSet
from dualner.logging import ScalarWriter, get_logger

# Config sections whose change means "a different run", not "the same run continued".
_RUN_IDENTITY = ("model", "data", "stage2")


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


@dataclass
class TrainerState:
    step: int = 0
    best_score: float = float("-inf")
    best_step: int = -1
    history: list = field(default_factory=list)  # dev results of every evaluation
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss (train.nonfinite_loss=skip)

    def as_dict(self) -> dict:
        return {"step": self.step, "best_score": self.best_score, "best_step": self.best_step,
                "history": self.history, "skipped_steps": self.skipped_steps}


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


def prepare_run_dir(cfg: Config, info: DistInfo, manager: CheckpointManager) -> Path:
    """Take the run lock, refuse a folder whose checkpoints belong to another run, save the config.
    (A folder left by a start that failed before its first checkpoint is no other run.)"""
    run_dir = Path(cfg.run.output_dir)
    manager.take_lock()
    atexit.register(manager.release_lock)
    saved = run_dir / "config.yaml"
    if info.is_main:
        if saved.is_file() and not cfg.run.overwrite and manager.holds_checkpoints():
            previous = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
            current = config_to_dict(cfg)
            changed = [name for name in _RUN_IDENTITY if previous.get(name) != current.get(name)]
            if changed:
                manager.release_lock()
                raise ConfigError(
                    f"run.output_dir={run_dir} holds another run (its config.yaml differs in "
                    f"section(s) {', '.join(changed)}); choose a new output_dir or set run.overwrite=true")
        save_config(cfg, saved)
    comm.barrier()
    return run_dir


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


def load_eval_sets(paths: dict[str, str], key: str, encoder: SentenceEncoder, label_set: LabelSet,
                   max_sentences: int | None) -> list[EvalSet]:
    sets = []
    for language, path in paths.items():
        sentences = read_labeled({language: path}, key, max_sentences)
        check_entity_types(sentences, label_set, f"{key}.{language}")
        sets.append(EvalSet(language, sentences, encoder.encode(sentences).to_list()))
    return sets


def make_collator(cfg: Config, pad_id: int, position_offset: int | None, **extra) -> Collator:
    """Packed rows when the config asks for them and the encoder family allows it."""
    packed = cfg.data.packing and position_offset is not None
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


class Trainer:
    """Subclasses set tokenizer, label_set, encoder, total_steps, build the model and implement
    `next_micro_batch` and `micro_batch_losses`; they may extend the client state and react to a
    new best model."""

    stage_name = "train"
    evaluate_initial_model = False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.info = comm.init_distributed()
        self.log = get_logger()
        if cfg.eval.select_on == "source" and cfg.data.source_language not in cfg.data.dev:
            raise ConfigError(f"eval.select_on=source needs data.dev.{cfg.data.source_language}")
        # Nothing is written before the subclass has read and checked its inputs and built its model
        # and engine (open_run_dir comes last), so a failed start leaves nothing behind.
        self.run_dir = Path(cfg.run.output_dir)
        check_output_dir(self.run_dir)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.train.keep_last,
                                             cfg.train.save_every or cfg.train.eval_every, self.log)
        seed_everything(cfg.run.seed, self.info.rank)
        self.layout: BatchLayout = derive_batch_layout(cfg.train, self.info.world_size)
        self.device = comm.accelerator_device(self.info.local_rank)
        self.ds_config = load_deepspeed_config(cfg.deepspeed.config, self.layout, self.device)
        self.loader_workers = default_workers(cfg.data.loader_workers, self.device,
                                              int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        self.pin_memory = pin_memory_wanted(self.device)
        self.state = TrainerState()
        self._reset_window()
        # (step, flags copied to the host as they complete, samples per micro batch), read a step later
        self._pending_flags: list[tuple[int, AsyncHostCopy, list]] = []
        self._syncs = (HostSyncCounter() if os.environ.get("DUALNER_COUNT_SYNCS") == "1"
                       and self.device.type == "cuda" else None)

    # -- set-up helpers for subclasses -------------------------------------------------------------
    def open_run_dir(self) -> None:
        """Refuse a folder holding another run, save the config, start TensorBoard."""
        prepare_run_dir(self.cfg, self.info, self.checkpoints)
        self.writer = ScalarWriter(self.run_dir / "tensorboard", self.cfg.logging.tensorboard)

    def load_eval_data(self) -> None:
        cfg = self.cfg
        self.dev_sets = load_eval_sets(cfg.data.dev, "data.dev", self.encoder, self.label_set,
                                       cfg.data.max_eval_sentences)
        self.test_sets = load_eval_sets(cfg.data.test, "data.test", self.encoder, self.label_set,
                                        cfg.data.max_eval_sentences)

    def wrap_model(self, model: torch.nn.Module) -> None:
        self.engine = DeepSpeedTrainingEngine(model, self.ds_config, self.cfg.train, self.total_steps,
                                              compile_encoder=self.cfg.model.compile)
        self.device = self.engine.device
        self.eval_collator = make_collator(self.cfg, self.tokenizer.pad_token_id, model.position_offset)
        self.eval_collator.rows = None  # evaluation batches are sentence counts
        self.log.info(
            "%s: %d steps, global batch %d %s = micro %d x accumulation %d x world %d (derived into "
            "the DeepSpeed config), ZeRO stage %d from %s, %s rows, labels %s", self.stage_name,
            self.total_steps, self.layout.global_batch_size, self.layout.unit, self.layout.micro_batch_size,
            self.layout.accumulation_steps, self.info.world_size, zero_stage(self.ds_config),
            self.cfg.deepspeed.config,
            f"packed {self.eval_collator.row_length}-token" if self.eval_collator.packed else "padded",
            self.label_set.bio_tags)

    # -- hooks --------------------------------------------------------------------------------------
    def next_micro_batch(self) -> dict:
        """The next micro batch of this rank, collated on the host (dualner.data.packing)."""
        raise NotImplementedError

    def micro_batch_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss terms of a micro batch already on the device; "total" is what is trained."""
        raise NotImplementedError

    def loss_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def client_state(self) -> dict:
        """State shared by all ranks, saved in DeepSpeed's client state."""
        return {}

    def rank_state(self) -> dict:
        """This rank's own state (e.g. its stream position); gathered from every rank at a save."""
        return {}

    def restore_client_state(self, client_state: dict, rank_state: dict | None) -> None:
        """`rank_state` is None when the checkpoint was written by another number of ranks."""

    def on_new_best(self) -> None:
        pass

    def on_train_start(self) -> None:
        """Called once the run is resumed (or fresh), before the first step of this job."""

    def device_statistics(self) -> dict[str, torch.Tensor]:
        """Stage-specific device sums for the log window (reduced with the losses)."""
        return {}

    def window_scalars(self, device_sums: dict[str, float], host_sums: dict[str, float]) -> dict[str, float]:
        """Scalars for the log window from the reduced sums (called on every rank)."""
        return {}

    # -- one step -----------------------------------------------------------------------------------
    def train_step(self) -> None:
        step_flags = []
        step_samples = []
        for micro_batch in range(self.layout.accumulation_steps):
            waited = time.perf_counter()
            batch = self.next_micro_batch()
            self._host["data/wait_seconds"] += time.perf_counter() - waited
            self._host["tokens"] += batch["real_tokens"]
            self._host["computed_tokens"] += batch["input_ids"].numel()
            self._host["windows"] += batch["num_segments"]
            samples = batch["meta"].get("sample_id") or batch["meta"].get("sentence_id") or []
            batch = to_device(batch, self.device)
            terms = self.micro_batch_losses(batch)
            loss = terms["total"]
            if faults.nan_if_due(self.info.rank, self.state.step + 1):
                loss = loss * float("nan")
                terms["total"] = loss
            bad = self.engine.backward(loss)
            self.engine.step()
            self._accumulate(terms, bad)
            step_flags.append(bad)
            step_samples.append(samples)
        # read next step, when it is done: [flag reduced over ranks, this rank's micro-batch flags]
        self._pending_flags.append((self.state.step + 1, AsyncHostCopy(
            torch.stack([self.engine.last_step_flag, *step_flags])), step_samples))

    def _accumulate(self, terms: dict[str, torch.Tensor], bad: torch.Tensor) -> None:
        """Add one micro batch's terms on the device (a skipped micro batch adds nothing)."""
        good = 1.0 - bad
        for name in self.loss_names():
            value = terms.get(name)
            if value is None:
                continue
            value = value.detach().float()
            self._device[name] = self._device.get(name, 0) + torch.where(bad > 0, 0.0, value)
        self._device["good_micro_batches"] = self._device.get("good_micro_batches", 0) + good

    def _check_nonfinite(self, upto: int) -> None:
        """The flags of the steps up to `upto` (the loop passes the previous step: lag one): if the
        optimizer skipped one, stop or count (train.nonfinite_loss). Every rank reads the same
        reduced flag, so all decide together."""
        while self._pending_flags and self._pending_flags[0][0] <= upto:
            step, copy, samples = self._pending_flags.pop(0)
            flags = copy.value().tolist()
            if flags[0] > 0:
                self._nonfinite_step(step, flags[1:], samples)

    def _nonfinite_step(self, step: int, micro_flags: list[float], samples: list) -> None:
        mine = [index for index, flag in enumerate(micro_flags) if flag > 0]
        where = (f"step {step}, micro batch {mine[0]} (rank {self.info.rank} samples "
                 f"{samples[mine[0]][:4]}{' ...' if len(samples[mine[0]]) > 4 else ''})" if mine
                 else f"step {step} (on another rank)")
        if self.cfg.train.nonfinite_loss == "stop":
            # The optimizer skipped that step on every rank, so the current state holds no update
            # from it: checkpoint it, then stop.
            self._save()
            raise NonFiniteLossError(
                f"non-finite loss at {where}; the step was skipped and training stopped "
                f"(train.nonfinite_loss=stop) with checkpoint {self.checkpoints.root / f'step-{self.state.step}'}, "
                f"where resume=auto restarts; lower train.lr or set train.nonfinite_loss=skip")
        self.state.skipped_steps += 1
        self.log.warning("non-finite loss at %s: the step was skipped on every rank (%d so far)", where,
                         self.state.skipped_steps)

    # -- checkpoints --------------------------------------------------------------------------------
    def _resume(self) -> None:
        path = self.checkpoints.resume_point(self.cfg.run.resume)
        if path is None:
            return
        client_state = self.checkpoints.load(self.engine, path, self.info.world_size)
        if "trainer" not in client_state or "ranks" not in client_state:
            raise ConfigError(f"{path}: not a DualNER checkpoint of this version (no trainer/rank state); "
                              f"start a new run.output_dir or set run.resume=none")
        trainer = dict(client_state["trainer"])
        trainer.setdefault("skipped_steps", trainer.pop("skipped_micro_batches", 0))
        self.state = TrainerState(**trainer)
        ranks = client_state["ranks"]
        mine = ranks[self.info.rank] if len(ranks) == self.info.world_size else None
        if mine is not None:
            set_rng_state(mine["rng"])
        else:
            self.log.warning("checkpoint written by %d ranks, resuming on %d: dropout draws differ "
                             "from the uninterrupted run", len(ranks), self.info.world_size)
            seed_everything(self.cfg.run.seed + self.state.step, self.info.rank)
        self.restore_client_state(client_state, mine)
        self.log.info("resumed from %s at step %d", path, self.state.step)

    def _save(self) -> None:
        mine = {"rng": rng_state(), **self.rank_state()}
        client_state = {"trainer": self.state.as_dict(), "ranks": comm.all_gather_objects(mine),
                        **self.client_state()}
        self.checkpoints.save(self.engine, self.state.step, client_state)

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, eval_sets: list[EvalSet]) -> dict:
        self.engine.eval()
        results = evaluate_sets(self.engine, eval_sets, self.label_set, self.cfg.eval.head,
                                self.cfg.eval.batch_size, self.eval_collator, self.device)
        self.engine.train()
        return results

    def selection_score(self, results: dict) -> float:
        if self.cfg.eval.select_on == "source":
            return results["per_language"][self.cfg.data.source_language]
        return results["average"]

    def _evaluate_dev(self) -> bool:
        """Evaluate, log, and report whether the model is the best so far."""
        results = self.evaluate(self.dev_sets)
        score = self.selection_score(results)
        self.state.history.append({"step": self.state.step, **results})
        self.writer.scalars({f"dev/f1/{lang}": f1 for lang, f1 in results["per_language"].items()}
                            | {"dev/f1/average": results["average"]}, self.state.step)
        improved = score > self.state.best_score
        if improved:
            self.state.best_score, self.state.best_step = score, self.state.step
        self.log.info("step %d dev F1 average %.2f (%s) %s", self.state.step, results["average"],
                      ", ".join(f"{k} {v:.1f}" for k, v in results["per_language"].items()),
                      "new best" if improved else
                      f"best {self.state.best_score:.2f} @ {self.state.best_step}")
        return improved

    # -- logging ------------------------------------------------------------------------------------
    def _reset_window(self) -> None:
        self._device: dict[str, torch.Tensor] = {}
        self._host = {"tokens": 0.0, "computed_tokens": 0.0, "windows": 0.0, "micro_batches": 0.0,
                      "data/wait_seconds": 0.0}

    def _log_window(self, started: float) -> None:
        """One device reduction + one copy to the host, one host reduction: the window's only syncs."""
        names = [*self.loss_names(), "good_micro_batches"]
        device_values = {**{name: self._device.get(name, torch.zeros((), device=self.device)) for name in names},
                         **self.device_statistics()}
        reduced = comm.device_all_reduce(list(device_values.values()), self.device).cpu().tolist()
        sizes = [value.numel() for value in device_values.values()]
        device_sums, offset = {}, 0
        for name, size in zip(device_values, sizes):
            device_sums[name] = reduced[offset] if size == 1 else reduced[offset:offset + size]
            offset += size
        self._host["micro_batches"] = float(self.layout.accumulation_steps * max(1, self.state.step - self._last_logged_step))
        host_names = list(self._host)
        host_sums = dict(zip(host_names, comm.host_all_reduce([self._host[n] for n in host_names])))
        good = max(1.0, device_sums["good_micro_batches"])
        losses = {f"loss/{name}": device_sums[name] / good for name in self.loss_names()}
        elapsed = max(time.perf_counter() - started, 1e-9)
        steps = max(1, self.state.step - self._last_logged_step)
        self._last_logged_step = self.state.step
        scalars = losses | self.window_scalars(device_sums, host_sums) | {
            "lr": self.engine.lr(), "throughput/tokens_per_s": host_sums["tokens"] / elapsed,
            "throughput/step_seconds": elapsed / steps, "throughput/tokens_per_step": host_sums["tokens"] / steps,
            "throughput/windows_per_step": host_sums["windows"] / steps,
            "data/packing_efficiency": host_sums["tokens"] / max(1.0, host_sums["computed_tokens"]),
            "data/wait_seconds": host_sums["data/wait_seconds"] / self.info.world_size,
            "nonfinite/skipped_steps": float(self.state.skipped_steps)}
        self._reset_window()
        self.writer.scalars(scalars, self.state.step)
        if self._syncs is not None:  # the JSON log only (a breakdown, not a scalar)
            scalars["debug/host_syncs_per_step"] = {k: v / steps for k, v in self._syncs.take().items()}
        self.log.info("step %d/%d loss %.4f lr %.2e %.0f tokens/s", self.state.step, self.total_steps,
                      losses["loss/total"], scalars["lr"], scalars["throughput/tokens_per_s"])
        if self.info.is_main:  # appended as we go, so a crash loses none of it
            with (self.run_dir / "losses.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": self.state.step, **scalars}) + "\n")

    # -- the loop -----------------------------------------------------------------------------------
    def train(self) -> dict:
        self._resume()
        self.on_train_start()
        cfg = self.cfg.train
        steps_this_job = 0
        self.checkpoints.clear_stopped()
        self._last_logged_step = self.state.step
        progress = _progress(self.info.is_main and self.cfg.logging.progress_bar, self.total_steps,
                             self.state.step, self.stage_name)
        if self.evaluate_initial_model and self.state.step == 0 and self.dev_sets:
            # The model we start from is the one to beat (stage 2: the teacher).
            self._evaluate_dev()
            self._save()
            self.checkpoints.mark_best(0, self.state.history[-1])
        # Everything built so far (encoded data, model, modules) lives for the whole run: moved out of
        # the collector's reach, a full collection no longer walks millions of objects mid-step.
        gc.collect()
        gc.freeze()
        started = time.perf_counter()
        self.engine.train()
        self.preemption = PreemptionSignal()
        while self.state.step < self.total_steps:
            faults.kill_if_due("kill", self.info.rank, self.state.step + 1)
            if self._syncs is not None:
                self._syncs.enabled = True
            self.train_step()
            self.state.step += 1
            steps_this_job += 1
            progress.update(1)
            step = self.state.step
            last = step == self.total_steps
            preempted = self.preemption.agreed()
            job_done = preempted or (self.cfg.run.max_steps_per_job is not None
                                     and steps_this_job >= self.cfg.run.max_steps_per_job)
            if self._syncs is not None:
                self._syncs.enabled = False
            if step % cfg.log_every == 0 or last or job_done:
                self._log_window(started)
                started = time.perf_counter()
            # lag one: the previous step's flags (done by now); at the end of a job this step's too
            self._check_nonfinite(step if last or job_done else step - 1)
            paused = time.perf_counter()  # evaluation and saving stay out of the throughput window
            improved = bool(self.dev_sets) and (step % cfg.eval_every == 0 or last) and self._evaluate_dev()
            if self.checkpoints.due(step, last=last, improved=improved, job_done=job_done):
                self._save()
                if improved:
                    self.checkpoints.mark_best(step, self.state.history[-1])
            if improved:
                self.on_new_best()
            started += time.perf_counter() - paused
            if job_done and not last:
                reason = (f"signal {self.preemption.signal_name} (preemption or time limit)" if preempted
                          else "run.max_steps_per_job")
                self.log.info("stopping after %d steps in this job (%s) with checkpoint step-%d; run "
                              "again with run.resume=auto to continue", steps_this_job, reason, step)
                self.checkpoints.mark_stopped(step, reason)
                progress.close()
                self.writer.close()
                self.preemption.restore()
                self.checkpoints.release_lock()
                return {"steps": step, "stopped_early": True, "preempted": preempted}
        progress.close()
        self.preemption.restore()
        return self._finish()

    def _finish(self) -> dict:
        summary: dict = {"steps": self.state.step, "best_step": self.state.best_step,
                         "best_score": self.state.best_score}
        best = self.checkpoints.best()
        if best is not None:
            summary["dev"] = {"per_language": best["per_language"], "average": best["average"]}
            self.log.info("best dev F1 (step %d):\n%s", best["step"], format_table(summary["dev"], "dev F1"))
        if self.test_sets:
            if best is not None and best["step"] != self.state.step:
                # Test F1 of the selected model, not the last one. A full load: DeepSpeed's
                # load_module_only ignores the tag under ZeRO-3.
                self.checkpoints.load(self.engine, self.checkpoints.root / best["path"])
            summary["test"] = self.evaluate(self.test_sets)
            self.log.info("test F1:\n%s", format_table(summary["test"], "test F1"))
        if self.info.is_main:
            write_json_atomic(self.run_dir / "results.json", summary)
        self.writer.close()
        comm.barrier()
        self.checkpoints.release_lock()
        return summary


def _progress(enabled: bool, total: int, initial: int, description: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=description, unit="step",
                dynamic_ncols=True)
