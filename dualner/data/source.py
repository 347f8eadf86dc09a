"""One piece of a stage-2 stream's data (a corpus file, a prepared corpus, a hub dataset) as the
loader sees it: the same questions asked of every kind, answered by its class (the kinds and how one
is chosen: dualner.data.source_kinds).

Positions. A source's positions are what its ranges (dualner.data.range_state) count: bytes of a file,
positions of a prepared corpus's pass order, records of a hub shard. A *contiguous* source can be cut
anywhere in [0, extent); any other is made of pieces that cannot be entered in the middle, each
shared among readers by stride (dualner.data.shares)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Iterator

from dualner.data.corpus import BadRecord, CorpusFile


class Source(ABC):
    """What the loader, the share planner, start-up checks and `stage2.mix=size` ask of a source."""

    kind: ClassVar[str]  # its key in dualner.data.source_kinds.SOURCE_KINDS
    position_unit: ClassVar[str] = "bytes"  # what its positions count; contiguous sources of one unit are cut together
    path: str

    @classmethod
    @abstractmethod
    def open(cls, path: str, key: str) -> Source:
        """The source `path` names (`key`: the config entry naming it, for errors)."""

    # -- identity ------------------------------------------------------------------------------------------
    @abstractmethod
    def identity(self) -> list:
        """What a checkpoint keeps of it, to tell whether its positions still hold on a resume."""

    # -- ranges --------------------------------------------------------------------------------------------
    @property
    def contiguous(self) -> bool:
        """Whether its positions can be cut anywhere in [0, extent)."""
        return False

    @property
    def extent(self) -> int:
        """The end of its positions, for a contiguous source."""
        return 0

    def unsplit_pieces(self) -> list[tuple[int, int]]:
        """(start, end) of each piece that cannot be split (none for a contiguous source)."""
        return []

    # -- reading ---------------------------------------------------------------------------------------------
    @abstractmethod
    def records(self, start: int, end: int, pass_: int, cursor: int, seed_key: int) -> Iterator[tuple[int, int, object]]:
        """(position, next cursor, record) of the range [start, end) in pass `pass_`, from `cursor`
        (-1: the range's start); `seed_key` names the stream (a prepared corpus's pass order)."""

    @abstractmethod
    def unit(self, record: object, language: str, kind: str, pass_: int, labeled: bool) -> list | BadRecord | None:
        """A record as a unit of a stream of `kind` and `language` (labeled: the labeled source): its
        members (sentence dicts to tokenize, or a prepared sentence's stored windows), BadRecord, or
        None (a record holding no sentence)."""

    def pairing_id(self, unit: list) -> str:
        """The `src_id` by which stage2.mse=parallel pairs a translation unit with its source ('': none)."""
        return ""

    def entry_cost(self, position: int) -> int:
        """Bytes entering it at `position` decompresses and throws away (0: a seek)."""
        return 0

    def entry_seconds(self, discarded: int) -> float:
        """An estimate of the seconds one CPU takes to discard `discarded` bytes of it."""
        return 0.0

    def reads_before(self, position: int) -> bool:
        """Whether entering it at `position` reads what comes before (else it is a seek)."""
        return self.entry_cost(position) > 0

    def corpus_file(self) -> CorpusFile | None:
        """The file whose lines number its bad records (None: records have no line)."""
        return None

    # -- counting ------------------------------------------------------------------------------------------
    @abstractmethod
    def count(self, key: str) -> tuple[int, bool]:
        """(sentences, exact) for stage2.mix=size, reading O(1) of it; ConfigError (naming `key`) where
        the kind cannot tell its size in advance."""

    # -- checks --------------------------------------------------------------------------------------------
    def check_readable(self, language: str, labeled: bool, key: str) -> None:
        """Before anything is written: it can be read and holds a sentence (as far as O(1) shows)."""

    def check_for_model(self, fingerprint: Callable[[], str], max_length: int, embeddings: int | None,
                        language: str, key: str, log) -> None:
        """Usable by this job's model: `fingerprint()` is the job's tokenizer_fingerprint, computed
        when first asked; `embeddings` its token embeddings (None: unknown)."""

    def translation_records(self, sample: int, key: str) -> Iterator[dict] | None:
        """Its first records' `src_id` and `sample_id`, for the stage2.mse=parallel check (None: not
        checked); ConfigError where its records cannot carry a src_id."""
        return None
