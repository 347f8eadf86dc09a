"""Stage 1 (SPEC "Stage 1: multitask learning"): both heads trained on labeled source data under a
DeepSpeed engine, evaluated on every configured dev set, checkpointed and resumable."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import AutoConfig, AutoTokenizer

from dualner import checkpoint as ckpt
from dualner.config import Config, ConfigError, config_to_dict, save_config
from dualner.data.batching import BatchPlan
from dualner.data.encoding import SentenceEncoder, collate
from dualner.data.sources import check_entity_types, read_labeled, split_source_fraction
from dualner.distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, init_distributed
from dualner.encoders import resolve_encoder
from dualner.engine import build_engine, derive_batch_layout, load_deepspeed_config, zero_stage
from dualner.evaluate import EvalSet, evaluate_sets, format_table
from dualner.inference import save_model_assets
from dualner.labels import LabelSet
from dualner.logging import ScalarWriter, get_logger
from dualner.losses import supervised_losses
from dualner.model import DualNERModel

_LOSS_NAMES = ("total", "seq", "start", "end")
# Sections whose change means "a different run", not "the same run continued".
_RUN_IDENTITY = ("model", "data")


@dataclass
class TrainerState:
    """What a checkpoint must hold beside the engine's files to continue exactly."""
    step: int = 0
    best_score: float = float("-inf")
    best_step: int = -1
    history: list = field(default_factory=list)  # dev results per evaluation

    def client_state(self, plan: BatchPlan, steps_per_epoch: int) -> dict:
        epoch, in_epoch = divmod(self.step, steps_per_epoch)
        return {"trainer": {"step": self.step, "best_score": self.best_score,
                            "best_step": self.best_step, "history": self.history},
                "data_position": {"epoch": epoch, "step_in_epoch": in_epoch,
                                  "steps_per_epoch": steps_per_epoch,
                                  "world_size": plan.world_size},
                "rng": all_gather_objects(_rng_state())}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
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
            changed = [section for section in _RUN_IDENTITY if previous.get(section) != current[section]]
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


def selection_score(results: dict, cfg: Config) -> float:
    if cfg.eval.select_on == "source":
        return results["per_language"][cfg.data.source_language]
    return results["average"]


