"""Stage-2 loader at cluster scale, simulated on one machine (issue: stage 2 at cluster scale).

1. Reader rate vs readers: one reader's useful sentences/s when a corpus is shared by 1, 8, 64,
   256 and 1,024 readers (ranks x loader workers), for plain text, JSONL, .xz and a prepared
   corpus. Current code: a reader reads its own byte ranges (prepared: its own positions); the
   baseline is the loader this replaced (every reader parses the whole file and keeps every N-th
   sentence, as `datasets` does for a one-file stream). A reader's rate is measured over the first
   8 readers' pieces (each reader separately; sentences / seconds summed), so that small pieces at
   1,024 readers are not one timer's noise.
2. Resume cost: time from loading a checkpointed position to the first micro batch, at sentence
   1,000,000 of a 2,000,000-sentence file vs at sentence 0 (positions are byte cursors: O(1)).
3. Loader windows/s per process (tokenize + cut + collate, no model): the raw text stream vs the same
   corpus prepared, in one run, interleaved.

Every figure is the median of --repeats interleaved repetitions (min-max beside it).

    python bench/stream_scaling.py --output bench/results/stream_scaling.json
"""

from __future__ import annotations

import argparse
import gc
import json
import lzma
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# One core per loader process, as in training: the tokenizer's own thread pool is off in forked
# loader workers, so the raw path's rate per process is its single-threaded rate.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import write_result  # noqa: E402
from dualner.data.corpus import RecordReader, describe_file, parse_record  # noqa: E402
from dualner.data.shares import equal_shares  # noqa: E402
from dualner.data.range_reading import read_range  # noqa: E402
from dualner.data.source_kinds import open_sources  # noqa: E402
from dualner.data.stream_spec import KIND_TARGET, STREAM_META, StreamSpec  # noqa: E402
from dualner.data.streaming import Stage2Stream  # noqa: E402

READERS = (1, 8, 64, 256, 1024)
WORDS = ("Berlin ist die Hauptstadt von Deutschland und hat viele Museen , Parks und Brücken . "
         "Die Stadt liegt an der Spree").split()


def sentence(i: int) -> list[str]:
    start = (i * 7) % len(WORDS)
    return (WORDS[start:] + WORDS[:start])[: 6 + i % 14] + [f"n{i}"]


def write_corpora(folder: Path, sentences: int) -> dict[str, Path]:
    text, jsonl = folder / "corpus.txt", folder / "corpus.jsonl"
    with text.open("w") as t, jsonl.open("w") as j:
        for i in range(sentences):
            words = sentence(i)
            t.write(" ".join(words) + "\n")
            j.write(json.dumps({"tokens": words}, ensure_ascii=False) + "\n")
    xz = folder / "corpus.jsonl.xz"
    with lzma.open(xz, "wb", preset=1) as handle:
        handle.write(jsonl.read_bytes())
    return {"text": text, "jsonl": jsonl, "xz": xz}


# -- 1. reader rate ---------------------------------------------------------------------------------------
def strided_rate(path: Path, readers: int, sample: int = 8) -> float:
    """The replaced loader: reader r parses every record and keeps those with index % readers == r."""
    file = describe_file(path, "bench")
    kept, seconds = 0, 0.0
    for reader in range(min(sample, readers)):
        started = time.perf_counter()
        for index, record in enumerate(RecordReader(file, 0, file.end)):
            sentence = parse_record(record, file, "xx", False)
            if index % readers == reader and sentence is not None:
                kept += 1
        seconds += time.perf_counter() - started
        if seconds > 20:  # enough: at 1,024 readers one pass per reader takes long
            break
    return kept / seconds


