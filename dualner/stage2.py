"""Stage 2 (SPEC "Stage 2: dual teaching") as a recipe for the loop in dualner.train: a student
trained on labeled source plus streamed unlabeled target text and translations; a frozen teacher, run
on the fly for every micro batch, supplies cross-head pseudo labels; the entity-aware MSE term pulls
entity representations together; a better student replaces the teacher.

Loss terms: `gold_seq`, `gold_start`, `gold_end` (the source's gold labels), `pseudo_seq`,
`pseudo_start`, `pseudo_end` (the teacher's cross-head pseudo labels; with stage2.teaching=self_kl,
each head's KL to the teacher's same head), `mse` (weight stage2.mse_weight, SPEC's lambda).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from dualner.backend import comm
from dualner.checkpoint import load_model_state, read_best, resolve_checkpoint
from dualner.config import Config, ModelConfig, Stage2Config, validate
from dualner.data.encoding import WindowTokenizer
from dualner.data.packing import Collator, model_inputs
from dualner.data.sources import check_same_split, read_source, refuse_shared_files
from dualner.data.corpus import CorpusFile, describe_file, estimate_records
from dualner.data.prepared import PreparedCorpus, tokenizer_fingerprint
from dualner.data.streaming import (KIND_SOURCE, KIND_TARGET, KIND_TRANSLATION, STREAM_META, HubSource,
                                    Stage2Stream, StreamSpec, check_corpus, expand_files, iter_sentences,
                                    open_sources)
from dualner.errors import BadRecordsError, CheckpointError, ConfigError, MissingPathError
from dualner.evaluate import load_eval_sets
from dualner.job import Job, start_job
from dualner.limits import check_max_length
from dualner.labels import IGNORE_INDEX
from dualner.losses import centroid_mse, entity_representations, head_kl, parallel_mse, token_cross_entropy
from dualner.model import DualNERModel, HeadOutputs
from dualner.model_io import load_trained_model, load_weights, save_model_assets
from dualner.recipe import Recipe, resolve_weights
from dualner.run_folder import RunFolder
from dualner.run_layout import RunLayout
from dualner.teacher import PseudoLabels, build_pseudo_labels
from dualner.train import Trainer, assemble, train


class StepPool:
    """What the MSE term carries from one micro batch to the next within a step (mse_pool=step)."""

    def __init__(self):
        self.carried = None


class Forward(NamedTuple):
    student: HeadOutputs
    teacher: HeadOutputs
    pseudo: PseudoLabels
    batch: dict
    settings: Stage2Config
    pool: StepPool

    @property
    def denominator(self) -> torch.Tensor | None:
        """loss_normalization=shared: the micro batch's words, for every term; else each term's own."""
        return self.pseudo.words if self.settings.loss_normalization == "shared" else None


def _gold(head: str):
    def term(f: Forward) -> torch.Tensor:
        logits = getattr(f.student, f"{head}_logits")
        if f"{head}_labels" not in f.batch:  # no labeled source window in this micro batch
            return logits.sum() * 0.0
        return token_cross_entropy(logits, f.batch[f"{head}_labels"], f.denominator)
    return term


def _pseudo(head: str):
    def term(f: Forward) -> torch.Tensor:
        logits = getattr(f.student, f"{head}_logits")
        if f.settings.teaching == "self_kl":
            return head_kl(logits, getattr(f.teacher, f"{head}_logits"), f.batch["word_index"])
        return token_cross_entropy(logits, getattr(f.pseudo, f"{head}_labels"), f.denominator)
    return term


def entity_mse(f: Forward) -> torch.Tensor:
    """Entities come from gold labels where a window has them, else from pseudo labels."""
    batch, labels = f.batch, f.pseudo.start_labels
    if "start_labels" in batch:
        segments = batch["segment_ids"]
        labeled = _segments_with(batch["start_labels"] != IGNORE_INDEX, segments, batch["num_segments"])
        labeled_tokens = (segments >= 0) & labeled[segments.clamp(min=0)]
        labels = torch.where(labeled_tokens, batch["start_labels"], labels)
    representations, present = entity_representations(f.student, labels, batch["word_index"],
                                                       batch["segment_ids"], batch["num_segments"])
    reduction = f.settings.mse_reduction
    if f.settings.mse == "parallel":
        return parallel_mse(representations, present, batch["pairs"], reduction)
    if f.settings.mse_pool == "step":
        if f.pool.carried is None:
            zeros = torch.zeros(present.shape[1], device=present.device)
            f.pool.carried = (torch.zeros(present.shape[1], representations.shape[-1], device=present.device), zeros)
        loss, f.pool.carried = centroid_mse(representations, present, reduction, f.pool.carried)
        return loss
    return centroid_mse(representations, present, reduction)


def _segments_with(mask: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(segments,) bool: the windows with at least one True token in `mask`."""
    bins = torch.where(segment_ids >= 0, segment_ids, num_segments).reshape(-1)
    found = torch.zeros(num_segments + 1, device=mask.device).scatter_reduce(
        0, bins, mask.reshape(-1).float(), "amax")
    return found[:num_segments] > 0


