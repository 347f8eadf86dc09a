"""Entry points into compressed corpora (reading from them: dualner.data.blocks): where each independent block of a compressed file begins,
in compressed and decompressed bytes, so that a reader can start at any decompressed position by
decompressing from the start of the block holding it (O(block), not O(position)).

Which files have blocks (an index of >= 2 blocks makes a file splittable; dualner.data.corpus):
- bgzip (BGZF) `.gz`: gzip members of <= 64 KiB whose headers carry their compressed size and whose
  trailers their decompressed size: walked without decompressing;
- multi-frame `.zst`: the seek table of zstd's seekable format, or a walk over the frame and block
  headers (frames whose header records their decompressed size, as `zstd`/`pzstd` write for files);
- multi-block `.xz` (`xz -T0`, `xz --block-size`): the index in the file's footer, O(blocks);
- other multi-member `.gz` (and `.zst` frames without a recorded size): their boundaries are found
  only by decompressing the file once, on request (`python -m dualner index FILE`), never at start-up.
A file with one block (the usual single-stream download) stays one piece, as do `.bz2` files.

An index is built once and cached beside the file (`.NAME.dualner-index.npz`) or, where that folder
is not writable, in ~/.cache/dualner/block-index (XDG_CACHE_HOME), keyed by the file's path, size and
modification time: a changed file is indexed again.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import socket
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dualner.data.formats import READ_BLOCK, DecompressionError, zstd_module

INDEX_VERSION = 1
MOST_ENTRIES = 1 << 16  # entry points kept per file in memory (and sent to every loader worker)
INDEXED_CODECS = ("gzip", "zstd", "xz")
_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class BlockIndex:
    """The blocks of one compressed file: each block's first compressed byte and first decompressed
    byte (strictly increasing: empty blocks are left out, a reader passes through them)."""

    codec: str
    compressed: np.ndarray  # int64
    decompressed: np.ndarray  # int64, decompressed[0] == 0
    size: int  # decompressed bytes of the whole file
    # xz only: the stream of each block, each stream's header offset and where its blocks end
    stream: np.ndarray = field(default_factory=lambda: _EMPTY)
    stream_starts: np.ndarray = field(default_factory=lambda: _EMPTY)
    stream_ends: np.ndarray = field(default_factory=lambda: _EMPTY)

    @property
    def blocks(self) -> int:
        return len(self.compressed)

    def entry(self, position: int) -> int:
        """The block holding decompressed byte `position`."""
        return max(0, int(np.searchsorted(self.decompressed, position, side="right")) - 1)

    def thinned(self, most: int = MOST_ENTRIES) -> "BlockIndex":
        """At most about `most` evenly spread entry points (a resume then decompresses at most
        size/most bytes more before its position): a 300 GB bgzip file has millions of blocks."""
        if self.blocks <= most:
            return self
        bucket = self.decompressed // -(-self.size // most)
        keep = np.unique(bucket, return_index=True)[1]
        return BlockIndex(self.codec, self.compressed[keep], self.decompressed[keep], self.size,
                          self.stream[keep] if len(self.stream) else _EMPTY, self.stream_starts, self.stream_ends)


def _from_sizes(codec: str, compressed: list[int], sizes: list[int], **streams) -> BlockIndex:
    """An index from each block's compressed offset and decompressed size (empty blocks left out)."""
    sizes_array = np.asarray(sizes, dtype=np.int64)
    starts = np.cumsum(sizes_array) - sizes_array
    keep = sizes_array > 0
    if not keep.any():
        keep[:1] = True
    kept = {name: np.asarray(values, dtype=np.int64)[keep] if name == "stream" else np.asarray(values, np.int64)
            for name, values in streams.items()}
    return BlockIndex(codec, np.asarray(compressed, dtype=np.int64)[keep], starts[keep], int(sizes_array.sum()),
                      **kept)


# -- reading the block structure -------------------------------------------------------------------------
def _u16(data, at: int) -> int:
    return int.from_bytes(data[at:at + 2], "little")


def _u32(data, at: int) -> int:
    return int.from_bytes(data[at:at + 4], "little")