def ranged_rate(spec: StreamSpec, readers: int, sample: int = 8) -> tuple[float, int]:
    """(sentences/s of one reader over its own pieces, readers with any piece)."""
    shares = equal_shares(spec.sources, readers, {"bytes": 64 << 20, "sentences": 1 << 16})
    owners = {reader: share for reader, share in enumerate(shares) if share}
    count, seconds = 0, 0.0
    for reader in range(min(sample, readers)):
        started = time.perf_counter()
        for state in owners.get(reader, []):
            for _, _, unit in read_range(spec, state.copy(), -1):
                count += unit is not None
        seconds += time.perf_counter() - started
    return count / max(seconds, 1e-9), len(owners)


def reader_rates(corpora: dict[str, Path], prepared: Path | None, repeats: int) -> dict:
    specs = {name: StreamSpec("target/xx", KIND_TARGET, "xx", open_sources([str(path)], "bench"), 1.0)
             for name, path in corpora.items()}
    if prepared is not None:
        specs["prepared"] = StreamSpec("target/xx", KIND_TARGET, "xx", open_sources([str(prepared)], "bench"), 1.0)
    results = {}
    for name, spec in specs.items():
        rows = {}
        for readers in READERS:
            ours, baseline, holders = [], [], 0
            for _ in range(repeats):  # interleaved: ours, baseline, ours, ...
                rate, holders = ranged_rate(spec, readers)
                ours.append(rate)
                if name in ("text", "jsonl") and readers <= 256:
                    baseline.append(strided_rate(corpora[name], readers))
            rows[readers] = {"ours": summary(ours), "readers_with_data": holders}
            if baseline:
                rows[readers]["replaced_loader"] = summary(baseline)
            print(f"{name} {readers} readers: {rows[readers]}", flush=True)
        one = rows[1]["ours"]["median"]
        for readers in READERS:
            rows[readers]["vs_one_reader"] = round(rows[readers]["ours"]["median"] / one, 3)
        results[name] = rows
    return results


# -- 2. resume cost ----------------------------------------------------------------------------------------
def resume_cost(tokenizer, repeats: int, folder: Path) -> dict:
    from dualner.data.encoding import WindowTokenizer
    from dualner.data.packing import Collator
    from dualner.labels import LabelSet
    path = folder / "two_million.txt"
    offsets, position = [], 0
    with path.open("wb") as handle:
        for i in range(2_000_000):
            line = f"sentence {i:07d} of two million\n".encode()  # one shape: the position is all that differs
            offsets.append(position)
            handle.write(line)
            position += len(line)
    encoder = WindowTokenizer(tokenizer, LabelSet(("LOC", "ORG", "PER")), 128)

    def stream():
        spec = StreamSpec("target/xx", KIND_TARGET, "xx", open_sources([str(path)], "bench"), 1.0)
        return Stage2Stream([spec], encoder, 32, 0, 0, 1, Collator(tokenizer.pad_token_id, meta_columns=STREAM_META),
                            pool=2048, range_bytes=1 << 40)

    base = stream()
    base.next_batch()
    state = base.state_dict()

    def at(sentence: int) -> dict:
        moved = json.loads(json.dumps(state))
        moved["pools"] = []
        moved["ranges"]["target/xx"][0][4] = offsets[sentence] if sentence else -1
        return moved

    timings = {0: [], 1_000_000: []}
    reads = {}
    for _ in range(repeats):
        for sentence in timings:
            # a full collection first, as training does before its first step (gc.freeze): else a
            # generation-2 pass over this script's heap lands in one timing or the other
            gc.collect()
            started = time.perf_counter()
            resumed = stream()
            resumed.load_state_dict([at(sentence)])
            batch = resumed.next_batch()
            timings[sentence].append(time.perf_counter() - started)
            reads[sentence] = resumed.records_read()
            if sentence:
                assert batch["meta"]["sample_id"][0].endswith(tuple(f"@{o}" for o in offsets[sentence:sentence + 2048]))
    return {"seconds_at_0": summary(timings[0]), "seconds_at_1M": summary(timings[1_000_000]),
            "ratio": round(statistics.median(timings[1_000_000]) / statistics.median(timings[0]), 3),
            "records_read_at_0": reads[0], "records_read_at_1M": reads[1_000_000]}