class Stage2Recipe(Recipe):
    evaluate_initial_model = True
    TERMS = {**{f"gold_{head}": _gold(head) for head in ("seq", "start", "end")},
             **{f"pseudo_{head}": _pseudo(head) for head in ("seq", "start", "end")},
             "mse": entity_mse}

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


def build_stage2(cfg: Config) -> Trainer:
    """Read and check every input (the stage-1 model is read once), build the student, the teacher
    and their engines, then open the run folder and start the streams."""
    stage2 = cfg.stage2
    validate(cfg, 2, engine_parser=False)  # the config's own rules before the stage-1 run it names is read
    adopt_stage1_encoder(cfg)  # before the job compares this config with its run folder's
    job = start_job(cfg, 2)
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
    corpora, fingerprint = {}, None  # the tokenizer's fingerprint: computed once, for the prepared corpora
    groups = ((stage2.target, "stage2.target", KIND_TARGET),
              (stage2.translations, "stage2.translations", KIND_TRANSLATION))
    files = {f"{key}.{language}": expand_files(pattern, f"{key}.{language}")
             for group, key, _ in groups for language, pattern in group.items()}
    refuse_shared_files({**{f"data.train.{language}": [path] for language, path in cfg.data.train.items()}, **files})
    for group, key, kind in groups:
        for language in group:
            sources = open_sources(files[f"{key}.{language}"], f"{key}.{language}")
            check_corpus(sources, language, kind, f"{key}.{language}")
            for source in sources:
                if isinstance(source, PreparedCorpus):
                    fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)
                    source.check_tokenizer(fingerprint, cfg.data.max_length, f"{key}.{language}")
                    source.check_use(language, getattr(initial.model.encoder.config, "vocab_size", None),
                                     f"{key}.{language}", job.log)
            corpora[(kind, language)] = (sources, f"{key}.{language}")
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

    student = initial.model
    student.dropout.p = cfg.model.dropout
    if cfg.model.freeze_word_embeddings:
        student.freeze_word_embeddings()
    teacher = DualNERModel.from_encoder_config(student.encoder.config, len(label_set.entity_types),
                                               attention_mode=cfg.model.attention)
    checkpoints = RunLayout(job.run_dir).checkpoints
    best = job.folder.best  # a resume: best.json as the job starts (a rewind: as it stood then)
    if best:  # resuming: the teacher is this run's best model so far
        teacher_source = checkpoints / best["path"]
        load_weights(teacher, load_model_state(teacher_source), teacher_source)
    else:  # the stage-1 model, already in memory
        teacher_source = initial.checkpoint
        teacher.load_state_dict(student.state_dict())
    job.log.info("stage 2: student from %s, teacher from %s", initial.checkpoint, teacher_source)
    engine = job.build_engine(student, total_steps)
    teacher_engine = job.engine_setup.build_teacher(teacher, stage2.teacher_placement)
    folder = RunFolder.open(job, lambda run_dir: save_model_assets(run_dir, tokenizer, student.encoder.config,
                                                                   label_set, cfg.model.variant, cfg.data.max_length))
    stream = build_stream(job, folder, windows_of, collate, source, corpora, sizes)
    sample_log = folder.layout.samples(job.info.rank) if stage2.sample_log else None
    config_key_of = {source.path: key for sources, key in corpora.values() for source in sources}
    recipe = Stage2Recipe(engine, teacher_engine, stream, stage2, label_set, languages, weights, dev_sets, test_sets,
                          sample_log, cfg.data.max_bad_records, config_key_of)
    return assemble(job, engine, folder, recipe, total_steps, label_set, tokenizer.pad_token_id)


