"""Pseudo labels and the entity-aware MSE on the device, against the pure functions of
dualner.labels: hand-made cases, and hypothesis-generated micro batches in both layouts (several
windows per packed row, words split into subwords, padding)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dualner.labels import IGNORE_INDEX, LabelSet, decode_spans, extract_span, sequential
from dualner.losses import centroid_mse, entity_representations, parallel_mse, self_kl
from dualner.model import HeadOutputs
from dualner.teacher import WordLayout, build_pseudo_labels, decode_spans_tensor, extract_span_tensor

LABELS = LabelSet(("LOC", "ORG", "PER"))  # BIO ids: O0 B-LOC1 I-LOC2 B-ORG3 I-ORG4 B-PER5 I-PER6


def one_hot_logits(classes, num_classes):
    logits = torch.full((1, len(classes), num_classes), -10.0)
    for position, cls in enumerate(classes):
        logits[0, position, cls] = 10.0
    return logits


def one_row(word_index):
    """(word_index, segment_ids) of a single window in one row."""
    word_index = torch.tensor([word_index])
    return word_index, torch.zeros_like(word_index)


def teacher_outputs(seq, start, end):
    return HeadOutputs(one_hot_logits(seq, 7), one_hot_logits(start, 4), one_hot_logits(end, 4),
                       torch.zeros(1, len(seq), 2))


def test_pseudo_labels_cross_the_heads():
    # positions: [CLS] w0 w1 (w1 continuation) w2 [SEP]
    word_index, segments = one_row([-1, 0, 1, -1, 2, -1])
    # span head says: PER over w0..w1; BIO head says: B-LOC on w2 only
    teacher = teacher_outputs(seq=[0, 0, 0, 0, 1, 0], start=[0, 3, 0, 0, 0, 0], end=[0, 0, 3, 0, 0, 0])
    pseudo = build_pseudo_labels(teacher, word_index, segments, 1, LABELS)
    assert pseudo.seq_labels.tolist() == [[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 0, IGNORE_INDEX]]
    assert pseudo.start_labels.tolist() == [[IGNORE_INDEX, 0, 0, IGNORE_INDEX, 1, IGNORE_INDEX]]
    assert pseudo.end_labels.tolist() == [[IGNORE_INDEX, 0, 0, IGNORE_INDEX, 1, IGNORE_INDEX]]
    assert (pseudo.words.item(), pseudo.agreement_words.item(), pseudo.entities_per_segment.tolist()) == (3, 0, [1])


def test_unmatched_teacher_start_gives_no_pseudo_entity():
    word_index, segments = one_row([-1, 0, 1, -1])
    teacher = teacher_outputs(seq=[0, 3, 4, 0], start=[0, 2, 0, 0], end=[0, 0, 0, 0])
    pseudo = build_pseudo_labels(teacher, word_index, segments, 1, LABELS)
    assert pseudo.seq_labels[0, 1:3].tolist() == [0, 0]  # ORG start never ends: dropped
    assert pseudo.start_labels[0, 1:3].tolist() == [2, 0] and pseudo.end_labels[0, 1:3].tolist() == [0, 2]
    assert pseudo.agreement_words.item() == 0


def test_confidence_threshold_masks_unsure_words():
    word_index, segments = one_row([0, 1])
    teacher = teacher_outputs(seq=[5, 0], start=[3, 0], end=[3, 0])
    teacher.seq_logits[0, 1] = 0.0  # uniform: unsure BIO on word 1
    pseudo = build_pseudo_labels(teacher, word_index, segments, 1, LABELS, threshold=0.9)
    assert pseudo.seq_labels.tolist() == [[5, 0]]
    assert pseudo.start_labels.tolist() == [[3, IGNORE_INDEX]]


def outputs_with_hidden(hidden, start_word, end_word, types=3):
    rows, length, _ = hidden.shape
    start = torch.zeros(rows, length, types + 1)
    end = torch.zeros(rows, length, types + 1)
    for row in range(rows):
        start[row, start_word[row], 1:] = 10.0
        end[row, end_word[row], 1:] = 10.0
    return HeadOutputs(torch.zeros(rows, length, 7), start, end, hidden)


def test_centroid_mse_value_and_gradient():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 4.0]]], requires_grad=True)
    outputs = outputs_with_hidden(hidden, start_word=[0, 0], end_word=[1, 1])
    word_index = torch.tensor([[0, 1], [0, 1]])
    labels = torch.tensor([[3, 0], [3, 0]])  # both rows hold a PER (class 3) entity
    segments = torch.tensor([[0, 0], [1, 1]])
    representations, present = entity_representations(outputs, labels, word_index, segments, 2)
    assert present.tolist() == [[False, False, True], [False, False, True]]
    assert representations[0, 2].tolist() == [1.0, 0.0, 0.0, 2.0]
    loss = centroid_mse(representations, present)
    # reps (1,0,0,2) and (3,0,0,4): mean (2,0,0,3); squared distances per dim 1,0,0,1 for each
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    # d/dr of mean((r - mean)^2) over 2 reps x 4 dims: 2 (r - mean) / 8
    assert hidden.grad[0, 0].tolist() == pytest.approx([-0.25, 0.0])
    assert hidden.grad[1, 1].tolist() == pytest.approx([0.0, 0.25])


def test_centroid_mse_needs_two_entities_of_a_type():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    outputs = outputs_with_hidden(hidden, [0, 1], [2, 2])
    labels = torch.tensor([[1, 0, 0], [2, 0, 0]])  # one LOC, one ORG: no type has two
    loss = centroid_mse(*entity_representations(outputs, labels, torch.tensor([[0, 1, 2], [0, 1, 2]]),
                                                torch.tensor([[0, 0, 0], [1, 1, 1]]), 2))
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def test_parallel_mse_pairs_translation_with_source():
    hidden = torch.tensor([[[1.0], [1.0]], [[3.0], [3.0]], [[9.0], [9.0]]])
    outputs = outputs_with_hidden(hidden, [0, 0, 0], [1, 1, 1])
    labels = torch.tensor([[1, 0], [1, 0], [1, 0]])
    representations, present = entity_representations(outputs, labels, torch.tensor([[0, 1]] * 3),
                                                       torch.tensor([[0, 0], [1, 1], [2, 2]]), 3)
    assert parallel_mse(representations, present, torch.tensor([[0, 1]])).item() == pytest.approx(4.0)
    assert parallel_mse(representations, present, torch.zeros(0, 2, dtype=torch.long)).item() == 0.0


def test_self_kl_is_zero_for_identical_heads_and_positive_otherwise():
    student = HeadOutputs(torch.randn(1, 3, 7), torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.zeros(1))
    word_index = torch.tensor([[-1, 0, 1]])
    same = self_kl(student, student, word_index)
    assert all(abs(v.item()) < 1e-6 for v in same.values())
    other = HeadOutputs(*(t + torch.randn_like(t) for t in student[:3]), torch.zeros(1))
    assert all(v.item() > 0 for v in self_kl(student, other, word_index).values())


# -- generated micro batches ---------------------------------------------------------------------
NAMES = LABELS.bio_tags


@st.composite
def micro_batches(draw):
    """Windows of random word-level classes laid out as a micro batch: each word one to three
    subwords, a special token around each window, windows packed several to a row (or one per
    row), rows padded at the end. Returns the flat tensors and the windows' word-level truth."""
    packed = draw(st.booleans())
    windows = draw(st.lists(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3), st.integers(0, 3),
                                               st.integers(1, 3)), min_size=1, max_size=9),
                            min_size=1, max_size=6))
    row_length = 40
    rows, current = [], []
    for segment, words in enumerate(windows):
        tokens = [(-1, segment, 0, 0, 0)]  # (word index, segment, bio, start, end)
        for index, (bio, start, end, pieces) in enumerate(words):
            tokens.append((index, segment, bio, start, end))
            tokens += [(-1, segment, draw(st.integers(0, 6)), draw(st.integers(0, 3)), draw(st.integers(0, 3)))
                       for _ in range(pieces - 1)]
        tokens.append((-1, segment, 0, 0, 0))
        if current and (not packed or len(current) + len(tokens) > row_length):
            rows.append(current)
            current = []
        current += tokens
    rows.append(current)
    width = max(len(row) for row in rows) if not packed else row_length
    padded = [row + [(-1, -1, draw(st.integers(0, 6)), 0, 0)] * (width - len(row)) for row in rows]
    columns = [torch.tensor([[token[i] for token in row] for row in padded]) for i in range(5)]
    return columns, windows


