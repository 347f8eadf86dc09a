"""Stage 2 (SPEC "Stage 2: dual teaching") as a recipe for the loop in dualner.train: a student
trained on labeled source plus streamed unlabeled target text and translations; a frozen teacher, run
on the fly for every micro batch, supplies cross-head pseudo labels; the entity-aware MSE term pulls
entity representations together; a better student replaces the teacher.

Loss terms: dualner.stage2_losses. The corpora and streams: dualner.data.stage2_inputs.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from dualner.backend import comm
from dualner.build import Engines, TrainSpec, build
from dualner.checkpoint import read_best, resolve_checkpoint
from dualner.config import Config, ModelConfig, Stage2Config
from dualner.data.encoding import WindowTokenizer
from dualner.data.packing import Collator, model_inputs
from dualner.data.sources import check_same_split, read_source
from dualner.data.stream_spec import KIND_TRANSLATION, STREAM_META
from dualner.data.streaming import Stage2Stream
from dualner.errors import BadRecordsError, CheckpointError, ConfigError, MissingPathError
from dualner.evaluate import load_eval_sets
from dualner.job import Job
from dualner.limits import check_max_length
from dualner.model import DualNERModel
from dualner.labels import LabelSet
from dualner.model_io import LoadedModel, load_trained_model
from dualner.recipe import Recipe, resolve_weights
from dualner.run_folder import RunFolder
from dualner.run_layout import RunLayout
from dualner.teacher import build_pseudo_labels
from dualner.stage2_teacher import build_teacher
from dualner.stage2_losses import STAGE2_TERMS, Forward, StepPool
from dualner.data.stage2_inputs import build_stream, check_translation_pairs, corpus_sizes, open_corpora
from dualner.train import Trainer, train


class Stage2Recipe(Recipe):
    evaluate_initial_model = True
    TERMS = STAGE2_TERMS

    def __init__(self, engine, teacher, stream: Stage2Stream, settings: Stage2Config,
                 label_set, languages: list[str], weights: dict[str, float], dev_sets: list, test_sets: list,
                 sample_log: Path | None, max_bad_records: int = 0, config_key_of: dict[str, str] | None = None):
        super().__init__(weights, dev_sets, test_sets)
        self.engine, self.teacher, self.stream, self.settings = engine, teacher, stream, settings
        self.label_set, self.languages, self.sample_log = label_set, languages, sample_log
        self.max_bad_records = max_bad_records  # data.max_bad_records
        self.config_key_of = config_key_of or {}  # corpus file -> its config key, for error messages
        self.teacher_refreshes = 0
        self._stats: dict[str, torch.Tensor] = {}
        self._step = 0  # the optimizer step being trained (begin_step)
        self._pool = StepPool()
        self._bad_total = 0.0  # bad records over every rank, agreed one step late
        self._bad_pending: comm.PendingHostReduce | None = None
        self._first_bad: dict | None = None  # the first bad record this rank's readers found

    def batches(self, start_step: int):
        self._check_known_bad_records()
        if start_step > 0:
            self._catch_up()
        if self.sample_log is not None:  # marks where this job's (possibly resumed) record begins
            with self.sample_log.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"job_starts_after_step": start_step}) + "\n")
        while True:
            batch = self.stream.next_batch()
            if self.sample_log is not None:
                self._log_samples(batch, self._step)
            yield batch

    def _catch_up(self) -> None:
        """A resume reads up to its position before the first step, every rank, then waits for the
        others with a timeout sized for the longest catch-up (a compressed file that cannot be split
        is decompressed up to the position: minutes at hundreds of GB), so that no collective of
        training waits for a rank still catching up and trips its timeout."""
        estimate = self.stream.catch_up_estimate()
        # this rank's readers catch up in parallel (loader workers), each stream after the other
        barrier = comm.PatientBarrier(sum(seconds for _, seconds, _ in estimate.values()))
        started = time.perf_counter()
        self.stream.catch_up()
        caught_up = time.perf_counter() - started
        barrier.wait()
        log = self.stream.log
        if log is not None and estimate:
            log.info("stage 2: caught up with the checkpoint's position in %.1f s, every rank in %.1f s "
                     "(the wait's timeout: %.0f s)", caught_up, time.perf_counter() - started,
                     barrier.timeout.total_seconds())

    def begin_step(self, step: int) -> None:
        self._step = step
        self._pool = StepPool()  # mse_pool=step: R_k starts empty with each step

    def _log_samples(self, batch: dict, step: int) -> None:
        meta = batch["meta"]
        with self.sample_log.open("a", encoding="utf-8") as handle:
            # later windows of a long sentence carry their first word: "file:line+offset"
            ids = [f"{sample}+{offset}" if offset else sample
                   for sample, offset in zip(meta["sample_id"], meta["word_offset"])]
            handle.write(json.dumps({"step": step, "samples": ids, "passes": meta["pass"]}) + "\n")

    def forward(self, batch: dict) -> Forward:
        inputs = model_inputs(batch)
        # Every rank runs exactly one teacher and one student forward per micro batch, which
        # ZeRO-3's parameter gathering needs to stay in step across ranks.
        teacher = self.teacher(**inputs)
        student = self.engine(**inputs)
        pseudo = build_pseudo_labels(teacher, batch["word_index"], batch["segment_ids"], batch["num_segments"],
                                     self.label_set, self.settings.confidence_threshold)
        self._add("agreement_words", pseudo.agreement_words)
        self._add("words", pseudo.words)
        self._add("entities_per_language", torch.zeros(len(self.languages), device=pseudo.words.device).index_add_(
            0, batch["segment_language"], pseudo.entities_per_segment))
        return Forward(student, teacher, pseudo, batch, self.settings, self._pool)

    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._stats[name] = self._stats[name] + value if name in self._stats else value

    def device_statistics(self) -> dict[str, torch.Tensor]:
        device = self.engine.device
        stats = {"agreement_words": self._stats.get("agreement_words", torch.zeros((), device=device)),
                 "words": self._stats.get("words", torch.zeros((), device=device)),
                 "entities_per_language": self._stats.get("entities_per_language",
                                                          torch.zeros(len(self.languages), device=device)),
                 # summed over ranks with the window's one device reduction (no collective of its own)
                 "stream_wait_seconds": torch.tensor(list(self.stream.position.take_wait_seconds().values()),
                                                     dtype=torch.float32, device=device)}
        self._stats = {}
        return stats

    def window_scalars(self, sums: dict) -> dict[str, float]:
        entities = sums["entities_per_language"]
        entities = entities if isinstance(entities, list) else [entities]
        scalars = {"teacher/agreement": sums["agreement_words"] / max(1.0, sums["words"]),
                   "teacher/refreshes": float(self.teacher_refreshes), "data/bad_records": self._bad_total}
        if "mse" in self.weights and sums.get("total"):
            # the MSE term's size: its weighted share of the total loss (loss/mse is the raw term)
            scalars["loss/mse_share"] = self.weights["mse"] * sums["mse"] / sums["total"]
        scalars |= {f"pseudo_entities/{language}": float(count) for language, count in zip(self.languages, entities)}
        # this rank's readers: time spent reading each stream (a slow stream holds its pools back)
        position = self.stream.position
        scalars |= {f"data/read_seconds/{name}": seconds for name, seconds in position.take_read_seconds().items()}
        # what the step waited for each stream, the mean over ranks (as data/wait_seconds, its total)
        waits = sums["stream_wait_seconds"]
        waits = waits if isinstance(waits, list) else [waits]
        world_size = comm.current().world_size
        scalars |= {f"data/wait_seconds/{name}": seconds / world_size for name, seconds in zip(position.names, waits)}
        return scalars

    def on_new_best(self) -> None:
        self.teacher.copy_from(self.engine)
        self.teacher_refreshes += 1

    def state_dict(self) -> dict:
        return {"teacher_refreshes": self.teacher_refreshes}

    def load_state_dict(self, state: dict) -> None:
        self.teacher_refreshes = state["teacher_refreshes"]

    def per_rank_state(self) -> dict:
        # Every rank's stream position together is one global position, which resumes on any
        # number of ranks and loader workers (dualner.data.streaming).
        return {"stream": self.stream}

    def data_problem(self, final: bool = False) -> str | None:
        """Bad corpus records (data.max_bad_records): each skipped one is logged by the rank that
        read it; the count over every rank is agreed through a host reduction read one step later.
        Past the limit, the reason to stop (the loop checkpoints first), the same on every rank."""
        log = self.stream.log
        for report in self.stream.take_bad_records():
            self._first_bad = self._first_bad or report
            if log is not None:
                log.warning("skipped a bad record of %s: %s:%s (byte %d): %s",
                            self.config_key_of.get(report["path"], "stage 2"), report["path"],
                            report["line"] if report["line"] is not None else "?", report["byte"], report["reason"])
        if self._bad_pending is not None:
            self._bad_total = self._bad_pending.result()[0]
        self._bad_pending = comm.PendingHostReduce([float(self.stream.position.bad_records)], "sum")
        if final:  # the job ends here: decide on this step's count, not the last one's
            self._bad_total = self._bad_pending.result()[0]
            self._bad_pending = None
        if self._bad_total <= self.max_bad_records:
            return None
        first = self._first_bad
        where = (f"the first on this rank: {self._describe_bad(first['path'], first['byte'], first['line'], first['reason'])}"
                 if first else "read on another rank")
        return (f"{int(self._bad_total)} bad record(s) in stage 2's corpora, more than data.max_bad_records="
                f"{self.max_bad_records}; {where}")

    def _describe_bad(self, path: str, byte: int, line: int | None, reason: str) -> str:
        return (f"{self.config_key_of.get(path, 'stage 2')}: {path}:{line if line is not None else '?'} "
                f"(byte {byte}): {reason}")

    def _check_known_bad_records(self) -> None:
        """A resumed run whose checkpoint already counted more bad records than data.max_bad_records
        stops before training (the same decision on every rank: every rank reads every rank's part),
        naming them."""
        known = sorted(self.stream.position.known_bad.values(), key=lambda entry: entry[:2])
        if len(known) <= self.max_bad_records:
            return
        named = "; ".join(self._describe_bad(*entry) for entry in known[:5]) + (" ..." if len(known) > 5 else "")
        raise BadRecordsError(
            f"the checkpoint counts {len(known)} bad record(s) in stage 2's corpora, more than data.max_bad_records="
            f"{self.max_bad_records}: {named}. Fix or remove them, or set data.max_bad_records={len(known)} or more, "
            f"and run again")


@dataclass(frozen=True)
class Stage2Inputs:
    """Stage 2's inputs, read and checked: the stage-1 model (read once: the student's start), the
    evaluation sets, the corpora and their sizes, the labeled source, the loss weights."""
    initial: LoadedModel
    tokenizer: Any
    label_set: LabelSet
    windows_of: WindowTokenizer
    dev_sets: list
    test_sets: list
    languages: list[str]  # every language a sentence can carry
    corpora: dict
    source: tuple[list, list] | None
    sizes: dict | None  # sentences per stream (stage2.mix=size)
    collate: Collator
    weights: dict[str, float]
    total_steps: int


def read_inputs(job: Job) -> Stage2Inputs:
    cfg, stage2 = job.cfg, job.cfg.stage2
    initial = load_trained_model(stage2.init_from, cfg.model.encoder_dropout, cfg.model.attention)
    tokenizer, label_set = initial.tokenizer, initial.label_set
    check_max_length(cfg.data.max_length, initial.model.encoder.config,
                     f"the stage-1 model's encoder (stage2.init_from={stage2.init_from})")
    warn_if_unfinished(stage2.init_from, initial.checkpoint, job.log)
    windows_of = WindowTokenizer(tokenizer, label_set, cfg.data.max_length)
    dev_sets = load_eval_sets(cfg.data.dev, "data.dev", windows_of, label_set, cfg.data.max_eval_sentences)
    test_sets = load_eval_sets(cfg.data.test, "data.test", windows_of, label_set, cfg.data.test_sentence_cap)
    # every language a sentence can carry (the labeled source's records name data.train's languages)
    languages = sorted({cfg.data.source_language, *cfg.data.train, *stage2.target, *stage2.translations})
    corpora = open_corpora(cfg, tokenizer, initial.model.encoder.config, job.log)
    if cfg.data.train:
        check_same_split(cfg, RunLayout.of_checkpoint(initial.checkpoint).config)
    source = read_source(cfg) if cfg.data.train else None
    if stage2.mse == "parallel":
        for (kind, language), (sources, key) in corpora.items():
            if kind == KIND_TRANSLATION:
                check_translation_pairs(sources, key, source)
    sizes = corpus_sizes(cfg, corpora, source, job.log) if stage2.mix == "size" else None
    total_steps = cfg.train.max_steps or math.ceil(stage2.epochs * sum(sizes.values()) / cfg.train.global_batch_size)
    collate = job.collator(tokenizer.pad_token_id, initial.model.position_offset, meta_columns=STREAM_META,
                           languages=tuple(languages), pair_translations=stage2.mse == "parallel")
    weights = resolve_weights(Stage2Recipe.TERMS, {name: stage2.mse_weight if name == "mse" else 1.0
                                                   for name in Stage2Recipe.TERMS}, cfg.train.loss_weights)
    return Stage2Inputs(initial, tokenizer, label_set, windows_of, dev_sets, test_sets, languages, corpora, source,
                        sizes, collate, weights, total_steps)


def build_student(job: Job, inputs: Stage2Inputs) -> DualNERModel:
    """The stage-1 model, already in memory, with this stage's dropout and frozen embeddings."""
    student = inputs.initial.model
    student.dropout.p = job.cfg.model.dropout
    if job.cfg.model.freeze_word_embeddings:
        student.freeze_word_embeddings()
    return student