def adopt_stage1_encoder(cfg: Config) -> None:
    """Stage 2 continues the stage-1 model, so its encoder and tokenizer are the stage-1 run's. A
    `model.encoder` / `model.tokenizer` naming another is refused; one left at its default takes the
    stage-1 run's value, so config.yaml records what is trained."""
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


def check_translation_pairs(sources: list, key: str, source, sample: int = 200) -> None:
    """stage2.mse=parallel pairs a translation with its source sentence by `src_id`: a corpus whose
    records carry none (or name no source sentence) would make the MSE term 0 at every step. The
    first `sample` records of each file are checked (start-up reads O(1) of a corpus)."""
    known = {sentence.source for sentence in source[0]} if source is not None else None
    for corpus in sources:
        if isinstance(corpus, HubSource):
            continue
        if isinstance(corpus, PreparedCorpus):
            records = ({"src_id": corpus.windows_of(i)[0]["src_id"], "sample_id": f"{corpus.path}#{i}"}
                       for i in range(min(sample, corpus.sentences)))
        elif corpus.format != "jsonl":
            raise ConfigError(f"{key}: {corpus.path}: stage2.mse=parallel pairs each translation with its source "
                              f"by `src_id`, which only JSONL records carry; use stage2.mse=centroid")
        else:
            records = iter_sentences(corpus, "", False)
        matched, seen = 0, 0
        for record in records:
            if not record["src_id"]:
                raise ConfigError(f"{key}: {record['sample_id']}: no src_id; stage2.mse=parallel pairs each "
                                  f"translation with its source sentence by src_id; add it or use stage2.mse=centroid")
            matched += known is None or record["src_id"] in known
            seen += 1
            if seen >= sample:
                break
        if seen and not matched:
            raise ConfigError(f"{key}: {corpus.path}: none of the first {seen} src_ids names a labeled source "
                              f"sentence (src_id is the sentence's index in data.train, 0 to {len(known) - 1}); "
                              f"stage2.mse=parallel would have no pair to compare")


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


@dataclass(frozen=True)
class RunFolderFile(CorpusFile):
    """A file stage 2 writes in its own run folder (the labeled source as JSONL): known by its name
    there and its content, not its absolute path and time, so that a moved (or copied) run folder
    resumes at its checkpoint's positions rather than calling the file changed."""

    digest: str = ""

    def identity(self) -> list:
        return [Path(self.path).name, self.size, self.digest]


def run_folder_file(path: Path) -> RunFolderFile:
    described = describe_file(path, "data.train")
    return RunFolderFile(described.path, described.format, described.compression, described.size,
                         described.mtime_ns, described.blocks, hashlib.sha256(path.read_bytes()).hexdigest())


