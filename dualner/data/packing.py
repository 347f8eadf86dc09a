"""Micro batches as model tensors: windows packed into rows of a fixed length, or padded one per row.

Packed (the default on accelerators where the encoder family supports it, `packs_by_default`):
several windows share a row of `row_length` tokens, each window a *segment*; attention is
block-diagonal (no token sees another segment, see dualner.attention) and positions restart at
every segment, so every window gets exactly the hidden states it would get alone. Padding (at the end of a row) forms a segment of its
own and is never labeled. Unpacked: one window per row, padded to the longest (`attention_mask`).

Both layouts carry the same word-level bookkeeping, so losses, pseudo labels, the MSE term and
evaluation have one code path:
- `segment_ids` (rows, length): the window's index in the micro batch (segment order), -1 on padding;
- `word_index` (rows, length): the word's index within its window at its first subword, else -1;
- `meta`: per-window host values (sentence id, word offset, language, ...) in segment order.
Every tensor a step needs is built here, on the host, in the loader (worker) process, so it reaches
the device in one pinned, asynchronous copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from dualner.labels import IGNORE_INDEX

LABEL_COLUMNS = (("seq_labels", "tag_ids"), ("start_labels", "start_ids"), ("end_labels", "end_ids"))


def packs_by_default(device: torch.device) -> bool:
    """What `data.packing=auto` means: packed rows on accelerators, length-bucketed padded batches on
    CPU. Measured (bench/RESULTS.md): on an H200 a plain PyTorch loop (../shared/gpu-check, not
    DualNER, and without the block-diagonal mask) ran packed rows 3.7x faster per batch-128 step than
    length-pooled padded batches; on a 2-core CPU packing made DualNER with multilingual-e5-small
    about 20% slower, because CPU attention has no variable-length kernel: a packed 128-token row
    pays attention over all its token pairs, masked or not, while a bucket of short sentences pays
    for their own lengths (and bucketing already leaves only 11% padding)."""
    return device.type != "cpu"


class FirstFitRows:
    """Rows of `capacity` tokens filled by first fit: `place(length)` puts a window into the lowest
    numbered row with room, in O(log rows) (a tree of the rows' largest room), or answers None when
    no row has room. The one packer: the cutters (`cut_micro_batches`) and the collator
    (`pack_rows`) both place windows with it."""

    def __init__(self, capacity: int, rows: int):
        self.capacity, self.rows = capacity, rows
        self._leaves = 1 << max(0, rows - 1).bit_length()
        self._room = [-1] * (2 * self._leaves)  # a node: the largest room below it; -1: no row there
        self._room[self._leaves:self._leaves + rows] = [capacity] * rows
        for node in range(self._leaves - 1, 0, -1):
            self._room[node] = max(self._room[2 * node], self._room[2 * node + 1])
        self.used = 0  # rows holding a window so far (first fit fills them from row 0)

    def place(self, length: int) -> int | None:
        room = self._room
        if room[1] < length:
            return None
        node = 1
        while node < self._leaves:
            node = 2 * node if room[2 * node] >= length else 2 * node + 1
        row = node - self._leaves
        self._add(row, -length)
        self.used = max(self.used, row + 1)
        return row

    def release(self, row: int, length: int) -> None:
        """Take back a window placed last in `row` (a unit that did not fit whole)."""
        self._add(row, length)

    def _add(self, row: int, tokens: int) -> None:
        room = self._room
        node = row + self._leaves
        room[node] += tokens
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2


def _check_fits(length: int, capacity: int) -> None:
    if length > capacity:
        raise ValueError(f"a window of {length} tokens does not fit a row of {capacity}")


def first_fit(lengths: Sequence[int], capacity: int, rows: int | None = None,
              order: Sequence[int] | None = None) -> list[list[int]] | None:
    """Window indices per row, the windows taken in `order` (default: as given), each into the first
    row with room: at most `rows` rows (None when they do not hold every window), or as many as
    needed. O(n log n)."""
    packer = FirstFitRows(capacity, len(lengths) if rows is None else rows)
    bins: list[list[int]] = [[] for _ in range(packer.rows)]
    for index in range(len(lengths)) if order is None else order:
        _check_fits(lengths[index], capacity)
        row = packer.place(lengths[index])
        if row is None:
            return None
        bins[row].append(index)
    return bins if rows is not None else bins[:packer.used]


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins (rows) of window indices, each holding at most `capacity` tokens; longest first, each into
    the first row with room. Deterministic; a row lists its windows in decreasing length."""
    return first_fit(lengths, capacity, order=sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)))


