from hypothesis import given
from hypothesis import strategies as st

from dualner.labels import (Entity, LabelSet, decode_spans, extract_entities, extract_span,
                            sequential)

LABELS = LabelSet(("LOC", "ORG", "PER"))
LOC, ORG, PER = 1, 2, 3  # span classes (0 = none)


def test_label_set_from_data_tags():
    label_set = LabelSet.from_tags(["O", "B-PER", "I-PER", "B-MISC"])
    assert label_set.entity_types == ("MISC", "PER")
    assert label_set.bio_tags == ["O", "B-MISC", "I-MISC", "B-PER", "I-PER"]


def test_extract_span_basic_and_one_word_entities():
    tags = ["B-PER", "I-PER", "O", "B-LOC", "O"]
    assert extract_span(tags, LABELS) == ([PER, 0, 0, LOC, 0], [0, PER, 0, LOC, 0])


def test_i_after_o_opens_a_chunk():
    assert extract_entities(["O", "I-ORG", "I-ORG", "O"]) == [Entity(1, 2, "ORG")]


def test_i_of_other_type_opens_a_chunk():
    assert extract_entities(["B-PER", "I-LOC", "I-LOC"]) == [Entity(0, 0, "PER"), Entity(1, 2, "LOC")]


def test_adjacent_same_type_entities_stay_apart():
    tags = ["B-LOC", "I-LOC", "B-LOC", "O"]
    assert extract_entities(tags) == [Entity(0, 1, "LOC"), Entity(2, 2, "LOC")]
    starts, ends = extract_span(tags, LABELS)
    assert starts == [LOC, 0, LOC, 0] and ends == [0, LOC, LOC, 0]
    assert sequential(decode_spans(starts, ends, LABELS), 4) == tags


def test_empty_sentence():
    assert extract_span([], LABELS) == ([], [])
    assert decode_spans([], [], LABELS) == []
    assert sequential([], 0) == []


def test_unmatched_start_is_dropped():
    # start PER at 0 never ends before the next start (LOC at 2)
    starts = [PER, 0, LOC, 0]
    ends = [0, 0, 0, LOC]
    assert decode_spans(starts, ends, LABELS) == [Entity(2, 3, "LOC")]


def test_end_of_other_type_does_not_close():
    starts = [ORG, 0, 0]
    ends = [0, PER, ORG]
    assert decode_spans(starts, ends, LABELS) == [Entity(0, 2, "ORG")]


def test_nearest_end_closes_and_end_at_next_start_is_excluded():
    starts = [PER, 0, PER]
    ends = [0, 0, PER]
    # the end at word 2 belongs to the start at word 2, so the first start is unmatched
    assert decode_spans(starts, ends, LABELS) == [Entity(2, 2, "PER")]
    assert decode_spans([PER, 0, 0], [0, PER, PER], LABELS) == [Entity(0, 1, "PER")]


def test_sequential():
    assert sequential([Entity(1, 3, "ORG"), Entity(4, 4, "PER")], 5) == \
        ["O", "B-ORG", "I-ORG", "I-ORG", "B-PER"]


def _valid_bio():
    """Valid BIO-2 sequences: every I-X follows B-X or I-X."""
    token = st.sampled_from(["O", "B-LOC", "B-ORG", "B-PER", "I"])

    def repair(raw):
        tags = []
        for item in raw:
            if item == "I":
                tags.append("I-" + tags[-1][2:] if tags and tags[-1] != "O" else "O")
            else:
                tags.append(item)
        return tags
    return st.lists(token, max_size=30).map(repair)


@given(_valid_bio())
def test_round_trip_of_valid_bio(tags):
    starts, ends = extract_span(tags, LABELS)
    assert sequential(decode_spans(starts, ends, LABELS), len(tags)) == tags


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=30))
def test_decoding_never_overlaps(pairs):
    starts = [s for s, _ in pairs]
    ends = [e for _, e in pairs]
    entities = decode_spans(starts, ends, LABELS)
    covered = set()
    for entity in entities:
        assert entity.first_word <= entity.last_word
        words = set(range(entity.first_word, entity.last_word + 1))
        assert not words & covered
        covered |= words
