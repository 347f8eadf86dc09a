"""Every reader's equal share of every stream of stage 2, and how the shares are cut again when a run
resumes on another number of readers (ranks x loader workers).

A share is a list of ranges (dualner.data.range_state.RangeState: a source's positions [start, end),
and the range's pass, cursor and stride). A contiguous source's range takes the records that start in
[start, end) (Hadoop's rule: any cut reads each record once); a piece that cannot be split is one
range per reader, by stride.

Equal shares. The splittable positions of a stream (bytes of its uncompressed files, positions of a
prepared corpus) are laid end to end and cut into `readers` equal spans, so a share may span files;
each piece that cannot be split is kept by every reader, reader r keeping its records r, r + R, ...
(each such piece is read in full by every reader: R-fold decompression, reported at start-up). Every
reader holds the same amount of every stream, and the global plan (dualner.data.mix) asks every
reader for the same number of records of each stream, so all ranges go through their passes at the
same rate: every sentence of a stream is drawn equally often, and the stream's passes are its
ranges' passes.

Another number of readers. Each contiguous range is split at its cursor (what came before is done
for its pass, so it belongs to the next one) and the stream's positions are cut into equal spans
again, the parts at each pass on their own (every reader has as much left of the current pass). The stride ranges of a piece are re-strided: what each one has
left of its pass (and of the passes it is behind the furthest) is shared out by a finer stride as
leftovers, read once, and every reader takes an equal stride of the passes after.
"""

from __future__ import annotations

from typing import Sequence

from dualner.data.range_state import RangeState
from dualner.data.source import Source


def unsplit_pieces(sources: Sequence[Source]) -> list[tuple[int, int, int]]:
    """(file, start, end) of every piece that cannot be split: a compressed file of one block, a hub shard."""
    return [(file, start, end) for file, source in enumerate(sources) for start, end in source.unsplit_pieces()]


def equal_shares(sources: Sequence[Source], readers: int, limits: dict[str, int]) -> list[list[RangeState]]:
    """Each reader's ranges of one stream at the start: equal spans of the splittable positions (at
    most `limits[unit]` long each) and a stride of every piece that cannot be split."""
    spans = [[file, 0, source.extent, 0] for file, source in enumerate(sources)
             if source.contiguous and source.extent > 0]
    shares = _cut_spans(spans, sources, readers, limits)
    for file, start, end in unsplit_pieces(sources):
        for reader in range(readers):
            shares[reader].append(RangeState.fresh(file, start, end, 0, readers, reader))
    return shares


def _cut_spans(spans: list[list[int]], sources: Sequence[Source], readers: int, limits: dict[str, int]
               ) -> list[list[RangeState]]:
    """[file, start, end, pass] spans (sorted) laid end to end, those of one unit and pass at a time,
    and cut into `readers` equal shares of fresh ranges."""
    shares: list[list[RangeState]] = [[] for _ in range(readers)]
    # each pass's part cut equally on its own: every reader has as much left of the pass as the others
    for unit, pass_ in sorted({(sources[span[0]].position_unit, span[3]) for span in spans}):
        mine = [span for span in spans if sources[span[0]].position_unit == unit and span[3] == pass_]
        total = sum(end - start for _, start, end, _ in mine)
        if total == 0:
            continue
        bounds = [total * reader // readers for reader in range(readers + 1)]
        laid = 0
        for file, start, end, _ in mine:
            for reader in range(readers):
                low, high = max(start, start + bounds[reader] - laid), min(end, start + bounds[reader + 1] - laid)
                for piece in range(low, high, limits[unit]):
                    shares[reader].append(RangeState.fresh(file, piece, min(high, piece + limits[unit]), pass_))
            laid += end - start
    return shares


def reshare(saved: Sequence[RangeState], sources: Sequence[Source], readers: int, limits: dict[str, int]
            ) -> list[list[RangeState]]:
    """Each new reader's ranges of one stream from every range of a checkpoint (another number of
    readers): nothing of a pass repeats or goes missing, and every reader holds an equal share."""
    spans: list[list[int]] = []
    strided: dict[tuple[int, int, int], list[RangeState]] = {}
    for state in saved:
        if state.strided or not sources[state.file].contiguous:
            strided.setdefault((state.file, state.start, state.end), []).append(state)
            continue
        file, start, end, pass_, cursor = state.file, state.start, state.end, state.pass_, state.cursor
        if state.spent:
            continue  # a leftover already read
        later = pass_ + 1 if state.once < 0 else None  # a leftover has no next pass
        if cursor < 0 or cursor <= start:
            spans.append([file, start, end, pass_])
            continue
        cursor = min(cursor, end)
        if later is not None:
            spans.append([file, start, cursor, later])
        if cursor < end:
            spans.append([file, cursor, end, pass_])
    shares = _cut_spans(_coalesce(spans), sources, readers, limits)
    for (file, start, end), states in strided.items():
        for reader, ranges in enumerate(_restride(states, readers)):
            shares[reader] += [RangeState(file, start, end, *rest) for rest in ranges]
    return shares


def _coalesce(spans: list[list[int]]) -> list[list[int]]:
    """Adjacent spans of one file at one pass as one (resumes would otherwise fragment them)."""
    merged: list[list[int]] = []
    for span in sorted(spans, key=lambda s: (s[0], s[1])):
        if merged and merged[-1][0] == span[0] and merged[-1][2] == span[1] and merged[-1][3] == span[3]:
            merged[-1][2] = span[2]
        else:
            merged.append(list(span))
    return merged


def _restride(states: list[RangeState], readers: int) -> list[list[list[int]]]:
    """The stride ranges of one piece (one per old reader, or leftovers) for `readers` new readers:
    [pass, cursor, step, offset, skip, once] of each new reader's ranges."""
    clean = [s for s in states if s.once < 0]
    furthest = max((s.pass_ for s in clean), default=max(s.once for s in states))
    ranges: list[list[list[int]]] = [[] for _ in range(readers)]

    def share_out(pass_: int, cursor: int, step: int, offset: int, skip: int) -> None:
        """What one stride has left of one pass, strided `readers` times finer, as leftovers."""
        for reader in range(readers):
            ranges[reader].append([pass_, cursor, step * readers, offset + reader * step,
                                   skip + reader * step, pass_])

    for state in states:
        pass_, cursor, step, offset, skip, once = state.pass_, state.cursor, state.step, state.offset, state.skip, state.once
        if once >= 0 and pass_ > once:
            continue
        share_out(pass_, cursor, step, offset, skip)
        if once < 0:  # behind the furthest: its whole stride for the passes in between
            for later in range(pass_ + 1, furthest + 1):
                share_out(later, -1, step, offset, offset)
    # every pass after the furthest: a clean stride per reader
    for reader in range(readers):
        ranges[reader].append([furthest + 1, -1, readers, reader, reader, -1])
    return ranges