# -- 3. loader windows/s -----------------------------------------------------------------------------------
def loader_rates(tokenizer, tokenizer_path: str, folder: Path, sentences: int, repeats: int, batches: int) -> dict:
    from dualner.data.encoding import WindowTokenizer
    from dualner.data.packing import Collator
    from dualner.data.prepare import prepare
    from dualner.labels import LabelSet
    corpus = folder / "loader.txt"
    with corpus.open("w") as handle:
        for i in range(sentences):
            handle.write(" ".join(sentence(i)) + "\n")
    started = time.perf_counter()
    prepare([str(corpus)], str(folder / "loader.prepared"), tokenizer_path, 128, "xx", workers=2,
            shard_bytes=4 << 20, log=lambda *_: None)
    prepare_seconds = time.perf_counter() - started
    encoder = WindowTokenizer(tokenizer, LabelSet(("LOC", "ORG", "PER")), 128)
    rates = {"raw": [], "prepared": []}
    for _ in range(repeats):
        for name, path in (("raw", corpus), ("prepared", folder / "loader.prepared")):
            spec = StreamSpec("target/xx", KIND_TARGET, "xx", open_sources([str(path)], "bench"), 1.0)
            stream = Stage2Stream([spec], encoder, 64, 0, 0, 1, Collator(tokenizer.pad_token_id, row_length=128,
                                                                         meta_columns=STREAM_META), pool=2048)
            stream.next_batch()  # the first pool: mmap open, worker start-up
            windows, started = 0, time.perf_counter()
            for _ in range(batches):
                windows += stream.next_batch()["num_segments"]
            rates[name].append(windows / (time.perf_counter() - started))
    return {"windows_per_s_raw": summary(rates["raw"]), "windows_per_s_prepared": summary(rates["prepared"]),
            "ratio": round(statistics.median(rates["prepared"]) / statistics.median(rates["raw"]), 2),
            "prepare_seconds_2_workers": round(prepare_seconds, 1), "sentences": sentences}


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "runs": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=200_000, help="sentences of the shared corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoder", default="multilingual-e5-small",
                        help="whose tokenizer (the real XLM-R SentencePiece one by default)")
    parser.add_argument("--loader-sentences", type=int, default=100_000)
    parser.add_argument("--loader-batches", type=int, default=200)
    parser.add_argument("--skip", nargs="*", default=[], choices=["readers", "resume", "loader"])
    parser.add_argument("--formats", nargs="*", default=["text", "jsonl", "xz", "prepared"],
                        choices=["text", "jsonl", "xz", "prepared"], help="part 1's corpora")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    from transformers import AutoTokenizer
    from dualner.data.prepare import prepare
    from dualner.encoders import resolve_encoder
    tokenizer_path = resolve_encoder(args.encoder)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    result = {"command": "python bench/stream_scaling.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "encoder": args.encoder, "sentences": args.sentences}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if "readers" not in args.skip:
            corpora = write_corpora(folder, args.sentences)
            prepared = folder / "prepared" if "prepared" in args.formats else None
            if prepared is not None:
                prepare([str(corpora["jsonl"])], str(prepared), tokenizer_path, 128, "xx", workers=2,
                        shard_bytes=8 << 20, log=lambda *_: None)
            chosen = {name: path for name, path in corpora.items() if name in args.formats}
            result["reader_rate"] = reader_rates(chosen, prepared, args.repeats)
        if "resume" not in args.skip:
            result["resume"] = resume_cost(tokenizer, args.repeats, folder)
            print("resume:", result["resume"], flush=True)
        if "loader" not in args.skip:
            result["loader"] = loader_rates(tokenizer, tokenizer_path, folder, args.loader_sentences, args.repeats,
                                            args.loader_batches)
            print("loader:", result["loader"], flush=True)
    write_result(args.output, result)


if __name__ == "__main__":
    main()
