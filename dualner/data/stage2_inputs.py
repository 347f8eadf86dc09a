"""Stage 2's inputs assembled into its streams: the corpora each config key names, opened and
checked; the labeled source written into the run folder; sentences per stream for stage2.mix=size;
the streams' specs and the Stage2Stream over them (dualner.data.streaming)."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from dualner.config import Config
from dualner.data.corpus import CorpusFile, describe_file
from dualner.data.encoding import WindowTokenizer
from dualner.data.file_source import RawFileSource
from dualner.data.packing import Collator
from dualner.data.prepared import tokenizer_fingerprint
from dualner.data.source import Source
from dualner.data.source_kinds import check_corpus, expand_files, open_sources
from dualner.data.sources import refuse_shared_files
from dualner.data.stream_spec import KIND_SOURCE, KIND_TARGET, KIND_TRANSLATION, StreamSpec
from dualner.data.streaming import Stage2Stream
from dualner.errors import ConfigError


def open_corpora(cfg: Config, tokenizer, encoder_config, log) -> dict:
    """Every corpus stage2.target and stage2.translations name, opened and checked against this
    job's tokenizer and encoder: {(kind, language): (sources, config key)}."""
    stage2 = cfg.stage2
    corpora = {}
    fingerprint = functools.cache(lambda: tokenizer_fingerprint(tokenizer))  # once, where a source asks for it
    embeddings = getattr(encoder_config, "vocab_size", None)
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
                source.check_for_model(fingerprint, cfg.data.max_length, embeddings, language, f"{key}.{language}", log)
            corpora[(kind, language)] = (sources, f"{key}.{language}")
    return corpora


def check_translation_pairs(sources: list[Source], key: str, source, sample: int = 200) -> None:
    """stage2.mse=parallel pairs a translation with its source sentence by `src_id`: a corpus whose
    records carry none (or name no source sentence) would make the MSE term 0 at every step. The
    first `sample` records of each file are checked (start-up reads O(1) of a corpus)."""
    known = {sentence.source for sentence in source[0]} if source is not None else None
    for corpus in sources:
        records = corpus.translation_records(sample, key)
        if records is None:
            continue
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


@dataclass(frozen=True)
class RunFolderFile(CorpusFile):
    """A file stage 2 writes in its own run folder (the labeled source as JSONL): known by its name
    there and its content, not its absolute path and time, so that a moved (or copied) run folder
    resumes at its checkpoint's positions rather than calling the file changed."""

    digest: str = ""

    def identity(self) -> list:
        return [Path(self.path).name, self.size, self.digest]


def run_folder_file(path: Path) -> RawFileSource:
    """The labeled source's JSONL in the run folder (uncompressed) as a source."""
    described = describe_file(path, "data.train")
    return RawFileSource(RunFolderFile(described.path, described.format, described.compression, described.size,
                                       described.mtime_ns, described.blocks,
                                       hashlib.sha256(path.read_bytes()).hexdigest()))


def corpus_sizes(cfg: Config, corpora: dict, source: tuple[list, list] | None, log=None) -> dict:
    """Sentences per stream (stage2.mix=size): {(kind, language): count}, the labeled source and its
    unlabeled remainder included. Start-up reads O(1) of each corpus: a prepared corpus's count is
    in its manifest; a raw file up to 4 MiB is counted, a larger one estimated from 16 samples
    (dualner.data.file_source.estimate_records)."""
    sizes, estimated = {}, []
    for (kind, language), (sources, key) in corpora.items():
        total = 0
        for corpus in sources:
            count, exact = corpus.count(key)
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


def build_stream(cfg: Config, labeled: Path | None, remainder: Path | None, windows_of: WindowTokenizer,
                 collate: Collator, corpora: dict, sizes: dict | None, *, rank: int, world_size: int,
                 micro_batch_size: int, workers: int, pin_memory: bool, log) -> Stage2Stream:
    """One stream per (kind, language), read by this rank's `workers` loader workers (`rank` of
    `world_size`). stage2.mix=size: each drawn in proportion to its sentences times its kind's
    weight; mix=equal: the labeled source (`labeled`, written in the run folder) carries
    `source_weight`, and `target_weight` / `translation_weight` are shared equally by the target
    languages (the unlabeled source `remainder` counts as one) and by the translation languages."""
    stage2 = cfg.stage2
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
    log.info("stage 2 streams over %d rank(s) x %d loader worker(s): %s", world_size, max(1, workers), ", ".join(f"{spec.name} ({len(spec.sources)} file(s), weight "
                                                       f"{spec.weight:.3g})" for spec in specs))
    # a translation and its source travel as one unit of the stream (dualner.data.streaming)
    return Stage2Stream(specs, windows_of, micro_batch_size, cfg.run.seed, rank, world_size, collate,
                        pool=stage2.bucket_pool, workers=workers, pin_memory=pin_memory,
                        range_bytes=stage2.range_mb << 20, log=log)
