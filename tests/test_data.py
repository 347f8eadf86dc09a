import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualner.data.batching import BatchPlan, bucketed_micro_batches
from dualner.data.conll import DataFormatError, Sentence, read_conll
from dualner.data.encoding import WindowTokenizer, split_into_windows
from dualner.labels import IGNORE_INDEX
from dualner.data.packing import Collator
from dualner.labels import LabelSet

LABELS = LabelSet(("LOC", "ORG", "PER"))


def write(tmp_path, text, name="data.tsv", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_reader_strips_language_prefix_and_splits_sentences(tmp_path):
    path = write(tmp_path, "en:Paris\tB-LOC\nen:is\tO\n\nen:Bob\tB-PER\n")
    sentences = read_conll(path, "en")
    assert [s.words for s in sentences] == [["Paris", "is"], ["Bob"]]
    assert sentences[1].tags == ["B-PER"] and sentences[1].source.endswith("data.tsv:4")


@pytest.mark.parametrize("text, message", [
    ("Paris\n", "data.tsv:1: expected `token<TAB>label`, found 1"),
    ("a\tO\nParis\tB-LOC\textra\n", "data.tsv:2: expected `token<TAB>label`, found 3"),
    ("a\tO\nb\tB-FOO-\n\nc\tX-LOC\n", "data.tsv:4: unknown tag 'X-LOC'"),
    ("", "file is empty"),
])
def test_reader_names_file_and_line(tmp_path, text, message):
    with pytest.raises(DataFormatError, match=message.replace("`", ".").replace("(", r"\(")):
        read_conll(write(tmp_path, text))


def test_reader_refuses_non_utf8(tmp_path):
    with pytest.raises(DataFormatError, match="not UTF-8"):
        read_conll(write(tmp_path, "Zürich\tB-LOC\n", encoding="latin-1"))


def test_reader_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        read_conll(tmp_path / "missing.tsv")


def test_windows_never_split_words():
    pieces = [[1, 2], [3], [4, 5, 6], [7]]
    assert split_into_windows(pieces, 3) == [(0, 2), (2, 3), (3, 4)]
    assert split_into_windows([[1] * 10], 4) == [(0, 1)]  # one long word: its own (truncated) window
    assert split_into_windows([], 4) == []


def test_alignment_labels_first_subword_only(tiny_tokenizer):
    encoder = WindowTokenizer(tiny_tokenizer, LABELS, max_length=64)
    sentence = Sentence(["Zuccalmaglio", "lived", "in", "Paris"], ["B-PER", "O", "O", "B-LOC"], "en")
    rows = encoder.encode([sentence]).to_list()
    assert len(rows) == 1
    row = rows[0]
    first_subwords = [w for w in row["word_index"] if w >= 0]
    assert first_subwords == [0, 1, 2, 3]
    assert row["word_index"][0] == -1 and row["word_index"][-1] == -1  # special tokens
    for packed in (True, False):
        batch = Collator(tiny_tokenizer.pad_token_id, packed=packed, row_length=64)(rows)
        labeled = batch["seq_labels"][0][batch["seq_labels"][0] != IGNORE_INDEX].tolist()
        assert labeled == [LABELS.tag_id(t) for t in sentence.tags]
        assert batch["start_labels"][0][batch["word_index"][0] == 3].item() == LABELS.span_class("LOC")


def test_long_sentence_is_windowed_without_losing_words(tiny_tokenizer):
    words = [f"word{i}" for i in range(10_000)]
    encoder = WindowTokenizer(tiny_tokenizer, LABELS, max_length=32)
    rows = encoder.encode([Sentence(words, ["O"] * len(words), "en")]).to_list()
    assert len(rows) > 1 and all(len(r["input_ids"]) <= 32 for r in rows)
    covered = [r["word_offset"] + w for r in rows for w in r["word_index"] if w >= 0]
    assert covered == list(range(len(words)))


def test_word_with_no_subword_keeps_a_position(tiny_tokenizer):
    encoder = WindowTokenizer(tiny_tokenizer, LABELS, max_length=32)
    rows = encoder.encode([Sentence(["a", "\u200b", "b"], ["O", "O", "O"], "en")]).to_list()
    assert [w for w in rows[0]["word_index"] if w >= 0] == [0, 1, 2]


def test_bucketing_reduces_padding_and_is_deterministic():
    import random
    lengths = [random.Random(i).randint(5, 120) for i in range(2000)]
    batches = bucketed_micro_batches(lengths, 16, seed=1, epoch=0, pool_batches=50)
    assert batches == bucketed_micro_batches(lengths, 16, seed=1, epoch=0, pool_batches=50)
    assert sorted(i for b in batches for i in b) == list(range(2000))

    def padded(batch_list):
        return sum(max(lengths[i] for i in b) * len(b) for b in batch_list)
    unbucketed = bucketed_micro_batches(lengths, 16, seed=1, epoch=0, pool_batches=0)
    assert padded(batches) < 0.7 * padded(unbucketed)


def test_plan_shards_steps_disjointly_across_ranks():
    plan = BatchPlan(list(range(100)), micro_batch_size=4, accumulation_steps=2, world_size=3, seed=0)
    assert plan.steps_per_epoch() == 25 // 6
    for step in range(plan.steps_per_epoch()):
        parts = [plan.rank_step(0, step, rank) for rank in range(3)]
        assert all(len(p) == 2 for p in parts)
        seen = [i for p in parts for b in p for i in b]
        assert len(seen) == len(set(seen))


def test_bare_boundary_piece_is_not_the_labeled_one():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "▁": 4, "北": 5, "京": 6, "▁Paris": 7}
    backend = Tokenizer(models.Unigram([(token, -1.0) for token in vocab], unk_id=3))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, cls_token="<s>", sep_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    row = WindowTokenizer(tokenizer, LABELS, 16).encode(
        [Sentence(["北", "京", "Paris"], ["B-LOC", "I-LOC", "B-LOC"], "zh")]).to_list()[0]
    assert row["input_ids"] == [0, 4, 5, 4, 6, 7, 2]
    assert row["word_index"] == [-1, -1, 0, -1, 1, 2, -1]


