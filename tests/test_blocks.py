"""Compressed corpora made of independent blocks (dualner.data.blocks): bgzip, multi-member gzip,
multi-frame and seekable zstd, multi-block and multi-stream xz are split into byte ranges of their
decompressed bytes; any cut reads every record once, as reading the whole file does; a resume enters
the block holding its cursor; the index is cached and rebuilt when the file changes; a file of one
block stays one piece."""

import gzip
import io
import json
import lzma
import os
import random
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualner.cli import dispatch
from dualner.data.block_index import block_index
from dualner.data.blocks import BlockReader, bgzf_compress
from dualner.data.corpus import RecordReader, describe_file
from dualner.data.file_source import estimate_records
from dualner.data.encoding import WindowTokenizer
from dualner.data.packing import Collator
from dualner.data.source_kinds import open_sources
from dualner.data.stream_spec import KIND_TARGET, STREAM_META, StreamSpec
from dualner.data.streaming import Stage2Stream
from dualner.labels import LabelSet

zstandard = pytest.importorskip("zstandard")


def corpus_lines(count: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [(" ".join(f"w{rng.randint(0, 999)}" for _ in range(rng.randint(1, 25))) + "\n").encode()
            for _ in range(count)]


def conll_blocks(count: int) -> bytes:
    return "".join(f"a{i}\tO\nb{i}\tB-PER\nc{i}\tI-PER\n\n" for i in range(count)).encode()


def bgzf(data: bytes, block: int = 20_000) -> bytes:
    return bgzf_compress(data, block)


def gzip_members(data: bytes, block: int = 20_000) -> bytes:
    return b"".join(gzip.compress(data[begin:begin + block]) for begin in range(0, len(data), block))


def zstd_frames(data: bytes, block: int = 20_000) -> bytes:
    compressor = zstandard.ZstdCompressor()
    return b"".join(compressor.compress(data[begin:begin + block]) for begin in range(0, len(data), block))


def zstd_seekable(data: bytes, block: int = 20_000) -> bytes:
    """zstd's seekable format: frames written without their size, then the seek table (a skippable
    frame listing each frame's compressed and decompressed size)."""
    compressor = zstandard.ZstdCompressor(write_content_size=False)
    frames = [compressor.compress(data[begin:begin + block]) for begin in range(0, len(data), block)]
    entries = b"".join(struct.pack("<II", len(frame), len(data[i * block:(i + 1) * block]))
                       for i, frame in enumerate(frames))
    footer = struct.pack("<IBI", len(frames), 0, 0x8F92EAB1)
    return b"".join(frames) + struct.pack("<II", 0x184D2A5E, len(entries) + len(footer)) + entries + footer


def xz_streams(data: bytes, block: int = 20_000) -> bytes:
    """Several xz streams back to back (each its own one-block stream), with stream padding."""
    return b"".join(lzma.compress(data[begin:begin + block]) + b"\0" * 4 for begin in range(0, len(data), block))


def xz_blocks(data: bytes, block: int = 20_000) -> bytes:
    """One xz stream of several blocks, as `xz -T0` writes it."""
    if shutil.which("xz") is None:
        pytest.skip("the xz program is not installed")
    done = subprocess.run(["xz", "-c", "-T2", f"--block-size={block}"], input=data, capture_output=True, check=True)
    return done.stdout


MAKERS = {"bgzf": (".gz", bgzf), "zstd-frames": (".zst", zstd_frames), "zstd-seekable": (".zst", zstd_seekable),
          "xz-blocks": (".xz", xz_blocks), "xz-streams": (".xz", xz_streams)}


def write(tmp_path, kind: str, data: bytes, name: str = "c.txt"):
    suffix, make = MAKERS[kind]
    path = tmp_path / f"{name}{suffix}"
    path.write_bytes(make(data))
    return path


def records(file, cuts):
    bounds = [0, *sorted(cuts), file.size]
    return [(record.start, b"".join(record.lines)) for a, b in zip(bounds, bounds[1:])
            for record in RecordReader(file, a, b)]


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_multi_block_files_split_at_any_byte_and_read_every_record_once(tmp_path, kind):
    lines = corpus_lines(3000)
    data = b"".join(lines)
    file = describe_file(write(tmp_path, kind, data), "k")
    assert file.splittable and file.blocks.blocks >= 2 and file.size == len(data)
    whole = records(file, [])
    assert [body for _, body in whole] == lines
    rng = random.Random(kind)
    for pieces in (2, 3, 8, 33):
        cuts = rng.sample(range(1, file.size), pieces - 1)
        assert records(file, cuts) == whole
    # cuts exactly on block starts and one byte either side of them
    starts = [int(start) for start in file.blocks.decompressed[1:]]
    assert records(file, starts) == whole
    assert records(file, [s + 1 for s in starts] + [s - 1 for s in starts]) == whole
    assert estimate_records(file) == (3000, True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=1, max_value=11_000), max_size=10),
       kind=st.sampled_from(["bgzf", "xz-streams", "zstd-frames"]))
