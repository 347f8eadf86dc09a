"""Hardening, round 4 (issue 25), the data side: real PAN-X files read whole, every damaged,
truncated or misnamed corpus one clear line (no traceback, nothing accepted silently), `prepare`
leaving no half-made folder. Each test is a row of the README's fault table.

In-process where the behaviour is the library's (fast), through `python -m dualner` where the
user-visible line matters."""

import re

import pytest

from dualner.data.conll import iter_conll, read_conll
from dualner.data.corpus import describe_file
from dualner.data.streaming import iter_sentences
from tests.conftest import REPO

PANX = REPO.parent / "shared" / "data" / "panx"  # the real WikiANN files, where the checkout has them
INVISIBLE_WORDS = ["\ufeff", "\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u200f\u200f"]


# -- item 5: real PAN-X files, invisible tokens --------------------------------------------------------
def plain_count(data: bytes) -> tuple[int, int]:
    """(sentences, words) of a CoNLL file counted without the reader: blocks of non-blank lines."""
    words = len(re.findall(rb"^[ \t\r\f\v]*\S", data, re.M))
    sentences = len(re.findall(rb"(?:\A|\n[ \t\r\f\v]*\n)[ \t\r\f\v]*\S", data))
    return sentences, words


@pytest.mark.skipif(not PANX.is_dir(), reason="the real PAN-X files are not in this checkout (../shared/data)")
def test_every_real_panx_file_reads_whole():
    files = sorted(PANX.glob("*/*.tsv"))
    assert len(files) >= 3 * 20
    for path in files:
        sentences = list(iter_conll(path, path.parent.name))
        expected = plain_count(path.read_bytes())
        assert (len(sentences), sum(len(s.words) for s in sentences)) == expected, path


def test_a_byte_order_mark_is_taken_off_only_at_the_file_start(tmp_path):
    path = tmp_path / "he.tsv"
    path.write_text("\ufeffParis\tB-LOC\n\ufeff\tO\nis\tO\n\n\u200f\u200f\tO\nBob\tB-PER\n", encoding="utf-8")
    sentences = read_conll(path, "he")
    assert [s.words for s in sentences] == [["Paris", "\ufeff", "is"], ["\u200f\u200f", "Bob"]]
    assert [s.tags for s in sentences] == [["B-LOC", "O", "O"], ["O", "B-PER"]]
    # the stage-2 reader of the same file as a corpus keeps them too
    corpus = describe_file(path, "stage2.target.he")
    assert [s["words"] for s in iter_sentences(corpus, "he", labeled=True)] == [s.words for s in sentences]


def test_a_word_the_tokenizer_turns_into_nothing_gets_the_unknown_token(tiny_tokenizer):
    """XLM-R's SentencePiece gives invisible characters no piece; the tiny tokenizer, given the same
    normalizer, does the same: each such word keeps a position (the unknown token), labels aligned."""
    import copy

    from tokenizers import Regex, normalizers

    from dualner.data.conll import Sentence
    from dualner.data.encoding import WindowTokenizer
    from dualner.labels import LabelSet
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace(Regex("[\u200b-\u200f\ufeff]"), "")
    assert all(tokenizer.tokenize(word) == [] for word in INVISIBLE_WORDS)
    words = ["Paris", *INVISIBLE_WORDS, "Bob"]
    tags = ["B-LOC", *["O"] * len(INVISIBLE_WORDS), "B-PER"]
    labels = LabelSet.from_tags(tags)
    (row,) = WindowTokenizer(tokenizer, labels, 64).encode([Sentence(words, tags, "he")]).to_list()
    firsts = [p for p, w in enumerate(row["word_index"]) if w >= 0]
    assert [row["word_index"][p] for p in firsts] == list(range(len(words)))
    assert [row["input_ids"][p] for p in firsts[1:-1]] == [tokenizer.unk_token_id] * len(INVISIBLE_WORDS)
    assert row["tag_ids"] == [labels.tag_id(tag) for tag in tags]
