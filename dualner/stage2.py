"""Stage 2 (SPEC "Stage 2: dual teaching"): a student trained on labeled source plus streamed
unlabeled target text and translations; a frozen teacher, run on the fly in every step, supplies
cross-head pseudo labels; the entity-aware MSE term pulls entity representations together; a better
student replaces the teacher."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dualner import checkpoint as ckpt
from dualner.checkpoint import read_best
from dualner.backend.comm import barrier
from dualner.backend.deepspeed_engine import DeepSpeedTeacher
from dualner.config import Config, ConfigError
from dualner.data.encoding import SentenceEncoder
from dualner.data.packing import model_inputs
from dualner.data.sources import read_labeled, split_source_fraction
from dualner.data.streaming import (KIND_SOURCE, KIND_TARGET, KIND_TRANSLATION, STREAM_META, Stage2Stream,
                                    check_corpus, expand_files, make_shards, rank_shards)
from dualner.inference import load_trained_model, save_model_assets
from dualner.labels import IGNORE_INDEX
from dualner.losses import (centroid_mse, entity_representations, parallel_mse, self_kl,
                            supervised_losses)
from dualner.model import DualNERModel
from dualner.teacher import build_pseudo_labels
from dualner.trainer import Trainer, make_collator

_TERMS = ("seq", "start", "end")


class Stage2Trainer(Trainer):
    stage_name = "stage 2"
    evaluate_initial_model = True

    def __init__(self, cfg: Config):
        stage2 = cfg.stage2
        if not stage2.init_from:
            raise ConfigError("stage2.init_from: name the stage-1 run folder or step-N checkpoint")
        if cfg.train.max_steps is None:
            raise ConfigError("train.max_steps: stage 2 streams corpora of unknown length; set the "
                              "number of optimizer steps")
        if cfg.model.variant != "mlt":
            raise ConfigError(f"model.variant={cfg.model.variant}: dual teaching needs both heads (mlt)")
        super().__init__(cfg)
        initial = load_trained_model(stage2.init_from, cfg.model.encoder_dropout, cfg.model.attention)
        self.tokenizer, self.label_set = initial.tokenizer, initial.label_set
        self.encoder = SentenceEncoder(self.tokenizer, self.label_set, cfg.data.max_length)
        self.load_eval_data()
        self.total_steps = cfg.train.max_steps
        self.languages = sorted({cfg.data.source_language, *stage2.target, *stage2.translations})
        # Every input is read (corpora: their first sentence) before anything is written.
        for group, key, kind in ((stage2.target, "stage2.target", KIND_TARGET),
                                 (stage2.translations, "stage2.translations", KIND_TRANSLATION)):
            for language, pattern in group.items():
                check_corpus(expand_files(pattern, f"{key}.{language}"), language, kind, f"{key}.{language}")
        self.source = self._read_source() if cfg.data.train else None
        self.collator = make_collator(cfg, self.tokenizer.pad_token_id, initial.model.position_offset,
                                      meta_columns=STREAM_META, languages=tuple(self.languages),
                                      pair_translations=stage2.mse == "parallel")

        student = initial.model
        student.dropout.p = cfg.model.dropout
        if cfg.model.freeze_word_embeddings:
            student.freeze_word_embeddings()
        teacher = DualNERModel.from_encoder_config(student.encoder.config, len(self.label_set.entity_types),
                                                   attention_mode=cfg.model.attention)
        best = read_best(self.checkpoints.root) if cfg.run.resume != "none" else None
        teacher_source = self.checkpoints.root / best["path"] if best else initial.checkpoint
        teacher.load_state_dict(ckpt.load_model_state(teacher_source))
        self.log.info("stage 2: student from %s, teacher from %s", initial.checkpoint, teacher_source)
        self.wrap_model(student)
        self.teacher = DeepSpeedTeacher(teacher, self.ds_config)
        self.open_run_dir()
        if self.info.is_main:
            save_model_assets(self.run_dir / ckpt.MODEL_ASSETS, self.tokenizer, initial.model.encoder.config,
                              self.label_set, cfg.model.variant, cfg.data.max_length)
        self.stream = self._build_stream()
        self.teacher_refreshes = 0
        self._stats: dict[str, torch.Tensor] = {}
        self._sample_log = (self.run_dir / f"samples_rank{self.info.rank}.jsonl"
                            if stage2.sample_log else None)

    # -- data ------------------------------------------------------------------------------------
    def _read_source(self) -> tuple[list, list]:
        """(labeled part, remainder) of the labeled source, each sentence's `source` its index in
        the source file (the `src_id` translations name)."""
        cfg = self.cfg
        sentences = read_labeled(cfg.data.train, "data.train", cfg.data.max_train_sentences)
        for index, sentence in enumerate(sentences):
            sentence.source = str(index)
        return split_source_fraction(sentences, cfg.data.train_fraction, cfg.run.seed)

    def _source_files(self) -> tuple[Path, Path | None]:
        """The labeled source as JSONL in the run folder (with `src_id`); with train_fraction < 1 the
        remainder goes to a second, unlabeled file."""
        folder = self.run_dir / "stage2_data"
        labeled, remainder = folder / "source_labeled.jsonl", folder / "source_remainder.jsonl"
        if self.info.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            kept, rest = self.source
            for path, part, with_tags in ((labeled, kept, True), (remainder, rest, False)):
                temporary = path.with_suffix(".tmp")
                with temporary.open("w", encoding="utf-8") as handle:
                    for sentence in part:
                        handle.write(json.dumps({"tokens": sentence.words, "lang": sentence.language,
                                                 "src_id": sentence.source,
                                                 **({"tags": sentence.tags} if with_tags else {})},
                                                ensure_ascii=False) + "\n")
                temporary.replace(path)
        barrier()
        return labeled, (remainder if remainder.stat().st_size > 0 else None)

    def _build_stream(self) -> Stage2Stream:
        """One stream per (kind, language), so languages mix evenly: the labeled source carries
        `source_weight`, and `target_weight` / `translation_weight` are shared equally by the target
        languages (the unlabeled source remainder counts as one) and by the translation languages."""
        cfg, stage2 = self.cfg, self.cfg.stage2
        world, rank, workers = self.info.world_size, self.info.rank, self.loader_workers
        labeled, remainder = self._source_files() if cfg.data.train else (None, None)
        targets = {language: expand_files(pattern, f"stage2.target.{language}")
                   for language, pattern in stage2.target.items()}
        if remainder is not None:
            targets[f"{cfg.data.source_language}-remainder"] = [str(remainder)]
        translations = {language: expand_files(pattern, f"stage2.translations.{language}")
                        for language, pattern in stage2.translations.items()}
        streams = []
        if labeled is not None:
            streams.append((KIND_SOURCE, cfg.data.source_language, [str(labeled)], stage2.source_weight))
        for kind, group, weight in ((KIND_TARGET, targets, stage2.target_weight),
                                    (KIND_TRANSLATION, translations, stage2.translation_weight)):
            streams += [(kind, language, files, weight / len(group)) for language, files in group.items()]
        sources = []
        pair_with = str(labeled) if stage2.mse == "parallel" and labeled is not None else ""
        for kind, language, files, weight in streams:
            language = language.removesuffix("-remainder")
            shards = make_shards(files, language, kind, world, workers,
                                 pair_with if kind == KIND_TRANSLATION else "")
            sources.append((rank_shards(shards, rank, world), weight))
        self.log.info("stage 2 streams over %d rank(s) x %d worker(s): %s", world, max(1, workers),
                      ", ".join(f"{kind}/{language} ({len(files)} file(s), weight {weight:.3g})"
                                for kind, language, files, weight in streams))
        # Sorting by length would pull a translation away from its source sentence.
        pool = 0 if pair_with else stage2.bucket_pool
        return Stage2Stream(sources, self.encoder, self.layout.micro_batch_size, cfg.run.seed, rank,
                            self.collator, pool=pool, workers=workers, pin_memory=self.pin_memory)

    # -- the step --------------------------------------------------------------------------------
    def loss_names(self) -> tuple[str, ...]:
        return ("total", *(f"gold_{t}" for t in _TERMS), *(f"pseudo_{t}" for t in _TERMS), "mse")

    def next_micro_batch(self) -> dict:
        batch = self.stream.next_batch()
        if self._sample_log is not None:
            meta = batch["meta"]
            with self._sample_log.open("a", encoding="utf-8") as handle:
                # later windows of a long sentence carry their first word: "file:line+offset"
                ids = [f"{sample}+{offset}" if offset else sample
                       for sample, offset in zip(meta["sample_id"], meta["word_offset"])]
                handle.write(json.dumps({"step": self.state.step + 1, "samples": ids}) + "\n")
        return batch

    def micro_batch_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        stage2 = self.cfg.stage2
        inputs = model_inputs(batch)
        # Every rank runs exactly one teacher and one student forward per micro batch, which
        # ZeRO-3's parameter gathering needs to stay in step across ranks.
        teacher_out = self.teacher(**inputs)
        student_out = self.engine(**inputs)
        pseudo = build_pseudo_labels(teacher_out, batch["word_index"], batch["segment_ids"],
                                     batch["num_segments"], self.label_set, stage2.confidence_threshold)
        terms: dict[str, torch.Tensor] = {}
        if "seq_labels" in batch:
            for name, value in supervised_losses(student_out, batch).items():
                terms[f"gold_{name}"] = value
        if stage2.teaching == "dual":
            pseudo_terms = supervised_losses(student_out, {"seq_labels": pseudo.seq_labels,
                                                           "start_labels": pseudo.start_labels,
                                                           "end_labels": pseudo.end_labels})
        else:
            pseudo_terms = self_kl(student_out, teacher_out, batch["word_index"])
            pseudo_terms["total"] = sum(pseudo_terms.values())
        for name in _TERMS:
            terms[f"pseudo_{name}"] = pseudo_terms[name]
        if stage2.mse_weight > 0:
            terms["mse"] = self._mse(student_out, batch, pseudo)
        total = terms.get("gold_total", 0) + pseudo_terms["total"] + stage2.mse_weight * terms.get("mse", 0)
        terms.pop("gold_total", None)
        terms["total"] = total
        self._add_stat("agreement_words", pseudo.agreement_words)
        self._add_stat("words", pseudo.words)
        self._add_stat("entities_per_language", torch.zeros(len(self.languages), device=self.device).index_add_(
            0, batch["segment_language"], pseudo.entities_per_segment))
        return terms

    def _add_stat(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._stats[name] = self._stats[name] + value if name in self._stats else value

    def _mse(self, student_out, batch, pseudo) -> torch.Tensor:
        # Entities come from gold labels where a window has them, else from pseudo labels.
        labels = pseudo.start_labels
        if "start_labels" in batch:
            segments = batch["segment_ids"]
            labeled = _segments_with(batch["start_labels"] != IGNORE_INDEX, segments, batch["num_segments"])
            labeled_tokens = (segments >= 0) & labeled[segments.clamp(min=0)]
            labels = torch.where(labeled_tokens, batch["start_labels"], labels)
        representations, present = entity_representations(student_out, labels, batch["word_index"],
                                                           batch["segment_ids"], batch["num_segments"])
        if self.cfg.stage2.mse == "parallel":
            return parallel_mse(representations, present, batch["pairs"])
        return centroid_mse(representations, present)

    def device_statistics(self) -> dict[str, torch.Tensor]:
        zero = torch.zeros((), device=self.device)
        stats = {"agreement_words": self._stats.get("agreement_words", zero),
                 "words": self._stats.get("words", zero),
                 "entities_per_language": self._stats.get("entities_per_language",
                                                          torch.zeros(len(self.languages), device=self.device))}
        self._stats = {}
        return stats

    def window_scalars(self, device_sums: dict, host_sums: dict) -> dict[str, float]:
        entities = device_sums["entities_per_language"]
        entities = entities if isinstance(entities, list) else [entities]
        scalars = {"teacher/agreement": device_sums["agreement_words"] / max(1.0, device_sums["words"]),
                   "teacher/refreshes": float(self.teacher_refreshes)}
        for language, count in zip(self.languages, entities):
            scalars[f"pseudo_entities/{language}"] = float(count)
        return scalars

    def on_train_start(self) -> None:
        if self._sample_log is not None:  # marks where this job's (possibly resumed) record begins
            with self._sample_log.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"job_starts_after_step": self.state.step}) + "\n")

    # -- teacher and state -----------------------------------------------------------------------
    def on_new_best(self) -> None:
        self.teacher.copy_from(self.engine)
        self.teacher_refreshes += 1
        self.log.info("step %d: the student becomes the teacher (refresh %d)", self.state.step,
                      self.teacher_refreshes)

    def client_state(self) -> dict:
        return {"teacher_refreshes": self.teacher_refreshes}

    def rank_state(self) -> dict:
        return {"stream": self.stream.state_dict()}

    def restore_client_state(self, client_state: dict, rank_state: dict | None) -> None:
        if rank_state is None:
            raise ConfigError(f"the checkpoint's stream positions were written by "
                              f"{len(client_state['ranks'])} rank(s); stage 2 resumes its streams on "
                              f"the same number of ranks only (now {self.info.world_size})")
        self.stream.load_state_dict(rank_state["stream"])
        self.teacher_refreshes = client_state["teacher_refreshes"]


def run_stage2(cfg: Config) -> dict:
    return Stage2Trainer(cfg).train()


def _segments_with(mask: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(segments,) bool: the windows with at least one True token in `mask`."""
    bins = torch.where(segment_ids >= 0, segment_ids, num_segments).reshape(-1)
    found = torch.zeros(num_segments + 1, device=mask.device).scatter_reduce(
        0, bins, mask.reshape(-1).float(), "amax")
    return found[:num_segments] > 0
