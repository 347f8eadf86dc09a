"""Stage 2's position records (dualner.data.shares, position, range_reading): a range of a stream with
its pass and cursor, and a pool's segment (the records one range gave a pool).

Checkpoints keep them as plain lists in the field order below (`saved()`, `from_saved`), the layout
checkpoints have always had, so that a position written before these records were typed still
loads."""

from __future__ import annotations

from dataclasses import astuple, dataclass, replace
from typing import Sequence


@dataclass
class RangeState:
    """One range of one stream and how far it was read.

    - file, start, end: the source's index in its stream and positions in it: bytes of an uncompressed
      file, positions of a prepared corpus's pass order, or (end unbounded) a piece that cannot be
      entered in the middle: a compressed file of one block, a hub dataset's shard;
    - pass_, cursor: the range's pass and the next record's position (-1: the start of its pass);
    - step, offset, skip: a piece that cannot be split is shared by stride: the range keeps one record
      in `step`, from record `offset` of each pass; `skip` records are still to be passed over from the
      cursor before the next kept one (1, 0, 0 for a contiguous range);
    - once: -1 for a range that starts its next pass when it ends; else a leftover of a resume, read
      in pass `once` only."""

    file: int
    start: int
    end: int
    pass_: int
    cursor: int = -1
    step: int = 1
    offset: int = 0
    skip: int = 0
    once: int = -1

    @classmethod
    def fresh(cls, file: int, start: int, end: int, pass_: int, step: int = 1, offset: int = 0,
              once: int = -1) -> RangeState:
        """A range at the start of its pass."""
        return cls(file, start, end, pass_, -1, step, offset, offset, once)

    @classmethod
    def from_saved(cls, saved: Sequence[int]) -> RangeState:
        return cls(*saved)

    def saved(self) -> list[int]:
        return list(astuple(self))

    def copy(self) -> RangeState:
        return replace(self)

    def key(self) -> tuple:
        """What names a range for its whole life (its pass and cursor change)."""
        return self.file, self.start, self.end, self.step, self.offset, self.once

    @property
    def strided(self) -> bool:
        return self.step > 1

    @property
    def spent(self) -> bool:
        """A resume's leftover range that has been read."""
        return self.once >= 0 and self.pass_ > self.once

    def advance(self, pass_: int, after: int, done: bool) -> None:
        """The state once its records up to `after` (of pass `pass_`) are taken."""
        if done:
            self.pass_, self.cursor, self.skip = pass_ + 1, -1, self.offset
        else:
            self.pass_, self.cursor, self.skip = pass_, after, self.step - 1


@dataclass
class Segment:
    """The records one range gave one pool: enough to read them again anywhere."""

    stream: int
    file: int
    start: int
    end: int
    pass_: int
    first: int  # the position of its first record
    records: int
    after: int  # the range's cursor after its last record
    done: bool  # the range's pass ended with it
    step: int
    offset: int
    once: int

    @classmethod
    def opened(cls, stream: int, state: RangeState, first: int) -> Segment:
        return cls(stream, state.file, state.start, state.end, state.pass_, first, 0, first, False,
                   state.step, state.offset, state.once)

    @classmethod
    def from_saved(cls, saved: Sequence) -> Segment:
        return cls(*saved)

    def saved(self) -> list:
        return list(astuple(self))

    def range_key(self) -> tuple:
        """The key (RangeState.key) of the range it came from."""
        return self.file, self.start, self.end, self.step, self.offset, self.once

    def range_to_read_again(self) -> RangeState:
        """Its range positioned at its first record, with no record to pass over."""
        return RangeState(self.file, self.start, self.end, self.pass_, self.first, self.step, self.offset, 0,
                          self.once)
