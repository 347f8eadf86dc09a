"""Resuming inside a compressed corpus (issue 24, item 3): the time from opening a file to its first
record when a reader resumes at 90% of the file, against resuming at 0%, for files made of blocks
(multi-block xz, bgzip, multi-frame zstd: entered at the block holding the cursor) and, for contrast,
single-block .xz and .gz files (decompress-and-discard up to the cursor).

Each measurement describes the file (reads its cached block index) and reads one record with
dualner's RecordReader from a cursor, as a resumed stage-2 reader does. The figure is the median of
--repeats interleaved repetitions (min-max beside it); the index's first build is timed once per file.

    python bench/compressed_resume.py --output bench/results/compressed_resume.json
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402
from dualner.data.corpus import RecordReader, describe_file  # noqa: E402

WORDS = ("Berlin ist die Hauptstadt von Deutschland und hat viele Museen , Parks und Brücken . "
         "Die Stadt liegt an der Spree").split()
BGZF_BLOCK = 0xFF00  # bytes of text per member, as bgzip writes them
BGZF_END = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


def corpus(megabytes: int) -> bytes:
    lines, size, i = [], 0, 0
    while size < megabytes << 20:
        start = (i * 7) % len(WORDS)
        line = (" ".join((WORDS[start:] + WORDS[:start])[: 6 + i % 14]) + f" n{i}\n").encode()
        lines.append(line)
        size += len(line)
        i += 1
    return b"".join(lines)


def bgzip(data: bytes) -> bytes:
    """What `bgzip` writes (not installed here): deflate members with their size in a `BC` field."""
    out = []
    for begin in range(0, len(data), BGZF_BLOCK):
        chunk = data[begin:begin + BGZF_BLOCK]
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = deflate.compress(chunk) + deflate.flush()
        size = 18 + len(body) + 8
        out.append(b"\x1f\x8b\x08\x04\0\0\0\0\0\xff" + struct.pack("<H", 6) + b"BC" + struct.pack("<HH", 2, size - 1)
                   + body + struct.pack("<II", zlib.crc32(chunk), len(chunk)))
    return b"".join(out) + BGZF_END


def zstd_frames(data: bytes, frame: int) -> bytes:
    import zstandard
    compressor = zstandard.ZstdCompressor(level=3)
    return b"".join(compressor.compress(data[begin:begin + frame]) for begin in range(0, len(data), frame))


def xz(data: bytes, block_size: str | None) -> bytes:
    command = ["xz", "-c", "-T2"] + ([f"--block-size={block_size}"] if block_size else [])
    return subprocess.run(command, input=data, capture_output=True, check=True).stdout


def first_record_seconds(path: Path, cursor: int | None) -> float:
    began = time.perf_counter()
    file = describe_file(path, "bench")
    reader = RecordReader(file, 0, file.end, cursor)
    next(iter(reader))
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--megabytes", type=int, default=48, help="decompressed size of the corpus")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    data = corpus(args.megabytes)
    cursor = data.index(b"\n", len(data) * 9 // 10) + 1  # a record start at 90%
    files = {"bgzip (64 KiB members)": ("c.txt.gz", lambda: bgzip(data)),
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
                          "splittable": file.splittable, "at_0": [], "at_90": []}
        for _ in range(args.repeats):  # interleaved: every file at 0% and at 90% in each round
            for name, (file_name, _) in files.items():
                path = Path(folder) / file_name
                rows[name]["at_0"].append(first_record_seconds(path, None))
                rows[name]["at_90"].append(first_record_seconds(path, cursor))
    result = {"decompressed_bytes": len(data), "cursor": cursor, "repeats": args.repeats, "files": {}}
    for name, row in rows.items():
        at_0, at_90 = statistics.median(row["at_0"]), statistics.median(row["at_90"])
        result["files"][name] = {**{k: v for k, v in row.items() if k not in ("at_0", "at_90")},
                                 "first_record_at_0_s": at_0, "first_record_at_90_s": at_90,
                                 "range_at_0_s": [min(row["at_0"]), max(row["at_0"])],
                                 "range_at_90_s": [min(row["at_90"]), max(row["at_90"])],
                                 "ratio_90_to_0": at_90 / at_0}
        print(f"{name:55s} blocks {row['blocks']:5d}  index {row['index_seconds']:.3f}s  "
              f"first record at 0%: {1000 * at_0:8.1f} ms   at 90%: {1000 * at_90:8.1f} ms   "
              f"ratio {at_90 / at_0:6.2f}x")
    write_result(args.output, result)


if __name__ == "__main__":
    main()