def _bare_boundary_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "▁": 4, "北": 5, "京": 6, "▁Paris": 7, "▁a": 8, "b": 9}
    backend = Tokenizer(models.Unigram([(token, -1.0) for token in vocab], unk_id=3))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, cls_token="<s>", sep_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sentences=st.lists(st.lists(st.sampled_from(["北", "京", "Paris", "ab", "abbbbbbbbbbbb", "bab", "\u200b", "x",
                                                    "Ünïcødé", "New", "York-based", "e5"]), max_size=30),
                          min_size=1, max_size=12),
       max_length=st.integers(3, 40), bare=st.booleans())
def test_the_whole_batch_path_makes_the_windows_of_the_word_by_word_path(tiny_tokenizer, sentences, max_length, bare):
    """encode_batch computes the one-window sentences for the whole batch at once; every sentence's
    windows are those of the general path (`_windows`: word by word), long, CJK and empty words too."""
    tokenizer = _bare_boundary_tokenizer() if bare else tiny_tokenizer
    encoder = WindowTokenizer(tokenizer, LABELS, max_length)
    rows = encoder.encode_batch({"words": sentences, "tags": [[] for _ in sentences], "row": list(range(len(sentences)))})
    for row, words in enumerate(sentences):
        encoded = tokenizer([words], is_split_into_words=True, add_special_tokens=False, verbose=False)
        expected = [(first, ids, index) for first, _, ids, index in
                    encoder._windows(encoded["input_ids"][0], encoded.word_ids(0), len(words), max_length - 2)]
        made = [(rows["word_offset"][i], rows["input_ids"][i], rows["word_index"][i])
                for i, of in enumerate(rows["row"]) if of == row]
        assert made == expected, words