def build_engines(job: Job, inputs: Stage2Inputs, student: DualNERModel) -> Engines:
    """The student's engine and the frozen teacher's: this run's best model so far on a resume, else
    the stage-1 model."""
    # the teacher first: an engine may partition the student's weights, which the teacher copies
    teacher_engine = build_teacher(job, student, inputs.initial.checkpoint, len(inputs.label_set.entity_types))
    engine = job.build_engine(student, inputs.total_steps)
    return Engines(engine, teacher_engine)


def build_data(job: Job, inputs: Stage2Inputs, folder: RunFolder) -> Stage2Stream:
    """The streams, from the position of the checkpoint the run folder resumes (its start otherwise)."""
    labeled, remainder = write_source_files(folder, inputs.source) if inputs.source is not None else (None, None)
    return build_stream(job.cfg, labeled, remainder, inputs.windows_of, inputs.collate, inputs.corpora, inputs.sizes,
                        rank=job.info.rank, world_size=job.info.world_size,
                        micro_batch_size=job.layout.micro_batch_size, workers=job.loader_workers,
                        pin_memory=job.pin_memory, log=job.log)


def write_source_files(folder: RunFolder, source: tuple[list, list]) -> tuple[Path, Path | None]:
    """The labeled source as JSONL in the run folder (with `src_id`); with train_fraction < 1 the
    remainder goes to a second, unlabeled file."""
    data = folder.layout.stage2_data
    labeled, remainder = data / "source_labeled.jsonl", data / "source_remainder.jsonl"
    if comm.current().is_main:
        data.mkdir(parents=True, exist_ok=True)
        kept, rest = source
        for path, part, with_tags in ((labeled, kept, True), (remainder, rest, False)):
            text = "".join(json.dumps({"tokens": sentence.words, "lang": sentence.language, "src_id": sentence.source,
                                       **({"tags": sentence.tags} if with_tags else {})}, ensure_ascii=False) + "\n"
                           for sentence in part).encode("utf-8")
            if path.is_file() and path.read_bytes() == text:
                continue  # a resumed run: unchanged, so the checkpoint's positions in it still hold
            temporary = path.with_suffix(".tmp")
            temporary.write_bytes(text)
            temporary.replace(path)
    comm.barrier()
    return labeled, (remainder if remainder.stat().st_size > 0 else None)


