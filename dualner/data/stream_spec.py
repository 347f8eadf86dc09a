"""A stream of stage 2 (the labeled source, a target language's text, a language's translations):
its sources and weight in the mix (dualner.data.mix)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from dualner.data.source import Source

KIND_SOURCE, KIND_TARGET, KIND_TRANSLATION = "source", "target", "translation"
STREAM_META = ("language", "kind", "sample_id", "src_id", "word_offset", "pass")


@dataclass
class StreamSpec:
    """One stream of stage 2: its sources (dualner.data.source_kinds: corpus files, hub datasets or
    one prepared corpus)."""

    name: str  # "target/de"
    kind: str
    language: str
    sources: list[Source]
    weight: float
    pair_with: str = ""  # translations under the parallel MSE: the labeled source JSONL

    @property
    def seed_key(self) -> int:
        return zlib.crc32(self.name.encode())

    @property
    def labeled(self) -> bool:
        return self.kind == KIND_SOURCE

    def identity(self) -> list:
        return [source.identity() for source in self.sources]
