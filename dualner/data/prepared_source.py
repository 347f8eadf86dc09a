"""A prepared corpus (dualner.data.prepared) as a stage-2 source: its positions are those of a pass's
order of its sentences (each block of sentence ids permuted anew per pass), cut anywhere like byte
ranges; its sentences come tokenized, as stored windows."""

from __future__ import annotations

from typing import Callable, Iterator

from dualner.data.prepared import PreparedCorpus
from dualner.data.source import Source


class PreparedSource(Source):
    kind = "prepared"
    position_unit = "sentences"

    def __init__(self, corpus: PreparedCorpus):
        self.corpus, self.path = corpus, corpus.path

    @classmethod
    def open(cls, path: str, key: str) -> PreparedSource:
        return cls(PreparedCorpus.open(path, key))

    def identity(self) -> list:
        return self.corpus.identity()

    @property
    def contiguous(self) -> bool:
        return True

    @property
    def extent(self) -> int:
        return self.corpus.sentences

    def records(self, start: int, end: int, pass_: int, cursor: int, seed_key: int
                ) -> Iterator[tuple[int, int, list[dict]]]:
        return self.corpus.read(start, end, pass_, cursor, seed_key)

    def unit(self, windows: list[dict], language: str, kind: str, pass_: int, labeled: bool) -> list:
        for window in windows:
            window["kind"], window["pass"] = kind, pass_
            window["language"] = window["language"] or language
        return [windows]

    def pairing_id(self, unit: list) -> str:
        return unit[0][0]["src_id"] if unit[0] else ""

    def count(self, key: str) -> tuple[int, bool]:
        return self.corpus.sentences, True

    def check_for_model(self, fingerprint: Callable[[], str], max_length: int, embeddings: int | None,
                        language: str, key: str, log) -> None:
        self.corpus.check_tokenizer(fingerprint(), max_length, key)
        self.corpus.check_use(language, embeddings, key, log)

    def translation_records(self, sample: int, key: str) -> Iterator[dict]:
        corpus = self.corpus
        return ({"src_id": corpus.windows_of(i)[0]["src_id"], "sample_id": f"{corpus.path}#{i}"}
                for i in range(min(sample, corpus.sentences)))