@settings(max_examples=300, deadline=None)
@given(micro_batches())
def test_device_conversions_equal_the_pure_functions(batch):
    (word_index, segments, bio, starts, ends), windows = batch
    layout = WordLayout.of(word_index, segments)
    span_starts, span_ends = extract_span_tensor(bio.reshape(-1), layout)
    decoded, entities = decode_spans_tensor(starts.reshape(-1), ends.reshape(-1), layout, len(windows))
    is_word, flat_segments = word_index.reshape(-1) >= 0, segments.reshape(-1)
    for segment, words in enumerate(windows):
        mask = is_word & (flat_segments == segment)
        expected_starts, expected_ends = extract_span([NAMES[w[0]] for w in words], LABELS)
        assert span_starts[mask].tolist() == expected_starts and span_ends[mask].tolist() == expected_ends
        expected_entities = decode_spans([w[1] for w in words], [w[2] for w in words], LABELS)
        assert [NAMES[i] for i in decoded[mask].tolist()] == sequential(expected_entities, len(words))
        assert entities[segment].item() == len(expected_entities)


def _legacy_pseudo_labels(teacher, word_index):
    """Today's host-side construction, one window per row (dualner/teacher.py before the packing
    change), as the reference for the device version."""
    seq_pred = teacher.seq_logits.argmax(-1)
    start_pred, end_pred = teacher.start_logits.argmax(-1), teacher.end_logits.argmax(-1)
    seq_labels = torch.full(word_index.shape, IGNORE_INDEX)
    start_labels, end_labels = seq_labels.clone(), seq_labels.clone()
    for row in range(word_index.shape[0]):
        positions = torch.nonzero(word_index[row] >= 0).reshape(-1)
        entities = decode_spans(start_pred[row, positions].tolist(), end_pred[row, positions].tolist(), LABELS)
        seq_labels[row, positions] = torch.tensor([LABELS.tag_id(t) for t in sequential(entities, len(positions))])
        starts, ends = extract_span([NAMES[i] for i in seq_pred[row, positions].tolist()], LABELS)
        start_labels[row, positions], end_labels[row, positions] = torch.tensor(starts), torch.tensor(ends)
    return seq_labels, start_labels, end_labels


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(4, 30), st.integers(0, 2**31 - 1))
def test_pseudo_labels_equal_the_host_construction_on_random_logits(rows, length, seed):
    generator = torch.Generator().manual_seed(seed)
    teacher = HeadOutputs(torch.randn(rows, length, 7, generator=generator),
                          torch.randn(rows, length, 4, generator=generator) * 3,
                          torch.randn(rows, length, 4, generator=generator) * 3, torch.zeros(rows, length, 2))
    word_index = torch.full((rows, length), -1)
    for row in range(rows):
        used = int(torch.randint(1, length + 1, (), generator=generator))
        first = torch.rand(used, generator=generator) < 0.7
        first[0] = True
        word_index[row, :used] = torch.where(first, torch.cumsum(first.long(), 0) - 1, -1)
    segments = torch.arange(rows)[:, None].expand(rows, length).clone()  # one window per row
    pseudo = build_pseudo_labels(teacher, word_index, segments, rows, LABELS)
    expected = _legacy_pseudo_labels(teacher, word_index)
    assert pseudo.seq_labels.tolist() == expected[0].tolist()
    assert pseudo.start_labels.tolist() == expected[1].tolist()
    assert pseudo.end_labels.tolist() == expected[2].tolist()


def test_entity_representations_are_per_window_in_packed_rows():
    """Two windows in one packed row give the representations they give one per row."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 3)
    start, end = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    word_index = torch.tensor([[-1, 0, 1, 2, -1], [-1, 0, -1, 1, -1]])
    labels = torch.tensor([[-100, 1, 0, 3, -100], [-100, 3, -100, 0, -100]])
    unpacked = entity_representations(HeadOutputs(torch.zeros(2, 5, 7), start, end, hidden), labels, word_index,
                                      torch.tensor([[0] * 5, [1] * 5]), 2)
    packed_outputs = HeadOutputs(torch.zeros(1, 10, 7), start.reshape(1, 10, 4), end.reshape(1, 10, 4),
                                 hidden.reshape(1, 10, 3))
    packed = entity_representations(packed_outputs, labels.reshape(1, 10), word_index.reshape(1, 10),
                                    torch.tensor([[0] * 5 + [1] * 5]), 2)
    assert torch.equal(unpacked[0], packed[0]) and torch.equal(unpacked[1], packed[1])
    assert unpacked[1].tolist() == [[True, False, True], [False, False, True]]