def build_recipe(job: Job, inputs: Stage2Inputs, engines: Engines, folder: RunFolder,
                 stream: Stage2Stream) -> Stage2Recipe:
    cfg = job.cfg
    sample_log = folder.layout.samples(job.info.rank) if cfg.stage2.sample_log else None
    config_key_of = {source.path: key for sources, key in inputs.corpora.values() for source in sources}
    return Stage2Recipe(engines.student, engines.teacher, stream, cfg.stage2, inputs.label_set, inputs.languages,
                        inputs.weights, inputs.dev_sets, inputs.test_sets, sample_log, cfg.data.max_bad_records,
                        config_key_of)


def build_stage2(cfg: Config) -> Trainer:
    """Read and check every input (the stage-1 model is read once), build the student, the teacher
    and their engines, then open the run folder and start the streams."""
    return build(STAGE2, cfg)


def adopt_stage1_encoder(cfg: Config) -> None:
    """Stage 2 continues the stage-1 model, so its encoder and tokenizer are the stage-1 run's. A
    `model.encoder` / `model.tokenizer` naming another is refused; one left at its default takes the
    stage-1 run's value, so config.yaml records what is trained. Before the config's validation,
    which reports a missing stage2.init_from."""
    if not cfg.stage2.init_from:
        return
    try:
        checkpoint = resolve_checkpoint(cfg.stage2.init_from)
    except (CheckpointError, MissingPathError) as error:  # name the key: the path alone does not say which
        raise type(error)(f"stage2.init_from: {error}") from None
    saved = RunLayout.of_checkpoint(checkpoint).config
    if not saved.is_file():
        return
    theirs = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("model") or {}
    for key in ("encoder", "tokenizer"):
        ours, default = getattr(cfg.model, key), getattr(ModelConfig(), key)
        if key not in theirs or _same_model(ours, theirs[key]):
            continue
        if ours == default:
            setattr(cfg.model, key, theirs[key])
            continue
        raise ConfigError(f"model.{key}={ours}: stage 2 continues the model of stage2.init_from="
                          f"{cfg.stage2.init_from}, whose {key} is {theirs[key]!r} ({saved}); remove model.{key} "
                          f"from the stage-2 config or set it to {theirs[key]!r}")