def corpus_sizes(cfg: Config, corpora: dict, source: tuple[list, list] | None, log=None) -> dict:
    """Sentences per stream (stage2.mix=size): {(kind, language): count}, the labeled source and its
    unlabeled remainder included. Start-up reads O(1) of each corpus: a prepared corpus's count is
    in its manifest; a raw file up to 4 MiB is counted, a larger one estimated from 16 samples
    (dualner.data.corpus.estimate_records)."""
    sizes, estimated = {}, []
    for (kind, language), (sources, key) in corpora.items():
        total = 0
        for corpus in sources:
            if isinstance(corpus, HubSource):
                raise ConfigError(f"{key}: stage2.mix=size counts every corpus's sentences, which a hub dataset "
                                  f"({corpus.path}) does not tell in advance; use stage2.mix=equal")
            if isinstance(corpus, PreparedCorpus):
                total += corpus.sentences
                continue
            count, exact = estimate_records(corpus)
            total += count
            if not exact:
                estimated.append(corpus.path)
        sizes[(kind, language)] = total
    if estimated and log is not None:
        log.info("stage 2: sentence counts of %d large raw file(s) estimated from samples (prepare them for exact "
                 "counts): %s", len(estimated), ", ".join(estimated[:4]) + (" ..." if len(estimated) > 4 else ""))
    if source is not None:
        sizes[(KIND_SOURCE, cfg.data.source_language)] = len(source[0])
        if source[1]:
            sizes[(KIND_TARGET, f"{cfg.data.source_language}-remainder")] = len(source[1])
    return sizes


def build_stream(job: Job, folder: RunFolder, windows_of: WindowTokenizer, collate: Collator,
                 source: tuple[list, list] | None, corpora: dict, sizes: dict | None) -> Stage2Stream:
    """One stream per (kind, language). stage2.mix=size: each drawn in proportion to its sentences
    times its kind's weight; mix=equal: the labeled source carries `source_weight`, and
    `target_weight` / `translation_weight` are shared equally by the target languages (the unlabeled
    source remainder counts as one) and by the translation languages."""
    cfg, stage2 = job.cfg, job.cfg.stage2
    labeled, remainder = write_source_files(folder, source) if source is not None else (None, None)
    targets = {language: sources for (kind, language), (sources, _) in corpora.items() if kind == KIND_TARGET}
    if remainder is not None:
        targets[f"{cfg.data.source_language}-remainder"] = [run_folder_file(remainder)]
    translations = {language: sources for (kind, language), (sources, _) in corpora.items()
                    if kind == KIND_TRANSLATION}
    streams = ([(KIND_SOURCE, cfg.data.source_language, [run_folder_file(labeled)],
                 stage2.source_weight)] if labeled else [])
    for kind, group, weight in ((KIND_TARGET, targets, stage2.target_weight),
                                (KIND_TRANSLATION, translations, stage2.translation_weight)):
        streams += [(kind, language, sources, weight / len(group)) for language, sources in group.items()]
    if sizes is not None:  # kind weight x sentences
        kind_weight = {KIND_SOURCE: stage2.source_weight, KIND_TARGET: stage2.target_weight,
                       KIND_TRANSLATION: stage2.translation_weight}
        streams = [(kind, language, sources, kind_weight[kind] * sizes[(kind, language)])
                   for kind, language, sources, _ in streams]
    pair_with = str(labeled) if stage2.mse == "parallel" and labeled is not None else ""
    # the remainder's records name data.train's languages, as the labeled source's do (no one stream language)
    specs = [StreamSpec(f"{kind}/{language}", kind, "" if language.endswith("-remainder") else language, sources,
                        weight, pair_with if kind == KIND_TRANSLATION else "")
             for kind, language, sources, weight in streams]
    job.log.info("stage 2 streams over %d rank(s) x %d loader worker(s): %s", job.info.world_size,
                 max(1, job.loader_workers), ", ".join(f"{spec.name} ({len(spec.sources)} file(s), weight "
                                                       f"{spec.weight:.3g})" for spec in specs))
    # a translation and its source travel as one unit of the stream (dualner.data.streaming)
    return Stage2Stream(specs, windows_of, job.layout.micro_batch_size, cfg.run.seed, job.info.rank,
                        job.info.world_size, collate, pool=stage2.bucket_pool, workers=job.loader_workers,
                        pin_memory=job.pin_memory, range_bytes=stage2.range_mb << 20, log=job.log)


def run_stage2(cfg: Config) -> dict:
    return train(build_stage2(cfg))
