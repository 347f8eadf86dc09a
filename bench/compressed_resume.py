"""Resuming inside a compressed corpus (issue 24, item 3): the time from opening a file to its first
record when a reader resumes at 90% of the file, against resuming at 0%, for files made of blocks
(multi-block xz, bgzip, multi-frame zstd: entered at the block holding the cursor) and, for contrast,
single-block .xz and .gz files (decompress-and-discard up to the cursor).

Each measurement describes the file (reads its cached block index) and reads from a cursor with
dualner's RecordReader, as a resumed stage-2 reader does: the time to its first record, and to its
first pool of 2,048 records (what a reader reads before its first micro batch). The figure is the median of
--repeats interleaved repetitions (min-max beside it); the index's first build is timed once per file.

    python bench/compressed_resume.py --output bench/results/compressed_resume.json
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import random
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from dualner.data.blocks import bgzf_compress  # noqa: E402
from dualner.data.corpus import RecordReader, describe_file  # noqa: E402



def corpus(megabytes: int) -> bytes:
    """Sentences of words drawn from a Zipf-like vocabulary of 50,000: text that compresses about as
    well as real text (xz about 3.5x), so decompression runs at a realistic rate."""
    rng = random.Random(0)
    vocabulary = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 11)))
                  for _ in range(50_000)]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    words = iter(rng.choices(vocabulary, weights, k=(megabytes << 20) // 5))
    lines, size = [], 0
    while size < megabytes << 20:
        line = (" ".join(next(words) for _ in range(rng.randint(5, 30))) + " .\n").encode()
        lines.append(line)
        size += len(line)
    return b"".join(lines)


def zstd_frames(data: bytes, frame: int) -> bytes:
    import zstandard
    compressor = zstandard.ZstdCompressor(level=3)
    return b"".join(compressor.compress(data[begin:begin + frame]) for begin in range(0, len(data), frame))


def xz(data: bytes, block_size: str | None) -> bytes:
    command = ["xz", "-c", "-T2"] + ([f"--block-size={block_size}"] if block_size else [])
    return subprocess.run(command, input=data, capture_output=True, check=True).stdout


POOL = 2048  # records a resumed stage-2 reader reads before its first micro batch (stage2.bucket_pool)


def resume_seconds(path: Path, cursor: int | None) -> tuple[float, float]:
    """Seconds to the first record and to the first pool of records, from describing the file."""
    began = time.perf_counter()
    file = describe_file(path, "bench")
    records = iter(RecordReader(file, 0, file.end, cursor))
    next(records)
    first = time.perf_counter() - began
    for _ in range(POOL - 1):
        next(records)
    return first, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--megabytes", type=int, default=48, help="decompressed size of the corpus")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    data = corpus(args.megabytes)
    cursor = data.index(b"\n", len(data) * 9 // 10) + 1  # a record start at 90%
    files = {"bgzip (64 KiB members)": ("c.txt.gz", lambda: bgzf_compress(data)),
             "zstd, 1 MiB frames": ("c.txt.zst", lambda: zstd_frames(data, 1 << 20)),
             "gzip, one member": ("one.txt.gz", lambda: gzip.compress(data, 6))}
    if shutil.which("xz"):
        files = {"xz -T2 --block-size=1MiB": ("c.txt.xz", lambda: xz(data, "1MiB")),
                 "xz -T2 (default blocks: 3x the dictionary, 24 MiB)": ("big.txt.xz", lambda: xz(data, None)),
                 **files,
                 "xz, one block": ("one.txt.xz", lambda: lzma.compress(data, preset=6))}
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (file_name, make) in files.items():
            path = Path(folder) / file_name
            path.write_bytes(make())
            began = time.perf_counter()
            file = describe_file(path, "bench")
            rows[name] = {"compressed_bytes": path.stat().st_size, "index_seconds": time.perf_counter() - began,
                          "blocks": file.blocks.blocks if file.blocks is not None else 1,
                          "splittable": file.splittable, "at_0": [], "at_90": [], "pool_at_0": [], "pool_at_90": []}
        for _ in range(args.repeats):  # interleaved: every file at 0% and at 90% in each round
            for name, (file_name, _) in files.items():
                path = Path(folder) / file_name
                for key, at in (("0", None), ("90", cursor)):
                    first, pool = resume_seconds(path, at)
                    rows[name][f"at_{key}"].append(first)
                    rows[name][f"pool_at_{key}"].append(pool)
    result = {"decompressed_bytes": len(data), "cursor": cursor, "repeats": args.repeats, "files": {}}
    for name, row in rows.items():
        timings = {key: row.pop(key) for key in ("at_0", "at_90", "pool_at_0", "pool_at_90")}
        entry = dict(row)
        for what, at_0, at_90 in (("first_record", "at_0", "at_90"), ("first_pool", "pool_at_0", "pool_at_90")):
            median_0, median_90 = statistics.median(timings[at_0]), statistics.median(timings[at_90])
            entry[what] = {"at_0_s": median_0, "at_90_s": median_90, "ratio_90_to_0": median_90 / median_0,
                           "range_at_0_s": [min(timings[at_0]), max(timings[at_0])],
                           "range_at_90_s": [min(timings[at_90]), max(timings[at_90])]}
        result["files"][name] = entry
        record, pool = entry["first_record"], entry["first_pool"]
        print(f"{name:52s} blocks {row['blocks']:4d} index {1000 * row['index_seconds']:5.1f} ms | first record "
              f"0%: {1000 * record['at_0_s']:7.1f} ms 90%: {1000 * record['at_90_s']:7.1f} ms "
              f"({record['ratio_90_to_0']:7.2f}x) | first pool 0%: {1000 * pool['at_0_s']:7.1f} ms "
              f"90%: {1000 * pool['at_90_s']:7.1f} ms ({pool['ratio_90_to_0']:6.2f}x)")
    write_result(args.output, result)


if __name__ == "__main__":
    main()