def pack_rows(lengths: Sequence[int], row_length: int, rows: int | None = None) -> tuple[list[list[int]], int]:
    """(window indices per row, row width) of one packed micro batch.

    With `rows` fixed (token budgets) it is exactly rows x row_length, packed by first fit in the
    given order: the placement `cut_micro_batches` made when it cut the micro batch, so every micro
    batch it cuts packs. Else it has as few rows as first fit decreasing needs at `row_length`, and
    the narrowest width (a multiple of 8) at which that many rows still hold every window, so the
    last row's emptiness is shared out instead of computed."""
    if rows is not None:
        bins = first_fit(lengths, row_length, rows)
        if bins is None:
            raise ValueError(f"{len(lengths)} windows ({sum(lengths)} tokens) need "
                             f"{len(first_fit(lengths, row_length))} rows of {row_length}; the micro batch has {rows}")
        return bins, row_length
    bins = first_fit_decreasing(lengths, row_length)
    needed = len(bins)
    width = -(-max(max(lengths), -(-sum(lengths) // needed)) // 8) * 8
    while width < row_length:
        narrower = first_fit_decreasing(lengths, width)
        if len(narrower) <= needed:
            return narrower, width
        width += 8
    return bins, row_length


def cut_micro_batches(units: Sequence[Sequence[int]], lengths: Sequence[int], micro_batch_size: int,
                      rows: int | None = None, row_length: int = 0) -> list[list[int]]:
    """Micro batches of whole units (lists of window indices; a unit's windows are never split), in
    one pass in the given order, O(n log rows): up to `micro_batch_size` windows each, or, with
    `rows`, what first fit (`FirstFitRows`) places in `rows` rows of `row_length` tokens; when a
    unit does not fit whole, the micro batch is closed and the unit opens the next. `pack_rows` packs
    each micro batch by the same first fit over its windows in this order, so it finds exactly these
    rows. A unit too large for the shape alone gets a micro batch of its own (which the collator
    refuses); a window longer than a row is refused here."""
    batches: list[list[int]] = []
    current: list[int] = []
    if rows is None:
        for unit in units:
            if current and len(current) + len(unit) > micro_batch_size:
                batches.append(current)
                current = []
            current.extend(unit)
        return batches + [current] if current else batches

    def place(packer: FirstFitRows, unit: Sequence[int]) -> bool:
        placed = []
        for window in unit:
            row = packer.place(lengths[window])
            if row is None:
                for row, window in reversed(placed):
                    packer.release(row, lengths[window])
                return False
            placed.append((row, window))
        return True

    packer, full = FirstFitRows(row_length, rows), False
    for unit in units:
        for window in unit:
            _check_fits(lengths[window], row_length)
        if full or not place(packer, unit):
            if current:
                batches.append(current)
                current = []
            packer = FirstFitRows(row_length, rows)
            full = not place(packer, unit)  # too large for the shape: alone
        current.extend(unit)
    return batches + [current] if current else batches


@dataclass
class Collator:
    """Windows (encoded rows, see dualner.data.encoding) -> one micro batch.

    packed: pack into rows of at most `row_length` tokens (`pack_rows`); `rows` fixes their number
    (token budgets: a fixed rows x row_length shape). `position_offset` is the encoder family's
    first position id (dualner.attention). `meta_columns` are copied per window into `meta`;
    `languages`, when given, adds `segment_language` (an index per window) for per-language device
    statistics; `pair_translations` adds `pairs` (translation window, its source window) for the
    parallel MSE."""

    pad_id: int
    packed: bool = True
    row_length: int = 128
    position_offset: int = 0
    rows: int | None = None
    meta_columns: tuple[str, ...] = ("sentence_id", "word_offset", "num_words")
    languages: tuple[str, ...] = ()
    pair_translations: bool = False
    _language_index: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self._language_index = {language: index for index, language in enumerate(self.languages)}

    def __call__(self, windows: Sequence[dict]) -> dict:
        if not windows:
            raise ValueError("a micro batch needs at least one window")
        batch = self._packed(windows) if self.packed else self._padded(windows)
        order = batch.pop("_order")
        ordered = [windows[i] for i in order]
        batch["meta"] = {name: [window[name] for window in ordered]
                         for name in self.meta_columns if name in ordered[0]}
        batch["num_segments"] = len(ordered)
        batch["real_tokens"] = int(sum(len(window["input_ids"]) for window in ordered))
        if self.languages:
            batch["segment_language"] = torch.tensor([self._language_index[w["language"]] for w in ordered])
        if self.pair_translations:
            batch["pairs"] = _translation_pairs(ordered)
        return batch

    # -- layouts -----------------------------------------------------------------------------------
    def _packed(self, windows: Sequence[dict]) -> dict:
        lengths = [len(window["input_ids"]) for window in windows]
        bins, width = pack_rows(lengths, self.row_length, self.rows)
        shape = (len(bins), width)
        arrays = self._empty(shape, labeled=any(len(w["tag_ids"]) > 0 for w in windows))
        arrays["position_ids"] = np.full(shape, max(0, self.position_offset - 1), dtype=np.int64)
        cu_seqlens, order = [0], []
        for row, members in enumerate(bins):
            column = 0
            for index in members:
                window, length = windows[index], lengths[index]
                span = slice(column, column + length)
                arrays["position_ids"][row, span] = np.arange(length) + self.position_offset
                self._place(arrays, window, row, span, len(order))
                order.append(index)
                column += length
                cu_seqlens.append(row * width + column)
            if column < width:  # the row's padding (a whole empty row too) attends to itself only
                cu_seqlens.append((row + 1) * width)
        boundaries = np.asarray(cu_seqlens)
        batch = _tensors(arrays)
        batch["cu_seqlens"] = torch.from_numpy(boundaries.astype(np.int32))
        batch["max_seqlen"] = int(np.diff(boundaries).max())
        batch["_order"] = order
        return batch

    def _padded(self, windows: Sequence[dict]) -> dict:
        width = max(len(window["input_ids"]) for window in windows)
        shape = (len(windows), width)
        arrays = self._empty(shape, labeled=any(len(w["tag_ids"]) > 0 for w in windows))
        arrays["attention_mask"] = np.zeros(shape, dtype=np.int64)
        for row, window in enumerate(windows):
            span = slice(0, len(window["input_ids"]))
            arrays["attention_mask"][row, span] = 1
            self._place(arrays, window, row, span, row)
        batch = _tensors(arrays)
        batch["_order"] = list(range(len(windows)))
        return batch

    def _empty(self, shape: tuple[int, int], labeled: bool) -> dict[str, np.ndarray]:
        arrays = {"input_ids": np.full(shape, self.pad_id, dtype=np.int64),
                  "segment_ids": np.full(shape, -1, dtype=np.int64),
                  "word_index": np.full(shape, -1, dtype=np.int64)}
        if labeled:
            arrays.update({name: np.full(shape, IGNORE_INDEX, dtype=np.int64) for name, _ in LABEL_COLUMNS})
        return arrays

    @staticmethod
    def _place(arrays: dict[str, np.ndarray], window: dict, row: int, span: slice, segment: int) -> None:
        arrays["input_ids"][row, span] = window["input_ids"]
        arrays["segment_ids"][row, span] = segment
        positions = np.asarray(window["word_index"], dtype=np.int64)
        arrays["word_index"][row, span] = positions
        if "seq_labels" in arrays and len(window["tag_ids"]) > 0:
            first_subwords = np.nonzero(positions >= 0)[0]
            words = positions[first_subwords]
            columns = first_subwords + span.start
            for name, column in LABEL_COLUMNS:
                arrays[name][row, columns] = np.asarray(window[column], dtype=np.int64)[words]


def _tensors(arrays: dict[str, np.ndarray]) -> dict:
    return {name: torch.from_numpy(value) for name, value in arrays.items()}


def _translation_pairs(windows: Sequence[dict]) -> torch.Tensor:
    """(translation segment, source segment) for every translation whose source sentence (same
    src_id) is in the micro batch."""
    sources = {window["src_id"]: segment for segment, window in enumerate(windows)
               if window.get("kind") == "source" and window.get("src_id")}
    pairs = [(segment, sources[window["src_id"]]) for segment, window in enumerate(windows)
             if window.get("kind") == "translation" and window.get("src_id") in sources]
    return torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "segment_ids", "cu_seqlens", "max_seqlen")


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of DualNERModel.forward for a micro batch of either layout."""
    if "attention_mask" in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return {name: batch[name] for name in MODEL_INPUTS if name in batch and name != "attention_mask"}