def _same_model(ours: str, theirs: str) -> bool:
    if ours == theirs:
        return True
    return bool(ours and theirs) and Path(ours).exists() and Path(theirs).exists() and \
        Path(ours).resolve() == Path(theirs).resolve()


def warn_if_unfinished(init_from: str, checkpoint: Path, log) -> None:
    """A stage-1 run folder without best.json or results.json is unfinished: say which checkpoint
    stage 2 starts from."""
    if re.match(r"^step-\d+$", Path(init_from).name):
        return  # a checkpoint named on purpose
    run = RunLayout.of_checkpoint(checkpoint)
    if read_best(checkpoint.parent) is None:
        log.warning("stage2.init_from=%s: the stage-1 run has no best checkpoint (no dev evaluation yet: "
                    "unfinished?); starting from its newest complete checkpoint, %s", init_from, checkpoint.name)
    elif not run.results.is_file():
        log.warning("stage2.init_from=%s: the stage-1 run has not finished (no results.json); starting from "
                    "its best checkpoint so far, %s", init_from, checkpoint.name)


STAGE2 = TrainSpec(stage=2, read_inputs=read_inputs, build_model=build_student, build_data=build_data,
                   build_recipe=build_recipe, build_engines=build_engines, settle=adopt_stage1_encoder)


def run_stage2(cfg: Config) -> dict:
    return train(build_stage2(cfg))