def test_conll_blocks_across_compressed_blocks_are_read_once_for_any_cut(tmp_path_factory, cuts, kind):
    """CoNLL records span lines, and a range start that lands inside one looks back for the blank
    line before it: across block boundaries too."""
    data = conll_blocks(400)  # about 11 kB in blocks of 1,500 bytes
    folder = tmp_path_factory.mktemp("conll")
    path = folder / f"c.tsv{MAKERS[kind][0]}"
    path.write_bytes(MAKERS[kind][1](data, 1500))
    file = describe_file(path, "k")
    assert file.splittable
    whole = records(file, [])
    assert len(whole) == 400
    assert records(file, [c for c in cuts if c < file.size]) == whole


@pytest.mark.parametrize("kind", ["bgzf", "xz-blocks", "zstd-frames"])
def test_resume_mid_file_enters_the_block_of_the_cursor(tmp_path, kind):
    lines = corpus_lines(3000, seed=1)
    file = describe_file(write(tmp_path, kind, b"".join(lines)), "k")
    whole = list(RecordReader(file, 0, file.size))
    for fraction in (0.1, 0.5, 0.9, 0.999):
        cursor = whole[int(len(whole) * fraction)].start
        resumed = list(RecordReader(file, 0, file.size, cursor))
        assert [r.lines for r in resumed] == [r.lines for r in whole if r.start >= cursor]
    # the reader decompresses from the block holding the position, not from byte 0
    reader = BlockReader(file.path, file.blocks)
    position = file.size * 9 // 10
    reader.seek(position)
    block = file.blocks.entry(position)
    assert reader.read(100) == b"".join(lines)[position:position + 100]
    assert block == file.blocks.blocks - 1 or file.blocks.decompressed[block + 1] > position
    assert int(file.blocks.decompressed[block]) > 0
    # backward seeks re-enter an earlier block
    reader.seek(5)
    assert reader.read(10) == b"".join(lines)[5:15]
    reader.close()


def test_a_stream_splits_a_multi_block_file_over_ranks(tmp_path, tiny_tokenizer):
    """A bgzip file used to be one piece (rank 1 of 2 had nothing to read); now both ranks read it,
    each record once per pass."""
    path = tmp_path / "t.jsonl.gz"
    rows = [json.dumps({"tokens": [f"w{i}", "x", "y"][: 1 + i % 3]}) + "\n" for i in range(400)]
    path.write_bytes(bgzf("".join(rows).encode(), 1000))
    labels = LabelSet(("LOC", "ORG", "PER"))
    taken = []
    for rank in range(2):
        specs = [StreamSpec("target/xx", KIND_TARGET, "xx", open_sources([str(path)], "stage2.target.xx"), 1.0)]
        stream = Stage2Stream(specs, WindowTokenizer(tiny_tokenizer, labels, 32), 4, 0, rank, 2,
                              Collator(tiny_tokenizer.pad_token_id, row_length=32, meta_columns=STREAM_META),
                              pool=16, repeat=False, range_bytes=4096)
        mine = [sample for batch in stream for sample in batch["meta"]["sample_id"]]
        assert mine, f"rank {rank} read nothing"
        taken += mine
    assert sorted(int(s.rsplit("@", 1)[1]) for s in taken) == sorted(
        sum(len(r.encode()) for r in rows[:i]) for i in range(400))


