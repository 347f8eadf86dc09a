"""The training loop shared by stage 1 and stage 2: run folder, DeepSpeed engine, dev evaluation and
model selection, checkpoints with the trainer state, resume, logging. Stages fill in their data and
their step (`Stage1Trainer`, `Stage2Trainer`)."""

from __future__ import annotations

import json
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from dualner import checkpoint as ckpt
from dualner import faults
from dualner.config import Config, ConfigError, config_to_dict, save_config
from dualner.data.encoding import SentenceEncoder
from dualner.data.sources import check_entity_types, read_labeled
from dualner.distributed import (DistInfo, all_gather_objects, all_reduce_max, all_reduce_sum, barrier,
                                 broadcast_object, init_distributed)
from dualner.engine import BatchLayout, build_engine, derive_batch_layout, load_deepspeed_config, zero_stage
from dualner.evaluate import EvalSet, evaluate_sets, format_table
from dualner.labels import LabelSet
from dualner.logging import ScalarWriter, get_logger

# Config sections whose change means "a different run", not "the same run continued".
_RUN_IDENTITY = ("model", "data", "stage2")


class NonFiniteLossError(FloatingPointError):
    pass


class PreemptionSignal:
    """SIGTERM / SIGUSR1 (what Slurm and other schedulers send before preempting or at the time
    limit) ask for a checkpoint at the end of the current step. The ranks agree on the step through
    one small all-reduce per step, since the signal reaches them at different moments."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal_name = ""
        self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}

    def restore(self) -> None:
        """Outside the training loop a signal ends the process as usual."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, _frame) -> None:
        self.signal_name = signal.Signals(number).name

    def requested_on_any_rank(self) -> bool:
        requested = all_reduce_max(int(bool(self.signal_name))) > 0
        if requested and not self.signal_name:
            self.signal_name = "on another rank"
        return requested


@dataclass
class TrainerState:
    step: int = 0
    best_score: float = float("-inf")
    best_step: int = -1
    history: list = field(default_factory=list)  # dev results of every evaluation
    skipped_micro_batches: int = 0  # non-finite losses skipped (train.nonfinite_loss=skip)

    def as_dict(self) -> dict:
        return {"step": self.step, "best_score": self.best_score, "best_step": self.best_step,
                "history": self.history, "skipped_micro_batches": self.skipped_micro_batches}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, rank: int) -> None:
    # Each rank draws different dropout masks, reproducibly.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def prepare_run_dir(cfg: Config, info: DistInfo) -> Path:
    """Refuse a folder that holds another run; save the resolved config."""
    run_dir = Path(cfg.run.output_dir)
    saved = run_dir / "config.yaml"
    if info.is_main:
        if saved.is_file() and not cfg.run.overwrite:
            previous = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
            current = config_to_dict(cfg)
            changed = [name for name in _RUN_IDENTITY if previous.get(name) != current.get(name)]
            if changed:
                raise ConfigError(
                    f"run.output_dir={run_dir} holds another run (its config.yaml differs in "
                    f"section(s) {', '.join(changed)}); choose a new output_dir or set run.overwrite=true")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)
    barrier()
    return run_dir


def load_eval_sets(paths: dict[str, str], key: str, encoder: SentenceEncoder, label_set: LabelSet,
                   max_sentences: int | None) -> list[EvalSet]:
    sets = []
    for language, path in paths.items():
        sentences = read_labeled({language: path}, key, max_sentences)
        check_entity_types(sentences, label_set, f"{key}.{language}")
        sets.append(EvalSet(language, sentences, encoder.encode(sentences).to_list()))
    return sets


