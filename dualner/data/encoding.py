"""Sentences -> model inputs: subword tokenization, first-subword alignment, windows, collation.

Every encoded row is one window of one sentence. `word_index[p]` is the index (within the window) of
the word whose *first* subword sits at position p, or -1 (special tokens, continuation subwords); the
window's words are the sentence's words from `word_offset` on. All word-level labels and predictions
go through it, so stage 2 can place pseudo labels the same way.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import datasets
import numpy as np

from dualner.data.conll import Sentence
from dualner.labels import LabelSet, extract_span


def sentences_to_dataset(sentences: Sequence[Sentence]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "sentence_id": list(range(len(sentences))),
        "language": [s.language for s in sentences],
        "words": [s.words for s in sentences],
        "tags": [s.tags or [] for s in sentences],
    })


def split_into_windows(pieces_per_word: Sequence[Sequence[int]], budget: int) -> list[tuple[int, int]]:
    """Greedy word-aligned windows of at most `budget` subwords: [(first_word, end_word), ...].

    Windows never split a word; a single word longer than the budget gets a window of its own and is
    truncated (its first subword, which carries its label, is kept)."""
    windows, first, used = [], 0, 0
    for index, pieces in enumerate(pieces_per_word):
        size = min(len(pieces), budget)
        if used + size > budget and index > first:
            windows.append((first, index))
            first, used = index, 0
        used += size
    if pieces_per_word:
        windows.append((first, len(pieces_per_word)))
    return windows


class WindowTokenizer:
    """Tokenizes sentences into windows; labels (when present) become word-level id lists."""

    def __init__(self, tokenizer, label_set: LabelSet, max_length: int):
        if max_length < 3:
            raise ValueError(f"data.max_length must leave room for a word between two special "
                             f"tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.label_set = label_set
        self.max_length = max_length
        self.cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        self.sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        self.unk_id = tokenizer.unk_token_id
        # SentencePiece writes a pre-split CJK character as a bare word-boundary piece "▁" followed by
        # the character. The bare piece is the same for every such word, so the label goes on the
        # first piece with content instead (else zh/ja predictions see only "▁").
        self.bare_boundary_ids = {token_id for token, token_id in tokenizer.get_vocab().items()
                                  if token in ("▁", "Ġ")}
        self._bare_ids = np.array(sorted(self.bare_boundary_ids), dtype=np.int64)

    def encode_batch(self, batch: dict) -> dict:
        encoded = self.tokenizer(batch["words"], is_split_into_words=True, add_special_tokens=False,
                                 verbose=False)  # long sentences are windowed below
        # Every other column (sentence id, language, ...) is carried over to each window of its row.
        passthrough = [name for name in batch if name not in ("words", "tags")]
        rows: dict[str, list] = {name: [] for name in (
            "input_ids", "word_index", "word_offset", "num_words", "tag_ids", "start_ids", "end_ids",
            *passthrough)}
        budget = self.max_length - 2
        single = self._single_windows(encoded, batch["words"], budget)
        for row, words in enumerate(batch["words"]):
            tags = batch["tags"][row]
            if tags:
                tag_ids = [self.label_set.tag_id(tag) for tag in tags]
                start_ids, end_ids = extract_span(tags, self.label_set)
            else:
                tag_ids, start_ids, end_ids = [], [], []
            if single[row] is not None:  # the whole sentence in one window (most sentences)
                windows = [(0, len(words), [self.cls_id, *encoded["input_ids"][row], self.sep_id], single[row])]
            else:
                windows = self._windows(encoded["input_ids"][row], encoded.word_ids(row), len(words), budget)
            for first, end, input_ids, word_index in windows:
                rows["input_ids"].append(input_ids)
                rows["word_index"].append(word_index)
                for name in passthrough:
                    rows[name].append(batch[name][row])
                rows["word_offset"].append(first)
                rows["num_words"].append(len(words))
                rows["tag_ids"].append(tag_ids[first:end])
                rows["start_ids"].append(start_ids[first:end])
                rows["end_ids"].append(end_ids[first:end])
        return rows

    def _single_windows(self, encoded, sentences: Sequence[Sequence[str]], budget: int) -> list[list[int] | None]:
        """Each row's word_index where the sentence fits one window and every word has a subword,
        computed for the whole batch at once (numpy, no loop over subwords); None for the others
        (`_windows` cuts them). The same rule as `_windows`: a word's label on its first subword, or on
        its second where the first is a bare word boundary."""
        ids_rows = encoded["input_ids"]
        lengths = np.fromiter(map(len, ids_rows), dtype=np.int64, count=len(ids_rows))
        total = int(lengths.sum())
        word_rows = [encoded.word_ids(row) for row in range(len(ids_rows))]
        ids = np.fromiter(itertools.chain.from_iterable(ids_rows), dtype=np.int64, count=total)
        try:
            words = np.fromiter(itertools.chain.from_iterable(word_rows), dtype=np.int64, count=total)
        except TypeError:  # a subword of no word (None): every row the general way
            return [None] * len(ids_rows)
        row_starts = np.cumsum(lengths) - lengths
        first_piece = np.ones(total, dtype=bool)
        first_piece[1:] = words[1:] != words[:-1]
        first_piece[row_starts[lengths > 0]] = True
        more_pieces = np.zeros(total, dtype=bool)  # the word goes on at the next position
        more_pieces[:-1] = ~first_piece[1:]
        bare = first_piece & more_pieces & np.isin(ids, self._bare_ids)
        labeled = first_piece & ~bare
        labeled[1:] |= bare[:-1]
        word_index = np.where(labeled, words, -1).tolist()
        row_of = np.repeat(np.arange(len(ids_rows)), lengths)
        words_with_pieces = np.bincount(row_of, weights=first_piece, minlength=len(ids_rows))
        fits = (lengths <= budget) & (lengths > 0) & (words_with_pieces == [len(s) for s in sentences])
        return [[-1, *word_index[start:start + length], -1] if fit else None
                for fit, start, length in zip(fits.tolist(), row_starts.tolist(), lengths.tolist())]

    def _windows(self, ids: Sequence[int], word_ids: Sequence[int | None], words: int, budget: int
                 ) -> list[tuple[int, int, list[int], list[int]]]:
        """(first word, end word, input_ids, word_index) of each window of one sentence."""
        pieces_per_word: list[list[int]] = [[] for _ in range(words)]
        for token_id, word in zip(ids, word_ids):
            if word is not None:
                pieces_per_word[word].append(token_id)
        # Words the tokenizer maps to nothing (e.g. zero-width characters) still get a position,
        # so no word is silently dropped from training or prediction.
        for pieces in pieces_per_word:
            if not pieces:
                pieces.append(self.unk_id)
        windows = []
        for first, end in split_into_windows(pieces_per_word, budget):
            input_ids, word_index = [self.cls_id], [-1]
            for word in range(first, end):
                pieces = pieces_per_word[word][:budget]
                skip = 1 if len(pieces) > 1 and pieces[0] in self.bare_boundary_ids else 0
                input_ids += pieces
                word_index += [-1] * skip + [word - first] + [-1] * (len(pieces) - 1 - skip)
            input_ids.append(self.sep_id)
            word_index.append(-1)
            windows.append((first, end, input_ids, word_index))
        return windows

    def encode(self, sentences: Sequence[Sentence]) -> datasets.Dataset:
        """Encode in memory (stage 1 and evaluation sets are small; stage 2 streams)."""
        dataset = sentences_to_dataset(sentences)
        return dataset.map(self.encode_batch, batched=True, remove_columns=["words", "tags"],
                           load_from_cache_file=False, keep_in_memory=True)
