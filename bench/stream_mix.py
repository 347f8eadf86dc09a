"""Stage 2's global mix and even passes (issue 24), with the loader's own planning code.

1. CC-100-like layout, simulated by sizes (nothing of it is written): 100 languages, one
   single-block `.xz` each (one piece: shared by stride), Zipf sizes (the largest 19%), 5G sentences
   in all, plus 20k labeled English sentences (uncompressed: equal byte spans, taken as equal record
   spans), stage2.mix=size (weights = sentences), plan pools of 2,048 (stage2.bucket_pool). At 4, 256
   and 2,048 readers:
   - realized share of each stream over a pass (5G samples) against its configured share: the global
     plan (dualner.data.mix) cut into pools, reader r taking pools r, r + R, ... (every reader holds
     every stream, so every pool is served as planned);
   - the share over any 100 steps (global batch 500): 400 windows at random positions of the pass,
     each computed alone (the plan's own block-by-block order);
   - appearances per eighth of each file over the pass, max/min over the eighths of a file (the worst
     file): each reader's draws of each stream over the pass (the plan's counts of its pools), laid
     over its share (dualner.data.shares) in order (simulated: which record a draw takes follows from
     the share and the count; nothing is read).
   Baseline: the per-reader mix this replaced (main a68da5b, `Stage2Stream._reader_mix` reimplemented
   here): pieces dealt round-robin, every reader drawing its own pieces by its own weights.
2. Even passes across elastic resumes, simulated record by record on the same layout scaled to 1M
   sentences (smallest language ~1,900) with the loader's share and resume code (equal_shares,
   reshare, the range-state advance of dualner.data.range_state) and its reading order (lowest pass
   first), at 40% of the pass, ranks x loader workers: 2 -> 3 and 3 -> 2 ranks (no workers), 2 x 2
   -> 3 x 2, 3 x 2 -> 2 x 2, 2 x 2 -> 3 x 1, 3 x 1 -> 2 x 2; max/min appearances per eighth over the
   first pass, and the stride leftover cost: the decompressed records each reader reads for the rest
   of the pass of a single-block language after the resume, against going on without one.
3. Bytes read by all readers / file size, at 1,024 readers of one plain file (real reads, counted at
   the file handle).
4. --real (a second command): a real 2 ranks x 2 loader workers stage-2 run (tiny random encoder, 10 steps) with one
   single-piece `.gz` target, mix=size: configured shares against the shares in the sample log.

    python bench/stream_mix.py --output bench/results/stream_mix.json          # 1-3
    python bench/stream_mix.py --output bench/results/stream_mix.json --real   # 4
    python bench/stream_mix.py --output bench/results/stream_mix.json --resumes   # 2 alone
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from dualner.data.corpus import CorpusFile  # noqa: E402
from dualner.data.mix import MixPlan  # noqa: E402
from dualner.data.range_state import RangeState  # noqa: E402
from dualner.data.shares import equal_shares, reshare  # noqa: E402
from dualner.data.source_kinds import source_of_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POOL = 2048
# (ranks, loader workers) before and after an elastic resume (part 2)
RESUME_SHAPES = [((2, 0), (3, 0)), ((3, 0), (2, 0)), ((2, 2), (3, 2)), ((3, 2), (2, 2)), ((2, 2), (3, 1)),
                 ((3, 1), (2, 2))]
GLOBAL_BATCH = 500


def cc100_sizes(total: float, languages: int = 100, labeled: int = 20_000) -> np.ndarray:
    """[labeled English, language 1 (largest) .. language 100] sentences: Zipf with exponent 1."""
    zipf = 1.0 / np.arange(1, languages + 1)
    return np.concatenate([[labeled], np.round(zipf / zipf.sum() * total)]).astype(np.int64)


# -- 1. shares over a pass ------------------------------------------------------------------------------
def pass_draws(plan: MixPlan, samples: int, readers: int) -> np.ndarray:
    """[reader, stream] draws over the first `samples` samples: pool c goes to reader c mod R."""
    chunks = samples // POOL
    batch = POOL * 24  # a multiple of every reader count measured
    draws = np.zeros((readers, len(plan.weights)), dtype=np.int64)
    for first in range(0, chunks, batch):
        bounds = np.arange(first, min(chunks, first + batch) + 1, dtype=np.int64) * POOL
        counts = np.diff(plan.cumulative(bounds), axis=0)
        pad = (-len(counts)) % readers
        counts = np.concatenate([counts, np.zeros((pad, counts.shape[1]), dtype=np.int64)])
        draws += counts.reshape(-1, readers, counts.shape[1]).sum(axis=0)
    return draws


def eighth_ratio(size: int, draws: np.ndarray, strided: bool) -> float:
    """max/min over the eighths of a file of the mean appearances of its records, each reader r
    taking draws[r] records of its share in order (wrapping): a stride share (records r, r + R, ...)
    or an equal span."""
    readers = len(draws)
    edges = [size * e // 8 for e in range(9)]
    totals = np.zeros(8)
    for reader in range(readers):
        if strided:
            share = max(0, -(-(size - reader) // readers))
            index = [max(0, -(-(edge - reader) // readers)) for edge in edges]  # share index of each edge
        else:
            low, high = size * reader // readers, size * (reader + 1) // readers
            share = high - low
            index = [min(max(edge - low, 0), share) for edge in edges]
        if share == 0:
            continue
        rounds, extra = divmod(int(draws[reader]), share)
        for e in range(8):
            a, b = index[e], index[e + 1]
            totals[e] += rounds * (b - a) + max(0, min(b, extra) - a)
    means = totals / np.diff(edges)
    return float(means.max() / means.min()) if means.min() > 0 else float("inf")


def baseline_shares(weights: np.ndarray, readers: int) -> np.ndarray:
    """The per-reader mix of main a68da5b on this layout: the 100 compressed files one piece each, the
    labeled file (1 MB, splittable) refined into pieces until there are as many pieces as readers;
    range j of the streams in order to reader j mod R; each reader drawing its streams by
    `_reader_mix` (reimplemented here), every reader making pools at the same rate. Returned: the
    realized global share of each stream."""
    labeled_pieces = max(1, readers - (len(weights) - 1))
    holders = {0: {j % readers for j in range(labeled_pieces)}}
    holders |= {d: {(labeled_pieces + d - 1) % readers} for d in range(1, len(weights))}
    realized = np.zeros(len(weights))
    for reader in range(readers):
        partial = {d: min(1.0, weights[d] * readers / len(h)) for d, h in holders.items() if len(h) < readers}
        full = {d: weights[d] for d, h in holders.items() if len(h) == readers}
        mine = {d: q for d, q in partial.items() if reader in holders[d]}
        taken = sum(mine.values())
        if taken > 1.0 or not full:
            mix = {d: q / taken for d, q in mine.items()} if taken > 0 else dict(full)
        else:
            total_full = sum(full.values())
            mix = mine | {d: (1.0 - taken) * v / total_full for d, v in full.items()}
        for d, q in mix.items():
            realized[d] += q / readers
    return realized


def window_deviation(plan: MixPlan, samples: int, windows: int, rng: np.random.Generator) -> dict:
    span = 100 * GLOBAL_BATCH
    expected = plan.weights * span
    big = expected >= 100  # a relative error means something where a stream has 100+ samples per window
    worst_relative, worst_absolute = 0.0, 0.0
    for start in rng.integers(0, samples - span, windows):
        counts = plan.counts(int(start), span)
        worst_relative = max(worst_relative, float(np.max(np.abs(counts[big] - expected[big]) / expected[big])))
        worst_absolute = max(worst_absolute, float(np.max(np.abs(counts - expected))))
    return {"max_relative_error_streams_with_100_plus": worst_relative, "max_absolute_error_samples": worst_absolute,
            "streams_with_100_plus": int(big.sum()), "windows": windows}


def layout_results(total: float, reader_counts: list[int], windows: int) -> dict:
    sizes = cc100_sizes(total)
    weights = sizes / sizes.sum()
    plan = MixPlan(list(sizes.astype(float)), block=POOL)
    samples = int(sizes.sum()) // POOL * POOL
    results = {"sentences": int(sizes.sum()), "labeled_share": float(weights[0]), "largest_share": float(weights[1])}
    started = time.perf_counter()
    over_pass = plan.counts_between(0, samples) / samples
    results["pass"] = {"max_relative_error": float(np.max(np.abs(over_pass - weights) / weights)),
                       "labeled_realized": float(over_pass[0]), "largest_realized": float(over_pass[1])}
    results["any_100_steps"] = window_deviation(plan, samples, windows, np.random.default_rng(0))
    for readers in reader_counts:
        draws = pass_draws(plan, samples, readers)
        ratios = [eighth_ratio(int(sizes[d]), draws[:, d], strided=d > 0) for d in range(len(sizes))]
        base = baseline_shares(weights, readers)
        results[f"readers_{readers}"] = {
            "shares_from_reader_draws_max_relative_error": float(np.max(np.abs(draws.sum(0) / samples - weights) / weights)),
            "eighth_ratio_worst": max(ratios), "eighth_ratio_worst_stream": int(np.argmax(ratios)),
            "eighth_ratio_worst_language": max(ratios[1:]), "eighth_ratio_labeled": ratios[0],
            "baseline_labeled_share": float(base[0]), "baseline_largest_share": float(base[1]),
            "baseline_max_relative_error": float(np.max(np.abs(base - weights) / weights))}
        print(readers, results[f"readers_{readers}"], flush=True)
    results["seconds"] = time.perf_counter() - started
    return results


# -- 2. elastic resumes, record by record ---------------------------------------------------------------
def _take(state: RangeState, size: int) -> int | None:
    """The next record of a range at plan level (record i at position i), advanced as the loader does."""
    position = (state.start if state.cursor < 0 else state.cursor) + (state.skip if state.step > 1 else 0)
    if position >= (size if state.step > 1 else min(state.end, size)):
        state.advance(state.pass_, -1, True)
        return None
    state.advance(state.pass_, position + 1, False)
    return position


def stride_leftover_cost(before_states: list, after_states: list, size: int) -> dict:
    """What the rest of a pass of a piece that cannot be split costs each reader, in decompressed
    records, after a re-share against going on without one. Every range of such a piece is read
    from the file's start (decompressed up to its cursor, then on to the end); a reader goes on with
    its one open stride range, while a new reader reads each of its leftover ranges (one per old
    reader's stride) that way."""
    uninterrupted = max(size - max(0, state.cursor) for state in before_states if state.once < 0)
    resumed = max(sum(size for state in share if state.once >= 0) for share in after_states)
    return {"uninterrupted_records_per_reader": int(uninterrupted), "resumed_records_per_reader": int(resumed),
            "ratio": resumed / uninterrupted, "full_reads_per_reader": resumed / size}


def simulate_resume(sizes: np.ndarray, before_shape: tuple[int, int], after_shape: tuple[int, int],
                    at: float) -> dict:
    """A run of `before_shape` (ranks, loader workers; 0 workers: the rank reads) resumed at `at` of
    the pass on `after_shape`: a reader is (rank, worker), reader index rank x max(1, workers) +
    worker (dualner.data.streaming), so the shares follow from the number of readers."""
    before, after = (ranks * max(1, workers) for ranks, workers in (before_shape, after_shape))
    sources = [source_of_file(CorpusFile("labeled.jsonl", "jsonl", "", int(sizes[0]), 0))] + [
        source_of_file(CorpusFile(f"l{d}.txt.xz", "text", "xz", int(size), 0)) for d, size in enumerate(sizes[1:])]
    limits = {"bytes": 64 << 20, "sentences": 1 << 16}
    plan = MixPlan(list(sizes.astype(float)), block=POOL)
    samples = int(sizes.sum())
    shares = [equal_shares([source], before, limits) for source in sources]  # per stream: per reader
    first_pass = [np.zeros(int(size), dtype=np.int32) for size in sizes]  # appearances labeled pass 0
    in_epoch = [np.zeros(int(size), dtype=np.int32) for size in sizes]  # appearances in samples [0, N)
    chunk, readers, switch = 0, before, int(samples * at)
    while chunk * POOL < 1.25 * samples:  # on past the epoch: every range has finished its first pass
        if readers == before and chunk * POOL >= switch:
            old_shares = shares
            shares = [reshare([s for share in stream for s in share], [sources[d]], after, limits)
                      for d, stream in enumerate(shares)]
            leftover = [stride_leftover_cost([s for share in old_shares[d] for s in share], shares[d], int(sizes[d]))
                        for d in range(1, len(sizes))]
            readers = after  # pools go on at the first chunk no reader made (all made up to `chunk`)
        counts = np.diff(plan.cumulative(np.arange(chunk, chunk + readers + 1, dtype=np.int64) * POOL), axis=0)
        for reader in range(readers):
            for d in np.nonzero(counts[reader])[0]:
                share = shares[d][reader]
                for _ in range(int(counts[reader, d])):
                    for _attempt in range(len(share) + 2):
                        live = [s for s in share if not s.spent]
                        state = min(live, key=lambda s: (s.pass_, s.file, s.start, s.once, s.skip))
                        pass_ = state.pass_
                        position = _take(state, int(sizes[d]))
                        if position is not None:
                            first_pass[d][position] += pass_ == 0
                            in_epoch[d][position] += (chunk + reader) * POOL < samples
                            break
        chunk += readers
    ratios = []
    for appearances in in_epoch:
        eighths = [appearances[len(appearances) * e // 8:len(appearances) * (e + 1) // 8].mean() for e in range(8)]
        ratios.append(max(eighths) / min(eighths))
    worst = max(leftover, key=lambda cost: cost["ratio"])
    return {"shape": "{}x{} -> {}x{}".format(*before_shape, *after_shape), "readers": f"{before}->{after}", "at": at,
            "stride_leftover_worst": worst,
            "first_pass_every_record_once": all(bool((seen == 1).all()) for seen in first_pass),
            "eighth_ratio_worst": float(max(ratios)), "eighth_ratio_worst_stream": int(np.argmax(ratios)),
            "eighth_ratio_median_stream": float(np.median(ratios))}


# -- 3. bytes read --------------------------------------------------------------------------------------------
def bytes_read_ratio(readers: int, sentences: int) -> dict:
    """Every reader's equal span of one plain file read by the current RecordReader (reads stop at the
    range's end, then go on in small steps) and by the one it replaced (a buffer of the range's size
    + 64 KiB, at most 1 MiB, main a68da5b): bytes read from the file, counted at its raw reads."""
    from dualner.data import corpus
    read = {"current": 0, "baseline": 0}

    class Counted(corpus._BoundedFile):
        def readinto(self, buffer):
            count = super().readinto(buffer)
            read["current"] += count or 0
            return count

    class CountedPlain(io.FileIO):
        def readinto(self, buffer):
            count = super().readinto(buffer)
            read["baseline"] += count or 0
            return count

    def baseline_records(file, start, end):
        reader = corpus.RecordReader(file, start, end)
        with io.BufferedReader(CountedPlain(file.path, "rb"), max(1 << 13, min(end - start + (1 << 16), 1 << 20))) as handle:
            yield from corpus.records_in(handle, file.format, reader._align(handle), end, None)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.txt"
        path.write_text("".join(f"sentence {i} of a plain text corpus with some words\n" for i in range(sentences)))
        file = CorpusFile(str(path), "text", "", path.stat().st_size, 0)
        original, corpus._BoundedFile = corpus._BoundedFile, Counted
        try:
            records = {"current": 0, "baseline": 0}
            for share in equal_shares([source_of_file(file)], readers, {"bytes": 64 << 20, "sentences": 1 << 16}):
                for state in share:
                    records["current"] += sum(1 for _ in corpus.RecordReader(file, state.start, state.end))
                    records["baseline"] += sum(1 for _ in baseline_records(file, state.start, state.end))
        finally:
            corpus._BoundedFile = original
    return {"readers": readers, "file_bytes": file.size, "sentences": sentences, "records": records,
            "ratio": read["current"] / file.size, "baseline_ratio": read["baseline"] / file.size}


# -- 4. a real run -------------------------------------------------------------------------------------------
def real_run(folder: Path) -> dict:
    from dualner.data.conll import read_conll
    from dualner.encoders import resolve_encoder
    resolve_encoder("tiny-random")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stage1 = folder / "stage1"
    subprocess.run([sys.executable, str(REPO / "launchers/stage1.py"), "--config", str(REPO / "configs/tiny.yaml"),
                    f"run.output_dir={stage1}", "train.max_steps=2", "train.eval_every=2",
                    "data.max_eval_sentences=8", f"engine.config={REPO / 'ds_configs/zero0_fp32.json'}"],
                   check=True, env=env, capture_output=True)
    german = read_conll(REPO / "data/panx-sample/de/train.tsv", "de", max_sentences=2000)
    target = folder / "de.txt.gz"
    with gzip.open(target, "wt") as handle:
        handle.writelines(" ".join(s.words) + "\n" for s in german)
    run = folder / "stage2"
    output = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731",
         str(REPO / "launchers/stage2.py"), "--config", str(REPO / "configs/tiny_stage2.yaml"),
         f"run.output_dir={run}", f"stage2.init_from={stage1}", f"stage2.target={{de: {target}}}",
         "stage2.mix=size", "stage2.bucket_pool=16", "data.loader_workers=2", "stage2.sample_log=true",
         "train.max_steps=10", "train.eval_every=100", "data.max_eval_sentences=8",
         f"engine.config={REPO / 'ds_configs/zero0_fp32.json'}"], env=env, capture_output=True, text=True)
    if output.returncode:
        raise SystemExit(output.stderr[-3000:])
    records = {"source": 0, "target": 0}
    for log in run.glob("samples_rank*.jsonl"):
        for entry in map(json.loads, log.read_text().splitlines()):
            for sample in entry.get("samples", []):
                if "+" not in sample.rsplit("@", 1)[1]:
                    records["source" if "source_labeled" in sample else "target"] += 1
    labeled = sum(1 for line in (run / "stage2_data/source_labeled.jsonl").read_text().splitlines() if line.strip())
    configured = len(german) / (len(german) + labeled)
    return {"configured_target_share": configured, "realized_target_share": records["target"] / sum(records.values()),
            "records": records, "target_sentences": len(german), "labeled_sentences": labeled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench/results/stream_mix.json")
    parser.add_argument("--sentences", type=float, default=5e9)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--real", action="store_true", help="only part 4, added to --output's other results")
    parser.add_argument("--resumes", action="store_true", help="only part 2, added to --output's other results")
    args = parser.parse_args()
    if args.real:
        result = json.loads(Path(args.output).read_text()) if Path(args.output).is_file() else {}
        with tempfile.TemporaryDirectory() as folder:
            result["real_2x2_gz"] = real_run(Path(folder))
        print(result["real_2x2_gz"], flush=True)
        write_result(args.output, result)
        return
    small = cc100_sizes(1_000_000, labeled=5_000)
    resumes = [simulate_resume(small, before, after, 0.4) for before, after in RESUME_SHAPES]
    if args.resumes:
        result = json.loads(Path(args.output).read_text()) if Path(args.output).is_file() else {}
        result["resumes"] = resumes
        print(resumes, flush=True)
        write_result(args.output, result)
        return
    result = {"cc100": layout_results(args.sentences, [4, 256, 2048], args.windows), "resumes": resumes}
    print(result["resumes"], flush=True)
    result["bytes_read"] = bytes_read_ratio(1024, 1_200_000)
    print(result["bytes_read"], flush=True)
    write_result(args.output, result)


if __name__ == "__main__":
    main()
