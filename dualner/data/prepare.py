"""`python -m dualner prepare`: unlabeled corpora tokenized once into a prepared corpus (the format:
dualner.data.prepared), on one rank or many (torchrun, srun), resumable; the pieces and shards:
dualner.data.prepare_shards."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

from dualner.data.corpus import BadRecord, CorpusFile, RecordReader, check_complete, describe_file, line_numbers, parse_record
from dualner.data.formats import DecompressionError
from dualner.data.prepare_shards import (every_shard, finished_shard, init_worker, rank_units, shard_inputs,
                                         use_tokenizer, write_atomically, write_shard)
from dualner.data.prepared import (FORMAT_NAME, MANIFEST, VERSION, PreparedCorpus, is_prepared, tokenizer_fingerprint,
                                   unfinished_preparation, verify)
from dualner.data.sources import refuse_shared_files
from dualner.errors import ConfigError, DataFormatError, MissingPathError
from dualner.run_layout import RunLayout


def default_workers() -> int:
    """The cores this rank may use: Slurm's SLURM_CPUS_PER_TASK, else the cores this process may run
    on shared among the ranks of its node (torchrun's LOCAL_WORLD_SIZE)."""
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    return max(1, len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def check_window_fits(max_length: int, tokenizer_path: str) -> None:
    """--max-length must fit the encoder the tokenizer belongs to (where its folder holds a model's
    config): stage 2 would refuse the corpus, after all the work."""
    if not (Path(tokenizer_path) / "config.json").is_file():
        return
    from transformers import AutoConfig

    from dualner.limits import window_limit
    limit = window_limit(AutoConfig.from_pretrained(tokenizer_path))
    if limit is not None and max_length > limit:
        raise ConfigError(f"prepare: --max-length {max_length} is more than the encoder of {tokenizer_path} can "
                          f"hold (windows of at most {limit} tokens); use --max-length {limit} or less, as "
                          f"data.max_length of the stage-2 run")


def prepare(inputs: list[str], output: str, tokenizer_path: str, max_length: int, language: str = "",
            workers: int | None = None, shard_bytes: int = 64 << 20, max_bad_records: int = 0,
            log=print, rank: int = 0, world_size: int = 1) -> dict | None:
    """Tokenize `inputs` into a prepared corpus in `output`: this rank's part of the work (of
    `world_size` ranks started on the same inputs and output). Everything is checked before a folder
    is made; the corpus is built in `<output>.partial` and renamed to `output` by the rank that
    finishes last, so `output` never holds half a corpus. Returns the manifest there, None on the
    other ranks. A failed run keeps the shards it finished (none, on one rank: the folder goes), and
    prepare run again continues from them."""
    if not inputs:
        raise ConfigError("prepare: name at least one input file")
    refuse_shared_files({"prepare": inputs})  # a file named twice (or a link to it) would be prepared twice
    files = []
    for path in inputs:
        if Path(path).is_dir():
            raise MissingPathError(f"prepare: {path} is a folder; name its corpus files (e.g. {path}/*.txt)")
        if not Path(path).is_file():
            raise MissingPathError(f"prepare: input not found: {path}")
        files.append(describe_file(path, "prepare"))
        try:
            check_complete(files[-1])
        except DecompressionError as error:
            raise DecompressionError(f"prepare: {error}") from None
        _check_holds_a_sentence(files[-1], language, max_bad_records)
    tokenizer_path, tokenizer = load_tokenizer(tokenizer_path)
    check_window_fits(max_length, tokenizer_path)
    inputs_record = [{"path": str(Path(f.path).resolve()), "size": os.stat(f.path).st_size, "mtime_ns": f.mtime_ns}
                     for f in files]
    plan = {"version": VERSION, "inputs": inputs_record, "max_length": max_length, "language": language, "shard_bytes": shard_bytes,
            "tokenizer": tokenizer_fingerprint(tokenizer)}
    folder = Path(output)
    work = folder.with_name(f"{folder.name}.partial")
    finished = _claim_output(folder, work, plan, log)
    if finished is not None:
        return finished
    try:
        manifest = _prepare_in(work, files, plan, tokenizer, tokenizer_path, max_length, language, workers,
                               shard_bytes, max_bad_records, log, rank, world_size)
    except BaseException:
        if world_size == 1 and not any(work.glob("*.done.json")):  # nothing to continue from
            shutil.rmtree(work, ignore_errors=True)
        raise
    if manifest is None:  # other ranks are still at work: the last one renames the folder
        return None
    try:
        os.replace(work, folder)
    except FileNotFoundError:  # two ranks finished together: the other one renamed it
        if not is_prepared(folder):
            raise
    return manifest


def _check_holds_a_sentence(file: CorpusFile, language: str, max_bad_records: int) -> None:
    """An input without a sentence (empty, blank, only bad records) refused before anything is made;
    reads up to its first sentence."""
    bad = []
    for record in RecordReader(file, 0, file.end):
        try:
            if parse_record(record, file, language, labeled=False) is not None:
                return
        except BadRecord as error:
            bad.append(error)
            if len(bad) > max_bad_records:
                raise DataFormatError(f"prepare: {error}") from None
    raise DataFormatError(f"prepare: {file.path}: " + ("file is empty" if file.size == 0 else
                                                       "holds no sentence" + (" but bad records" if bad else "")))


def load_tokenizer(name: str):
    """(path, tokenizer) of `prepare --tokenizer`: a run folder (the tokenizer it trained with), an
    exported model, a built-in alias (`multilingual-e5-small`, built offline as model.encoder builds
    it) or a hub name; one line, at once, for a name that cannot be had (offline: no minute of retries)."""
    from transformers import AutoTokenizer

    from dualner.encoders import resolve_encoder
    run_model = RunLayout(name).model
    path = str(run_model) if run_model.is_dir() else resolve_encoder(name, "prepare --tokenizer")
    try:
        return path, AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise ConfigError(f"prepare --tokenizer {name}: no tokenizer can be loaded from {path} ({reason}); name a "
                          f"stage-1 run folder, an exported model or a tokenizer folder") from None


def _claim_output(folder: Path, work: Path, plan: dict, log) -> dict | None:
    """Decide what becomes of --output before anything is written: its manifest when it already
    holds this preparation (nothing to do), else None with `work` ready to write in. Nothing that
    is not a preparation of the same inputs and settings is replaced."""
    def plan_of(path: Path) -> dict | None:
        try:
            return json.loads((path / "prepare.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"prepare --output {folder}: is a file; name a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if plan_of(folder) != plan:
            raise ConfigError(f"prepare --output {folder}: holds something else (not a preparation of these inputs "
                              f"and settings); choose another --output or remove it")
        if is_prepared(folder):
            try:  # every shard file of its size, and its ends as checksummed (cheap: 128 KiB a file)
                manifest = PreparedCorpus.open(folder, "prepare --output").manifest
                damage = ", ".join(shard["name"] for shard in manifest["shards"] if finished_shard(folder, shard["name"]) is None)
            except DataFormatError as error:
                damage = str(error)
            if not damage:
                log(f"prepare: {folder} already holds this preparation")
                return manifest
            log(f"prepare: {folder}: damaged ({damage}): redoing the damaged shards")
        if work.exists():
            raise ConfigError(f"prepare: {folder} and {work} both hold unfinished preparations; remove one")
        os.replace(folder, work)  # a damaged or unfinished preparation (an older DualNER wrote in place): continue it
    elif folder.is_dir():
        folder.rmdir()  # an empty folder made beforehand: the finished corpus takes its place
    if work.exists() and plan_of(work) != plan:
        if plan_of(work) is None and any(work.iterdir()):
            raise ConfigError(f"prepare: {work} (where --output {folder} is built) holds something else; remove it")
        log(f"prepare: {work} held a preparation of other inputs or settings: starting over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_atomically(work / "prepare.json", json.dumps(plan, indent=1))  # ranks of one job write the same
    return None


def _prepare_in(folder: Path, files: list[CorpusFile], plan: dict, tokenizer, tokenizer_path: str, max_length: int,
                language: str, workers: int | None, shard_bytes: int, max_bad_records: int, log, rank: int,
                world_size: int) -> dict | None:
    """This rank's shards of `files` in `folder` (those done already are kept), then, once every
    rank's are done, the manifest (None while other ranks are still at work)."""
    inputs_record = plan["inputs"]
    (folder / MANIFEST).unlink(missing_ok=True)
    workers = workers or default_workers()
    context = multiprocessing.get_context("spawn")
    results, kept = [], []

    def todo():
        for file, piece, records in shard_inputs(files, rank_units(files, shard_bytes, rank, world_size), shard_bytes,
                                            folder):
            counts = finished_shard(folder, piece.name)
            if counts is not None:
                kept.append(counts)
                continue
            yield file, piece, records

    args = (tokenizer_path, max_length, language, str(folder))
    if workers == 1:  # in this process, with the tokenizer it loaded (a load costs seconds of CPU)
        use_tokenizer(tokenizer, max_length, language, str(folder))
        results += [write_shard(task) for task in todo()]
    else:
        with context.Pool(workers, initializer=init_worker, initargs=args) as pool:
            for counts in pool.imap_unordered(write_shard, todo(), chunksize=1):
                results.append(counts)
                log(f"prepare: {counts['name']}: {counts['sentences']} sentences")
    if kept:
        log(f"prepare: continued the preparation in {folder}: {len(kept)} shard(s) finished by an earlier run "
            f"kept ({sum(len(counts['bad_records']) for counts in kept)} bad record(s) in them, checked against "
            f"--max-bad-records={max_bad_records} below), {len(results)} made now")
        results += kept
    if world_size > 1:  # the ranks' shards together, once the last one is done
        log(f"prepare: rank {rank} of {world_size}: its {len(results)} shard(s) are done")
        results = every_shard(files, shard_bytes, folder)
        if results is None:
            log(f"prepare: rank {rank}: other ranks are still at work; the last to finish writes the manifest")
            return None
    results.sort(key=lambda counts: counts["name"])
    records = [record for counts in results for record in counts["bad_records"]]
    bad = _bad_record_messages(records, files)
    damage = [message for record, message in zip(records, bad) if record[4:5] == [True]]
    if damage:  # the codec's failure, not the garbage a corrupted stream may decompress to before it
        others = len(bad) - 1
        raise DecompressionError(f"prepare: {damage[0]}" + (
            f"; the {others} other bad record(s) may come from the same damage" if others else ""))
    if len(bad) > max_bad_records:
        raise DataFormatError(f"prepare: {len(bad)} bad record(s), more than --max-bad-records={max_bad_records}; "
                              f"the first: {bad[0]} (fix or remove it, or raise --max-bad-records; the shards "
                              f"done are kept in {folder}: run prepare again to finish)")
    for message in bad:
        log(f"prepare: skipped a bad record: {message}")
    if not any(counts["sentences"] for counts in results):
        raise DataFormatError(f"prepare: {', '.join(f.path for f in files)}: no sentence in the input(s); "
                              f"nothing prepared")
    manifest = {"format": FORMAT_NAME, "version": VERSION, "language": language, "max_length": max_length,
                "tokenizer": {"name": tokenizer.name_or_path, "fingerprint": plan["tokenizer"]},
                "inputs": inputs_record,
                "shards": [{key: counts[key] for key in ("name", "input", "sentences", "windows", "tokens", "files")}
                           for counts in results],
                "max_token_id": max(counts["max_token_id"] for counts in results),
                "sentences": sum(counts["sentences"] for counts in results),
                "bad_records": len(bad)}
    write_atomically(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _bad_record_messages(bad: list[list], files: list[CorpusFile]) -> list[str]:
    """`file:line (byte N): reason` of each bad record; the lines a worker could not know (its piece
    began mid-file) counted here, in one read of each file concerned."""
    by_path = {file.path: file for file in files}
    unknown: dict[str, list[int]] = {}
    for path, byte, line, *_ in bad:
        if line is None:
            unknown.setdefault(path, []).append(byte)
    lines = {path: line_numbers(by_path[path], positions) for path, positions in unknown.items()}
    return [f"{path}:{line if line is not None else lines[path][byte]} (byte {byte}): {reason}"
            for path, byte, line, reason, *_ in bad]


def main(argv: list[str] | None = None, launch_ranks=None) -> None:
    """`launch_ranks()`: RANK and WORLD_SIZE as the launcher gave them (dualner.cli passes the backend's
    reader; data code knows no backend); without it, one rank."""
    import argparse
    parser = argparse.ArgumentParser(prog="dualner prepare", description=(
        "Tokenize unlabeled stage-2 corpora once into memory-mapped shards (stage2.target.LANG or "
        "stage2.translations.LANG can then name the output folder). Resumable: run it again after an "
        "interruption. Under torchrun or srun every rank takes its share of the pieces (RANK, WORLD_SIZE); "
        "the shards are the same for any number of ranks and workers."))
    from dualner.data.formats import accepted_endings
    parser.add_argument("inputs", nargs="*", help=f"corpus files ({accepted_endings(compressed=True)})")
    parser.add_argument("--verify", metavar="FOLDER", help="check every file of a prepared corpus against the "
                        "checksums in its manifest (reads it whole), and prepare nothing")
    parser.add_argument("--output", help="the prepared corpus folder")
    parser.add_argument("--tokenizer",
                        help="the stage-1 run folder (its model/), an exported model, or a tokenizer name")
    parser.add_argument("--max-length", type=int, help="data.max_length of the stage-2 run")
    parser.add_argument("--language", default="", help="the corpus's language code")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizing processes per rank (default: the cores, shared among the node's ranks)")
    parser.add_argument("--shard-mb", type=float, default=64, help="input megabytes per shard")
    parser.add_argument("--max-bad-records", type=int, default=0,
                        help="malformed or non-UTF-8 records to skip (each reported) before failing")
    args = parser.parse_args(argv)
    if args.verify:
        if not is_prepared(args.verify):
            unfinished = Path(args.verify).is_dir() and unfinished_preparation(args.verify)
            raise MissingPathError(f"prepare --verify: {unfinished or f'{args.verify} is not a prepared corpus (no {MANIFEST})'}")
        damaged = verify(args.verify)
        if damaged:
            raise DataFormatError(f"prepare --verify: {len(damaged)} damaged shard file(s), the first {damaged[0]}; "
                                  f"remove them and run prepare again with the same inputs and --output")
        print(f"{args.verify}: every shard file matches its checksum")
        return
    if not args.inputs or args.output is None or args.tokenizer is None or args.max_length is None:
        parser.error("name the input files, --output, --tokenizer and --max-length (or --verify FOLDER)")
    shard_bytes = int(args.shard_mb * (1 << 20))
    if not 3 <= args.max_length <= 32767 or shard_bytes < 1:
        raise ConfigError("prepare: --max-length must be in [3, 32767] and --shard-mb more than 0")
    if (args.workers is not None and args.workers < 1) or args.max_bad_records < 0:
        raise ConfigError("prepare: --workers must be >= 1 (default: the cores) and --max-bad-records >= 0")
    ranks = launch_ranks() if launch_ranks is not None else {"RANK": "0", "WORLD_SIZE": "1"}
    manifest = prepare(args.inputs, args.output, args.tokenizer, args.max_length, args.language, args.workers,
                       shard_bytes, args.max_bad_records, rank=int(ranks["RANK"]),
                       world_size=int(ranks["WORLD_SIZE"]))
    if manifest is not None:
        print(f"prepared {manifest['sentences']} sentences in {len(manifest['shards'])} shard(s) -> {args.output}")