def _bgzf_blocks(data) -> BlockIndex | None:
    """BGZF: every member's header holds its size (the `BC` extra field), its trailer the
    decompressed size: a walk over headers, no decompression. None if any member is not BGZF."""
    compressed, sizes, at, end = [], [], 0, len(data)
    while at < end:
        if data[at:at + 4] != b"\x1f\x8b\x08\x04" or at + 12 > end:
            return None
        extra_end = at + 12 + _u16(data, at + 10)
        field, block_size = at + 12, None
        while field + 4 <= extra_end:
            length = _u16(data, field + 2)
            if data[field:field + 2] == b"BC" and length == 2:
                block_size = _u16(data, field + 4) + 1
            field += 4 + length
        if block_size is None or at + block_size > end:
            return None
        compressed.append(at)
        sizes.append(_u32(data, at + block_size - 4))
        at += block_size
    return _from_sizes("gzip", compressed, sizes)


def _gzip_members_by_decompressing(path: str) -> BlockIndex:
    """Any gzip file's members, found by decompressing it once (their ends are known only there)."""
    compressed, sizes = [], []
    consumed, decompressor = 0, None
    with open(path, "rb") as raw:
        while data := raw.read(READ_BLOCK):
            while data:
                if decompressor is None:
                    stripped = data.lstrip(b"\0")  # zero padding after a member, as gzip allows
                    consumed += len(data) - len(stripped)
                    data = stripped
                    if not data:
                        break
                    compressed.append(consumed)
                    sizes.append(0)
                    decompressor = zlib.decompressobj(31)
                given = data
                try:
                    while True:
                        sizes[-1] += len(decompressor.decompress(given, READ_BLOCK))
                        if decompressor.eof or not decompressor.unconsumed_tail:
                            break
                        given = decompressor.unconsumed_tail
                except zlib.error as error:
                    raise DecompressionError.at(path, "gzip", error, sum(sizes), consumed) from None
                if decompressor.eof:
                    used = len(data) - len(decompressor.unused_data)
                    consumed, data, decompressor = consumed + used, decompressor.unused_data, None
                else:
                    consumed, data = consumed + len(data), b""
    if decompressor is not None:
        raise DecompressionError.at(path, "gzip", "truncated", sum(sizes), consumed)
    return _from_sizes("gzip", compressed, sizes)


_ZSTD_MAGIC = 0xFD2FB528
_SEEKABLE_MAGIC = 0x8F92EAB1


def _zstd_seek_table(data) -> BlockIndex | None:
    """zstd's seekable format: a skippable frame at the end lists every frame's sizes."""
    end = len(data)
    if end < 17 or _u32(data, end - 4) != _SEEKABLE_MAGIC:
        return None
    frames, descriptor = _u32(data, end - 9), data[end - 5]
    entry = 12 if descriptor & 0x80 else 8
    table = end - 9 - frames * entry
    if table < 8 or _u32(data, table - 8) != 0x184D2A5E:
        return None
    compressed, sizes, at = [], [], 0
    for frame in range(frames):
        compressed.append(at)
        at += _u32(data, table + frame * entry)
        sizes.append(_u32(data, table + frame * entry + 4))
    return _from_sizes("zstd", compressed, sizes) if at == table - 8 else None


def _zstd_frame(data, at: int) -> tuple[int, int | None] | None:
    """(where the zstd frame starting at `at` ends, its decompressed size where its header records
    it): a walk over its block headers; None where it is cut off or not a frame."""
    end = len(data)
    if _u32(data, at) != _ZSTD_MAGIC or at + 6 > end:
        return None
    descriptor = data[at + 4]
    single_segment, checksum = descriptor >> 5 & 1, descriptor >> 2 & 1
    header = at + 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
    field = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
    content = int.from_bytes(data[header:header + field], "little") + (256 if field == 2 else 0) if field else None
    cursor = header + field
    while True:
        if cursor + 3 > end:
            return None
        block = int.from_bytes(data[cursor:cursor + 3], "little")
        kind = block >> 1 & 3
        if kind == 3:
            return None
        cursor += 3 + (1 if kind == 1 else block >> 3)
        if block & 1:
            break
    cursor += 4 if checksum else 0
    return (cursor, content) if cursor <= end else None