def test_one_block_files_stay_one_piece(tmp_path):
    data = b"".join(corpus_lines(500))
    single = {"s.txt.gz": gzip.compress(data), "s.txt.xz": lzma.compress(data),
              "s.txt.zst": zstandard.ZstdCompressor().compress(data), "s.txt.bz2": __import__("bz2").compress(data)}
    for name, content in single.items():
        (tmp_path / name).write_bytes(content)
        file = describe_file(tmp_path / name, "k")
        assert not file.splittable and file.blocks is None and file.size == len(content), name
        assert [r.lines[0] for r in RecordReader(file, 0, file.end)] == corpus_lines(500)


def test_plain_multi_member_gzip_is_indexed_only_by_the_index_command(tmp_path, capsys):
    """Its members' ends are found only by decompressing it: never at start-up, once on request."""
    lines = corpus_lines(2000)
    path = tmp_path / "m.txt.gz"
    path.write_bytes(gzip_members(b"".join(lines)))
    assert not describe_file(path, "k").splittable
    assert dispatch(["index", str(path)]) == 0
    assert "splittable" in capsys.readouterr().out
    file = describe_file(path, "k")
    assert file.splittable and file.blocks.blocks >= 2
    assert records(file, [7, file.size // 3, file.size // 2 + 5]) == records(file, [])
    assert [body for _, body in records(file, [])] == lines


def test_the_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path):
    path = write(tmp_path, "bgzf", b"".join(corpus_lines(2000)))
    cache = tmp_path / f".{path.name}.dualner-index.npz"
    first = describe_file(path, "k")
    assert cache.is_file()
    written = cache.stat().st_mtime_ns
    assert describe_file(path, "k").blocks.blocks == first.blocks.blocks
    assert cache.stat().st_mtime_ns == written  # read, not rebuilt
    # rewritten (other block sizes): the stale cache is rebuilt
    lines = corpus_lines(2500, seed=3)
    path.write_bytes(bgzf(b"".join(lines), 7000))
    os.utime(path, ns=(first.mtime_ns + 10**9, first.mtime_ns + 10**9))
    second = describe_file(path, "k")
    assert second.blocks.blocks != first.blocks.blocks and second.size == len(b"".join(lines))
    assert cache.stat().st_mtime_ns != written
    assert [body for _, body in records(second, [second.size // 2])] == lines


def test_an_unwritable_folder_caches_the_index_in_the_user_cache(tmp_path, monkeypatch):
    path = write(tmp_path, "xz-streams", b"".join(corpus_lines(1500)))
    blocked = tmp_path / f".{path.name}.dualner-index.npz"
    blocked.mkdir()  # the place beside the file cannot take a file
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert describe_file(path, "k").splittable
    cached = list((tmp_path / "cache" / "dualner" / "block-index").glob("*.npz"))
    assert len(cached) == 1
    assert block_index(str(path), "xz").blocks == describe_file(path, "k").blocks.blocks


def test_a_truncated_multi_block_file_is_not_split(tmp_path):
    """A damaged file has no readable block structure: it stays one piece (its reader reports it)."""
    path = write(tmp_path, "bgzf", b"".join(corpus_lines(2000)))
    path.write_bytes(path.read_bytes()[:-5000])
    assert not describe_file(path, "k").splittable
    xz = write(tmp_path, "xz-streams", b"".join(corpus_lines(2000)), name="x.txt")
    xz.write_bytes(xz.read_bytes()[:-30])
    assert not describe_file(xz, "k").splittable


def test_many_blocks_are_thinned_to_evenly_spread_entry_points(tmp_path):
    from dualner.data.block_index import read_block_index
    path = write(tmp_path, "bgzf", b"".join(corpus_lines(3000)))
    index = read_block_index(str(path), "gzip")
    thin = index.thinned(4)
    assert 2 <= thin.blocks <= 4 < index.blocks and thin.decompressed[0] == 0
    reader = io.BufferedReader(BlockReader(str(path), thin))
    reader.seek(index.size // 2)
    assert reader.read(50) == b"".join(corpus_lines(3000))[index.size // 2:index.size // 2 + 50]