class Trainer:
    """Subclasses set tokenizer, label_set, encoder, total_steps, build the model and implement
    `train_step`; they may extend the client state and react to a new best model."""

    stage_name = "train"
    evaluate_initial_model = False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.info = init_distributed()
        self.log = get_logger()
        if cfg.eval.select_on == "source" and cfg.data.source_language not in cfg.data.dev:
            raise ConfigError(f"eval.select_on=source needs data.dev.{cfg.data.source_language}")
        # Nothing is written before the subclass has read and checked its inputs (open_run_dir).
        self.run_dir = Path(cfg.run.output_dir)
        self.checkpoints = self.run_dir / "checkpoints"
        seed_everything(cfg.run.seed, self.info.rank)
        self.layout: BatchLayout = derive_batch_layout(cfg.train, self.info.world_size)
        self.ds_config = load_deepspeed_config(cfg.deepspeed.config, self.layout)
        if cfg.train.nonfinite_loss == "skip" and zero_stage(self.ds_config) == 3:
            raise ConfigError("train.nonfinite_loss=skip works with ZeRO stages 0-2 (a skipped micro "
                              "batch needs whole parameters for its zero gradient); use stop under ZeRO-3")
        self.state = TrainerState()
        self._window: dict[str, torch.Tensor] = {}
        self._window_tokens = 0.0
        self._window_micro_batches = 0.0

    # -- set-up helpers for subclasses -------------------------------------------------------------
    def open_run_dir(self) -> None:
        """Refuse a folder holding another run, save the config, start TensorBoard."""
        prepare_run_dir(self.cfg, self.info)
        self.writer = ScalarWriter(self.run_dir / "tensorboard", self.cfg.logging.tensorboard)

    def load_eval_data(self) -> None:
        cfg = self.cfg
        self.dev_sets = load_eval_sets(cfg.data.dev, "data.dev", self.encoder, self.label_set,
                                       cfg.data.max_eval_sentences)
        self.test_sets = load_eval_sets(cfg.data.test, "data.test", self.encoder, self.label_set,
                                        cfg.data.max_eval_sentences)

    def wrap_model(self, model: torch.nn.Module) -> None:
        self.engine = build_engine(model, self.ds_config, self.cfg.train, self.total_steps)
        self.device = self.engine.device
        self.log.info(
            "%s: %d steps, global batch %d = micro %d x accumulation %d x world %d (derived into the "
            "DeepSpeed config), ZeRO stage %d from %s, labels %s", self.stage_name, self.total_steps,
            self.layout.global_batch_size, self.layout.micro_batch_size, self.layout.accumulation_steps,
            self.info.world_size, zero_stage(self.ds_config), self.cfg.deepspeed.config,
            self.label_set.bio_tags)

    # -- hooks --------------------------------------------------------------------------------------
    def train_step(self) -> None:
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

    def loss_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    # -- the backward pass, guarded ----------------------------------------------------------------
    def backward(self, loss: torch.Tensor, micro_batch: int, samples: list) -> bool:
        """Backward and step unless some rank's loss is not finite; then every rank, together,
        stops or skips the micro batch (train.nonfinite_loss). Returns whether it was trained on.

        The check costs one small all-reduce (and a host sync) per micro batch: the price of
        every rank deciding the same thing at the same moment."""
        if faults.nan_if_due(self.info.rank, self.state.step + 1):
            loss = loss * float("nan")
        nonfinite = all_reduce_max(int(not torch.isfinite(loss.detach()).item()))
        if nonfinite:
            where = (f"step {self.state.step + 1}, micro batch {micro_batch} "
                     f"(rank {self.info.rank} samples {samples[:4]}{' ...' if len(samples) > 4 else ''})")
            if self.cfg.train.nonfinite_loss == "stop":
                # Parameters and optimizer still hold the previous step (this step's gradients are
                # never applied), so they are checkpointed with the data position and RNG state
                # taken when the step began.
                if not ckpt.is_complete(self.checkpoints / f"step-{self.state.step}"):
                    self._save(snapshot=self._step_start)
                raise NonFiniteLossError(
                    f"non-finite loss at {where}; stopped (train.nonfinite_loss=stop) with checkpoint "
                    f"{self.checkpoints / f'step-{self.state.step}'}, where resume=auto restarts; "
                    f"lower train.lr or set train.nonfinite_loss=skip")
            self.state.skipped_micro_batches += 1
            self.log.warning("non-finite loss at %s: skipped on every rank (%d so far)", where,
                             self.state.skipped_micro_batches)
            # An exact zero gradient for every trainable parameter keeps DeepSpeed's accumulation,
            # reductions and optimizer step in lockstep across ranks, without the NaN's graph.
            zero = sum((p * 0.0).sum() for p in self.engine.module.parameters() if p.requires_grad)
            self.engine.backward(zero)
            self.engine.step()
            return False
        self.engine.backward(loss)
        self.engine.step()
        return True

    # -- accounting ---------------------------------------------------------------------------------
    def accumulate(self, values: dict[str, torch.Tensor], tokens: int) -> None:
        """Add one micro batch's terms; summed on the device and read only when logging."""
        for name in self.loss_names():
            value = values.get(name)
            value = value.detach().float() if value is not None else torch.zeros((), device=self.device)
            self._window[name] = self._window.get(name, 0) + value
        self._window_tokens += tokens
        self._window_micro_batches += 1

    def extra_scalars(self) -> dict[str, float]:
        """Stage-specific scalars for the log window (called on every rank)."""
        return {}

    # -- checkpoints --------------------------------------------------------------------------------
    def _resume(self) -> None:
        ckpt.remove_incomplete(self.checkpoints)
        resume = self.cfg.run.resume
        if resume == "none":
            return
        path = ckpt.latest_complete(self.checkpoints) if resume == "auto" else Path(resume)
        if path is None:
            return
        client_state = ckpt.load_checkpoint(self.engine, path, self.info.world_size)
        if "trainer" not in client_state or "ranks" not in client_state:
            raise ConfigError(f"{path}: not a DualNER checkpoint of this version (no trainer/rank state); "
                              f"start a new run.output_dir or set run.resume=none")
        self.state = TrainerState(**client_state["trainer"])
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

    def _snapshot(self) -> tuple[dict, dict]:
        """(this rank's state with its RNG, the shared state): local copies, no collective."""
        return {"rng": rng_state(), **self.rank_state()}, self.client_state()

    def _save(self, snapshot: tuple[dict, dict] | None = None) -> None:
        """Checkpoint the current step; with `snapshot` (taken when the step began), checkpoint
        the state before the step in progress."""
        mine, shared = snapshot if snapshot is not None else self._snapshot()
        client_state = {"trainer": self.state.as_dict(), "ranks": all_gather_objects(mine), **shared}
        ckpt.save_checkpoint(self.engine, self.checkpoints, self.state.step, client_state)
        ckpt.prune(self.checkpoints, self.cfg.train.keep_last)

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, eval_sets: list[EvalSet]) -> dict:
        self.engine.eval()
        results = evaluate_sets(lambda ids, mask: self.engine(ids, mask), eval_sets, self.label_set,
                                self.cfg.eval.head, self.cfg.eval.batch_size,
                                self.tokenizer.pad_token_id, self.device)
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
    def _log_window(self, started: float) -> None:
        names = self.loss_names()
        local = torch.stack([self._window.get(name, torch.zeros((), device=self.device)).double().cpu()
                             for name in names])
        totals = all_reduce_sum(torch.cat([local, torch.tensor(
            [self._window_tokens, self._window_micro_batches], dtype=torch.float64)]))
        self._window, self._window_tokens, self._window_micro_batches = {}, 0.0, 0.0
        micro_batches = max(1.0, float(totals[-1]))
        losses = {f"loss/{name}": float(totals[i]) / micro_batches for i, name in enumerate(names)}
        elapsed = max(time.perf_counter() - started, 1e-9)
        steps = max(1, self.state.step - self._last_logged_step)
        self._last_logged_step = self.state.step
        scalars = losses | self.extra_scalars() | {
            "lr": self.engine.get_lr()[0], "throughput/tokens_per_s": float(totals[-2]) / elapsed,
            "throughput/step_seconds": elapsed / steps, "throughput/tokens_per_step": float(totals[-2]) / steps,
            "nonfinite/skipped_micro_batches": float(self.state.skipped_micro_batches)}
        self.writer.scalars(scalars, self.state.step)
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
        save_every = cfg.save_every or cfg.eval_every
        steps_this_job = 0
        self._last_logged_step = self.state.step
        progress = _progress(self.info.is_main and self.cfg.logging.progress_bar, self.total_steps,
                             self.state.step, self.stage_name)
        if self.evaluate_initial_model and self.state.step == 0 and self.dev_sets:
            # The model we start from is the one to beat (stage 2: the teacher).
            self._evaluate_dev()
            self._save()
            ckpt.mark_best(self.checkpoints, 0, self.state.history[-1])
        started = time.perf_counter()
        self.engine.train()
        self.preemption = PreemptionSignal()
        while self.state.step < self.total_steps:
            faults.kill_if_due("kill", self.info.rank, self.state.step + 1)
            # What a checkpoint of the state before this step needs, should the step be abandoned.
            self._step_start = self._snapshot()
            self.train_step()
            self.state.step += 1
            steps_this_job += 1
            progress.update(1)
            step = self.state.step
            last = step == self.total_steps
            preempted = self.preemption.requested_on_any_rank()
            job_done = preempted or (self.cfg.run.max_steps_per_job is not None
                                     and steps_this_job >= self.cfg.run.max_steps_per_job)
            if step % cfg.log_every == 0 or last or job_done:
                self._log_window(started)
                started = time.perf_counter()
            paused = time.perf_counter()  # evaluation and saving stay out of the throughput window
            improved = bool(self.dev_sets) and (step % cfg.eval_every == 0 or last) and self._evaluate_dev()
            if improved or step % save_every == 0 or last or job_done:
                self._save()
                if improved:
                    ckpt.mark_best(self.checkpoints, step, self.state.history[-1])
                    ckpt.prune(self.checkpoints, cfg.keep_last)
                    # Rank 0 rewrites best.json and deletes old checkpoints; no rank may read the
                    # old best.json (or load a pruned checkpoint) in the meantime.
                    barrier()
            if improved:
                self.on_new_best()
            started += time.perf_counter() - paused
            if job_done and not last:
                reason = (f"signal {self.preemption.signal_name} (preemption or time limit)" if preempted
                          else "run.max_steps_per_job")
                self.log.info("stopping after %d steps in this job (%s) with checkpoint step-%d; run "
                              "again with run.resume=auto to continue", steps_this_job, reason, step)
                progress.close()
                self.writer.close()
                self.preemption.restore()
                return {"steps": step, "stopped_early": True, "preempted": preempted}
        progress.close()
        self.preemption.restore()
        return self._finish()

    def _finish(self) -> dict:
        summary: dict = {"steps": self.state.step, "best_step": self.state.best_step,
                         "best_score": self.state.best_score}
        best = broadcast_object(ckpt.read_best(self.checkpoints))  # one answer for every rank
        if best is not None:
            summary["dev"] = {"per_language": best["per_language"], "average": best["average"]}
            self.log.info("best dev F1 (step %d):\n%s", best["step"], format_table(summary["dev"], "dev F1"))
        if self.test_sets:
            if best is not None and best["step"] != self.state.step:
                # Test F1 of the selected model, not the last one. A full load: DeepSpeed's
                # load_module_only ignores the tag under ZeRO-3.
                ckpt.load_checkpoint(self.engine, self.checkpoints / best["path"])
            summary["test"] = self.evaluate(self.test_sets)
            self.log.info("test F1:\n%s", format_table(summary["test"], "test F1"))
        if self.info.is_main:
            ckpt.write_json_atomic(self.run_dir / "results.json", summary)
        self.writer.close()
        barrier()
        return summary


def _progress(enabled: bool, total: int, initial: int, description: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=description, unit="step",
                dynamic_ncols=True)