def _zstd_frames(data, path: str, scan: bool) -> BlockIndex | None:
    """A walk over the frame and block headers. A frame whose header lacks its decompressed size is
    decompressed to learn it (only when `scan`; else None)."""
    compressed, sizes, at, end = [], [], 0, len(data)
    while at < end:
        magic = _u32(data, at)
        if 0x184D2A50 <= magic <= 0x184D2A5F:  # a skippable frame (metadata)
            at += 8 + _u32(data, at + 4)
            continue
        frame = _zstd_frame(data, at)
        if frame is None:
            return None
        cursor, content = frame
        if content is None:
            if not scan:
                return None  # its size is known only by decompressing it
            reader = zstd_module().ZstdDecompressor().stream_reader(io.BytesIO(data[at:cursor]))
            content = sum(len(chunk) for chunk in iter(lambda: reader.read(READ_BLOCK), b""))
        compressed.append(at)
        sizes.append(content)
        at = cursor
    return _from_sizes("zstd", compressed, sizes) if at == end else None


def _zstd_ends_whole(data) -> bool:
    """Whether the frames (and skippable frames) run to the file's end, none cut off."""
    at, end = 0, len(data)
    while at < end:
        if end - at < 8:
            return False
        if 0x184D2A50 <= _u32(data, at) <= 0x184D2A5F:
            at += 8 + _u32(data, at + 4)
            continue
        frame = _zstd_frame(data, at)
        if frame is None:
            return False
        at = frame[0]
    return at == end


_BZ2_STREAM_END = 0x177245385090  # a bzip2 stream's end-of-stream marker (sqrt(pi)), then its 32-bit CRC


def _bz2_ends_whole(data) -> bool:
    """Whether the file ends with a bzip2 stream's end: the 48-bit marker and the 32-bit CRC, then
    0-7 bits of padding to the byte (the marker is not byte-aligned)."""
    if len(data) < 11:
        return False
    tail = int.from_bytes(data[-11:], "big")
    return any(tail >> (padding + 32) & ((1 << 48) - 1) == _BZ2_STREAM_END for padding in range(8))


def _is_bgzf(data) -> bool:
    return data[:4] == b"\x1f\x8b\x08\x04" and len(data) >= 16 and data[12:14] == b"BC"


