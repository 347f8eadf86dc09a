"""Reading a compressed corpus from the middle: a seekable reader of its decompressed bytes that
enters the block holding a position (the blocks: dualner.data.block_index), bgzip's format written
for machines without htslib, and `python -m dualner index`."""

from __future__ import annotations

import gzip
import io
import lzma
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from dualner.data.block_index import INDEXED_CODECS, BlockIndex, block_index
from dualner.data.formats import READ_BLOCK, DecompressionError, codec_errors, zstd_module
from dualner.errors import MissingPathError

_CHUNK = 1 << 16  # decompressed bytes handed on at a time: a reader's first record comes after 64 KiB, not 1 MiB


BGZF_TEXT_PER_MEMBER = 0xFF00  # bytes of text per member, as bgzip writes them
BGZF_END = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")  # bgzip's empty last member


def bgzf_compress(data: bytes, block: int = BGZF_TEXT_PER_MEMBER) -> bytes:
    """What `bgzip` writes, for machines without htslib (and the tests and benchmarks): deflate
    members of `block` bytes of text whose `BC` extra field holds the member's size, then bgzip's
    empty end-of-file member."""
    members = []
    for begin in range(0, len(data), block):
        chunk = data[begin:begin + block]
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = deflate.compress(chunk) + deflate.flush()
        size = 18 + len(body) + 8
        header = b"\x1f\x8b\x08\x04\0\0\0\0\0\xff" + struct.pack("<H", 6) + b"BC" + struct.pack("<HH", 2, size - 1)
        members.append(header + body + struct.pack("<II", zlib.crc32(chunk), len(chunk)))
    return b"".join(members) + BGZF_END


# -- reading from a block ---------------------------------------------------------------------------------------
def _decompressed_from(path: str, index: BlockIndex, block: int) -> Iterator[bytes]:
    """The decompressed bytes of the file from the start of `block` on, in chunks."""
    with open(path, "rb") as raw:
        if index.codec != "xz":
            raw.seek(int(index.compressed[block]))
            stream = (zstd_module().ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
                      if index.codec == "zstd" else gzip.GzipFile(fileobj=raw, mode="rb"))
            with stream:
                while chunk := stream.read(_CHUNK):
                    yield chunk
            return
        # xz: a decoder given the stream's header and then the blocks from this one on (its index
        # is never fed: the decoder checks each block's own check and stops where the blocks end)
        first = int(index.stream[block])
        for stream in range(first, len(index.stream_starts)):
            raw.seek(int(index.stream_starts[stream]))
            decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ)
            decompressor.decompress(raw.read(12))
            begin = int(index.compressed[block]) if stream == first else int(index.stream_starts[stream]) + 12
            raw.seek(begin)
            left = int(index.stream_ends[stream]) - begin
            while left > 0:
                data = raw.read(min(left, 1 << 14))
                if not data:
                    raise EOFError("the file ends inside its xz blocks")
                left -= len(data)
                try:
                    chunk = decompressor.decompress(data, _CHUNK)
                    while True:
                        if chunk:
                            yield chunk
                        if decompressor.needs_input or decompressor.eof:
                            break
                        chunk = decompressor.decompress(b"", _CHUNK)
                except lzma.LZMAError as error:
                    raise lzma.LZMAError(f"{error} near compressed byte {raw.tell()}") from None


class BlockReader(io.RawIOBase):
    """A compressed file's decompressed bytes, seekable: a seek enters the block holding the new
    position (decompressing from the block's start) unless reading on from here is shorter."""

    def __init__(self, path: str, index: BlockIndex):
        super().__init__()
        self._path, self._index = path, index
        self._position = 0  # what the reader asked for
        self._chunks: Iterator[bytes] | None = None
        self._pending = memoryview(b"")  # decompressed bytes from self._at on
        self._at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._index.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def _enter(self) -> None:
        """Start decompressing at the block holding the position, unless the decoder is already
        in that block, before the position."""
        index = self._index
        here = self._chunks is not None and self._at <= self._position
        if here and index.entry(self._position) == index.entry(self._at):
            return
        self.close_decoder()
        block = index.entry(self._position)
        self._chunks = _decompressed_from(self._path, index, block)
        self._at = int(index.decompressed[block])

    def readinto(self, buffer) -> int:
        self._enter()
        while True:
            skip = self._position - self._at
            if skip < len(self._pending):
                count = min(len(buffer), len(self._pending) - skip)
                buffer[:count] = self._pending[skip:skip + count]
                self._pending = self._pending[skip + count:]
                self._position += count
                self._at = self._position
                return count
            self._at += len(self._pending)
            try:
                chunk = next(self._chunks, None)
            except codec_errors() as error:  # one error style for damaged data (dualner.data.formats)
                if isinstance(error, OSError) and error.errno is not None:
                    raise  # an operating-system error (EIO, ...), not the data's
                self.close_decoder()
                raise DecompressionError.at(self._path, self._index.codec, error, self._at) from None
            if chunk is None:
                self._pending = memoryview(b"")
                return 0
            self._pending = memoryview(chunk)

    def close_decoder(self) -> None:
        if self._chunks is not None:
            self._chunks.close()
        self._chunks, self._pending = None, memoryview(b"")

    def close(self) -> None:
        self.close_decoder()
        super().close()


def open_blocks(path: str, index: BlockIndex, buffer: int = READ_BLOCK) -> BinaryIO:
    return io.BufferedReader(BlockReader(path, index), buffer_size=max(1 << 13, min(buffer, READ_BLOCK)))


def main(argv: list[str] | None = None) -> None:
    """`python -m dualner index FILE...`: index compressed corpora now, decompressing those whose
    blocks are found no other way (plain multi-member gzip), so stage 2 and `prepare` can split them."""
    import argparse

    from dualner.data.formats import corpus_format
    parser = argparse.ArgumentParser(prog="dualner index", description=main.__doc__)
    parser.add_argument("files", nargs="+", help="compressed corpus files (.gz, .zst, .xz)")
    args = parser.parse_args(argv)
    for path in args.files:
        if not Path(path).is_file():
            raise MissingPathError(f"index: not found: {path}")
        found = corpus_format(path)
        codec = found[1] if found else ""
        if codec not in INDEXED_CODECS:
            print(f"{path}: not a .gz/.zst/.xz corpus: nothing to index")
            continue
        index = block_index(path, codec, scan=True)
        blocks = index.blocks if index is not None else 1
        verdict = "splittable" if blocks >= 2 else "one piece (recompress it with bgzip, xz -T0 or pzstd)"
        print(f"{path}: {blocks} block(s), {index.size if index is not None else '?'} bytes decompressed: {verdict}")