class Stage1Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.info = init_distributed()
        self.log = get_logger()
        if not cfg.data.train:
            raise ConfigError("data.train: no labeled training file given (language: path)")
        if cfg.eval.select_on == "source" and cfg.data.source_language not in cfg.data.dev:
            raise ConfigError(f"eval.select_on=source needs data.dev.{cfg.data.source_language}")
        self.run_dir = prepare_run_dir(cfg, self.info)
        self.checkpoints = self.run_dir / "checkpoints"
        seed_everything(cfg.run.seed, self.info.rank)

        encoder_path = resolve_encoder(cfg.model.encoder)
        self.tokenizer = AutoTokenizer.from_pretrained(encoder_path)
        train_sentences = read_labeled(cfg.data.train, "data.train", cfg.data.max_train_sentences)
        train_sentences, _ = split_source_fraction(train_sentences, cfg.data.train_fraction, cfg.run.seed)
        self.label_set = LabelSet.from_tags([t for s in train_sentences for t in s.tags])
        self.encoder = SentenceEncoder(self.tokenizer, self.label_set, cfg.data.max_length)
        self.train_rows = self.encoder.encode(train_sentences).to_list()
        self.dev_sets = load_eval_sets(cfg.data.dev, "data.dev", self.encoder, self.label_set,
                                       cfg.data.max_eval_sentences)
        self.test_sets = load_eval_sets(cfg.data.test, "data.test", self.encoder, self.label_set,
                                        cfg.data.max_eval_sentences)

        self.layout = derive_batch_layout(cfg.train, self.info.world_size)
        ds_config = load_deepspeed_config(cfg.deepspeed.config, self.layout)
        self.plan = BatchPlan([len(row["input_ids"]) for row in self.train_rows],
                              self.layout.micro_batch_size, self.layout.accumulation_steps,
                              self.info.world_size, cfg.run.seed, cfg.train.bucket_multiplier)
        self.steps_per_epoch = self.plan.steps_per_epoch()
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch

        model = DualNERModel.from_pretrained_encoder(encoder_path, len(self.label_set.entity_types),
                                                     cfg.model.dropout)
        if cfg.model.freeze_word_embeddings:
            model.freeze_word_embeddings()
        if self.info.is_main:
            save_model_assets(self.run_dir / ckpt.MODEL_ASSETS, self.tokenizer,
                              AutoConfig.from_pretrained(encoder_path), self.label_set,
                              cfg.model.variant, cfg.data.max_length)
        self.engine = build_engine(model, ds_config, cfg.train, self.total_steps)
        self.device = self.engine.device
        self.log.info(
            "stage 1: %d training windows (%d sentences), labels %s, %d steps (%d per epoch), "
            "global batch %d = micro %d x accumulation %d x world %d (derived into the DeepSpeed "
            "config), ZeRO stage %d, %s", len(self.train_rows), len(train_sentences),
            self.label_set.bio_tags, self.total_steps, self.steps_per_epoch,
            self.layout.global_batch_size, self.layout.micro_batch_size,
            self.layout.accumulation_steps, self.info.world_size, zero_stage(ds_config),
            cfg.deepspeed.config)
        self.state = TrainerState()
        self.writer = ScalarWriter(self.run_dir / "tensorboard", cfg.logging.tensorboard)

    # -- checkpoints -------------------------------------------------------------------------
    def _resume(self) -> None:
        resume = self.cfg.run.resume
        ckpt.remove_incomplete(self.checkpoints)
        if resume == "none":
            return
        path = ckpt.latest_complete(self.checkpoints) if resume == "auto" else Path(resume)
        if path is None:
            return
        client_state = ckpt.load_checkpoint(self.engine, path)
        trainer = client_state["trainer"]
        self.state = TrainerState(trainer["step"], trainer["best_score"], trainer["best_step"],
                                  trainer["history"])
        rng_states = client_state["rng"]
        if len(rng_states) == self.info.world_size:
            _set_rng_state(rng_states[self.info.rank])
        else:
            self.log.warning("checkpoint written by %d ranks, resuming on %d: dropout draws differ "
                             "from the uninterrupted run", len(rng_states), self.info.world_size)
            seed_everything(self.cfg.run.seed + self.state.step, self.info.rank)
        self.log.info("resumed from %s at step %d", path, self.state.step)

    def _save(self) -> None:
        ckpt.save_checkpoint(self.engine, self.checkpoints, self.state.step,
                             self.state.client_state(self.plan, self.steps_per_epoch))
        ckpt.prune(self.checkpoints, self.cfg.train.keep_last)

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, eval_sets: list[EvalSet]) -> dict:
        self.engine.eval()
        results = evaluate_sets(lambda ids, mask: self.engine(ids, mask), eval_sets, self.label_set,
                                self.cfg.eval.head, self.cfg.eval.batch_size,
                                self.tokenizer.pad_token_id, self.device)
        self.engine.train()
        return results

    def _evaluate_dev(self) -> bool:
        """Evaluate, log, and report whether the student is the best so far."""
        results = self.evaluate(self.dev_sets)
        score = selection_score(results, self.cfg)
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

    # -- training ----------------------------------------------------------------------------
    def _train_step(self) -> None:
        epoch, in_epoch = divmod(self.state.step, self.steps_per_epoch)
        for indices in self.plan.rank_step(epoch, in_epoch, self.info.rank):
            batch = collate([self.train_rows[i] for i in indices], self.tokenizer.pad_token_id)
            self._window_counts += torch.tensor([batch["attention_mask"].sum().item(), 1.0])
            batch = {name: tensor.to(self.device, non_blocking=True) for name, tensor in batch.items()}
            outputs = self.engine(batch["input_ids"], batch["attention_mask"])
            terms = supervised_losses(outputs, batch, self.cfg.model.variant)
            self.engine.backward(terms["total"])
            self.engine.step()
            # Summed on the device and read only when logging: no host sync per step.
            self._loss_sums += torch.stack([terms[name].detach().float() if name in terms
                                            else terms["total"].new_zeros(()).float()
                                            for name in _LOSS_NAMES])
        self.state.step += 1

    def _log_window(self, started: float) -> None:
        totals = all_reduce_sum(torch.cat([self._loss_sums.double().cpu(), self._window_counts]))
        self._loss_sums.zero_()
        self._window_counts.zero_()
        micro_batches = max(1.0, float(totals[-1]))
        trained = _variant_terms(self.cfg.model.variant)
        losses = {f"loss/{name}": float(totals[slot]) / micro_batches
                  for slot, name in enumerate(_LOSS_NAMES) if name == "total" or name in trained}
        if not np.isfinite(losses["loss/total"]):
            raise FloatingPointError(
                f"non-finite training loss in the steps up to {self.state.step}; the last checkpoint "
                f"in {self.checkpoints} is intact")
        elapsed = max(time.perf_counter() - started, 1e-9)
        scalars = losses | {"lr": self.engine.get_lr()[0],
                            "throughput/tokens_per_s": float(totals[-2]) / elapsed}
        self.writer.scalars(scalars, self.state.step)
        self.log.info("step %d/%d loss %.4f lr %.2e %.0f tokens/s", self.state.step, self.total_steps,
                      losses["loss/total"], scalars["lr"], scalars["throughput/tokens_per_s"])
        if self.info.is_main:  # appended as we go, so a crash loses none of it
            with (self.run_dir / "losses.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": self.state.step, **losses}) + "\n")

    def train(self) -> dict:
        self._resume()
        cfg = self.cfg.train
        save_every = cfg.save_every or cfg.eval_every
        self._loss_sums = torch.zeros(len(_LOSS_NAMES), device=self.device)
        self._window_counts = torch.zeros(2, dtype=torch.float64)  # real tokens, micro batches
        steps_this_job = 0
        progress = _progress(self.info.is_main and self.cfg.logging.progress_bar, self.total_steps,
                             self.state.step)
        started = time.perf_counter()
        self.engine.train()
        while self.state.step < self.total_steps:
            self._train_step()
            steps_this_job += 1
            progress.update(1)
            step = self.state.step
            last = step == self.total_steps
            job_done = self.cfg.run.max_steps_per_job is not None and \
                steps_this_job >= self.cfg.run.max_steps_per_job
            if step % cfg.log_every == 0 or last or job_done:
                self._log_window(started)
                started = time.perf_counter()
            improved = bool(self.dev_sets) and (step % cfg.eval_every == 0 or last) and self._evaluate_dev()
            if improved or step % save_every == 0 or last or job_done:
                self._save()
                if improved:
                    ckpt.mark_best(self.checkpoints, step, self.state.history[-1])
                    ckpt.prune(self.checkpoints, cfg.keep_last)
            if job_done and not last:
                self.log.info("stopping after %d steps in this job (run.max_steps_per_job); run again "
                              "with run.resume=auto to continue from step %d", steps_this_job, step)
                progress.close()
                self.writer.close()
                return {"steps": step, "stopped_early": True}
        progress.close()
        return self._finish()

    def _finish(self) -> dict:
        summary: dict = {"steps": self.state.step, "best_step": self.state.best_step,
                         "best_score": self.state.best_score}
        best = ckpt.read_best(self.checkpoints)
        if best is not None:
            summary["dev"] = {"per_language": best["per_language"], "average": best["average"]}
            self.log.info("best dev F1 (step %d):\n%s", best["step"], format_table(summary["dev"], "dev F1"))
        if self.test_sets:
            if best is not None:  # report test F1 of the selected model, not the last one
                # A full load: DeepSpeed's load_module_only ignores the tag under ZeRO-3.
                ckpt.load_checkpoint(self.engine, self.checkpoints / best["path"])
            summary["test"] = self.evaluate(self.test_sets)
            self.log.info("test F1:\n%s", format_table(summary["test"], "test F1"))
        if self.info.is_main:
            ckpt.write_json_atomic(self.run_dir / "results.json", summary)
        self.writer.close()
        barrier()
        return summary


def _variant_terms(variant: str) -> tuple[str, ...]:
    from dualner.losses import VARIANT_TERMS
    return VARIANT_TERMS[variant]


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc="stage 1", unit="step",
                dynamic_ncols=True)


def run_stage1(cfg: Config) -> dict:
    return Stage1Trainer(cfg).train()