@contextmanager
def _mapped(path: str):
    """The file's bytes, memory-mapped (None for an empty file, which mmap refuses)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            yield None
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield data


def ends_whole(path: str, codec: str) -> bool:
    """Whether a compressed file's structure runs to its end, told without decompressing it (O(1),
    or a walk over block headers): xz's index in its footer, zstd's frame and block headers, bgzip's
    member headers, bzip2's end-of-stream marker. A plain gzip stream records no such thing (True:
    its damage is found where it is read)."""
    with _mapped(path) as data:
        if data is None:
            return True
        try:
            if codec == "xz":
                return _xz_blocks(data) is not None
            if codec == "zstd":
                return _zstd_ends_whole(data)
            if codec == "bz2":
                return _bz2_ends_whole(data)
            return not _is_bgzf(data) or _bgzf_blocks(data) is not None
        except IndexError:  # a header cut off by the file's end
            return False


def _varint(data, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def _xz_blocks(data) -> BlockIndex | None:
    """xz: each stream's index (read from its footer, last stream first) lists its blocks' sizes."""
    streams: list[tuple[int, int, list[tuple[int, int]]]] = []  # (header offset, blocks end, records)
    end = len(data)
    while end > 0:
        while end >= 4 and data[end - 4:end] == b"\0\0\0\0":  # stream padding
            end -= 4
        if end < 24 or data[end - 2:end] != b"YZ":
            return None
        index_start = end - 12 - (_u32(data, end - 8) + 1) * 4
        if index_start < 12 or data[index_start] != 0:
            return None
        count, at = _varint(data, index_start + 1)
        records = []
        for _ in range(count):
            unpadded, at = _varint(data, at)
            size, at = _varint(data, at)
            records.append((unpadded, size))
        header = index_start - sum(-(-unpadded // 4) * 4 for unpadded, _ in records) - 12
        if header < 0 or data[header:header + 6] != b"\xfd7zXZ\x00":
            return None
        streams.append((header, index_start, records))
        end = header
    compressed, sizes, stream_of = [], [], []
    streams.reverse()
    for number, (header, _, records) in enumerate(streams):
        at = header + 12
        for unpadded, size in records:
            compressed.append(at)
            sizes.append(size)
            stream_of.append(number)
            at += -(-unpadded // 4) * 4
    return _from_sizes("xz", compressed, sizes, stream=stream_of, stream_starts=[s[0] for s in streams],
                       stream_ends=[s[1] for s in streams])


def read_block_index(path: str, codec: str, scan: bool = False) -> BlockIndex | None:
    """The file's blocks; None where that needs a full decompression and `scan` is False, or the
    structure is not one we know (a damaged file: its reader reports it)."""
    with _mapped(path) as data:
        if data is None:
            return None
        try:
            if codec == "xz":
                return _xz_blocks(data)
            if codec == "zstd":
                return _zstd_seek_table(data) or _zstd_frames(data, path, scan)
            if codec == "gzip":
                found = _bgzf_blocks(data)
                return found if found is not None or not scan else _gzip_members_by_decompressing(path)
        except IndexError:  # a header cut off by the file's end
            return None
    return None


# -- the cache -------------------------------------------------------------------------------------------------
def _cache_paths(path: str) -> list[Path]:
    file = Path(path).resolve()
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(file).encode()).hexdigest()[:24]
    return [file.with_name(f".{file.name}.dualner-index.npz"), cache_home / "dualner" / "block-index" / f"{key}.npz"]


def _load_cached(cache: Path, stat: os.stat_result) -> BlockIndex | None | bool:
    """The cached index (None: cached as having no usable blocks), or False when absent or stale."""
    try:
        with np.load(cache, allow_pickle=False) as saved:
            if saved["key"].tolist() != [INDEX_VERSION, stat.st_size, stat.st_mtime_ns]:
                return False
            if not len(saved["compressed"]):
                return None
            return BlockIndex(str(saved["codec"]), saved["compressed"], saved["decompressed"], int(saved["size"]),
                              saved["stream"], saved["stream_starts"], saved["stream_ends"])
    except (OSError, ValueError, KeyError, EOFError, zlib.error):
        return False


def _save(cache: Path, stat: os.stat_result, codec: str, index: BlockIndex | None) -> bool:
    found = index or BlockIndex(codec, _EMPTY, _EMPTY, 0)
    temporary = cache.with_name(f"{cache.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # ranks of many nodes
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            np.savez(handle, key=np.asarray([INDEX_VERSION, stat.st_size, stat.st_mtime_ns], dtype=np.int64),
                     codec=np.asarray(codec), size=np.asarray(found.size), compressed=found.compressed,
                     decompressed=found.decompressed, stream=found.stream, stream_starts=found.stream_starts,
                     stream_ends=found.stream_ends)
        os.replace(temporary, cache)
        return True
    except OSError:
        temporary.unlink(missing_ok=True)
        return False


def block_index(path: str, codec: str, scan: bool = False) -> BlockIndex | None:
    """The cached index of a compressed file, built (and cached) if absent or stale. `scan`: also
    decompress the whole file where its blocks cannot be found otherwise (plain multi-member gzip)."""
    if codec not in INDEXED_CODECS:
        return None
    stat = os.stat(path)
    caches = _cache_paths(path)
    for cache in caches:
        cached = _load_cached(cache, stat)
        if cached is not False:
            return cached
    index = read_block_index(path, codec, scan)
    if index is None and not scan:
        return None  # not found cheaply: nothing to remember (a scan may find members)
    for cache in caches:
        if _save(cache, stat, codec, index):
            break
    return index
