import pytest
import torch

from dualner.data.encoding import IGNORE_INDEX
from dualner.labels import LabelSet
from dualner.losses import centroid_mse, entity_representations, parallel_mse, self_kl
from dualner.model import HeadOutputs
from dualner.teacher import build_pseudo_labels

LABELS = LabelSet(("LOC", "ORG", "PER"))  # BIO ids: O0 B-LOC1 I-LOC2 B-ORG3 I-ORG4 B-PER5 I-PER6


def one_hot_logits(classes, num_classes):
    logits = torch.full((1, len(classes), num_classes), -10.0)
    for position, cls in enumerate(classes):
        logits[0, position, cls] = 10.0
    return logits


def teacher_outputs(seq, start, end):
    return HeadOutputs(one_hot_logits(seq, 7), one_hot_logits(start, 4), one_hot_logits(end, 4),
                       torch.zeros(1, len(seq), 2))


def test_pseudo_labels_cross_the_heads():
    # positions: [CLS] w0 w1 (w1 continuation) w2 [SEP]
    word_index = torch.tensor([[-1, 0, 1, -1, 2, -1]])
    # span head says: PER over w0..w1; BIO head says: B-LOC on w2 only
    teacher = teacher_outputs(seq=[0, 0, 0, 0, 1, 0], start=[0, 3, 0, 0, 0, 0], end=[0, 0, 3, 0, 0, 0])
    pseudo = build_pseudo_labels(teacher, word_index, LABELS)
    assert pseudo.seq_labels.tolist() == [[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 0, IGNORE_INDEX]]
    assert pseudo.start_labels.tolist() == [[IGNORE_INDEX, 0, 0, IGNORE_INDEX, 1, IGNORE_INDEX]]
    assert pseudo.end_labels.tolist() == [[IGNORE_INDEX, 0, 0, IGNORE_INDEX, 1, IGNORE_INDEX]]
    assert (pseudo.words, pseudo.agreement_words, pseudo.entities_per_row) == (3, 0, [1])


def test_unmatched_teacher_start_gives_no_pseudo_entity():
    word_index = torch.tensor([[-1, 0, 1, -1]])
    teacher = teacher_outputs(seq=[0, 3, 4, 0], start=[0, 2, 0, 0], end=[0, 0, 0, 0])
    pseudo = build_pseudo_labels(teacher, word_index, LABELS)
    assert pseudo.seq_labels[0, 1:3].tolist() == [0, 0]  # ORG start never ends: dropped
    assert pseudo.start_labels[0, 1:3].tolist() == [2, 0] and pseudo.end_labels[0, 1:3].tolist() == [0, 2]
    assert pseudo.agreement_words == 0


def test_confidence_threshold_masks_unsure_words():
    word_index = torch.tensor([[0, 1]])
    teacher = teacher_outputs(seq=[5, 0], start=[3, 0], end=[3, 0])
    teacher.seq_logits[0, 1] = 0.0  # uniform: unsure BIO on word 1
    pseudo = build_pseudo_labels(teacher, word_index, LABELS, threshold=0.9)
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
    representations, present = entity_representations(outputs, labels, word_index)
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
    loss = centroid_mse(*entity_representations(outputs, labels, torch.tensor([[0, 1, 2], [0, 1, 2]])))
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def test_parallel_mse_pairs_translation_with_source():
    hidden = torch.tensor([[[1.0], [1.0]], [[3.0], [3.0]], [[9.0], [9.0]]])
    outputs = outputs_with_hidden(hidden, [0, 0, 0], [1, 1, 1])
    labels = torch.tensor([[1, 0], [1, 0], [1, 0]])
    representations, present = entity_representations(outputs, labels, torch.tensor([[0, 1]] * 3))
    assert parallel_mse(representations, present, [(0, 1)]).item() == pytest.approx(4.0)
    assert parallel_mse(representations, present, []).item() == 0.0


def test_self_kl_is_zero_for_identical_heads_and_positive_otherwise():
    student = HeadOutputs(torch.randn(1, 3, 7), torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.zeros(1))
    word_index = torch.tensor([[-1, 0, 1]])
    same = self_kl(student, student, word_index)
    assert all(abs(v.item()) < 1e-6 for v in same.values())
    other = HeadOutputs(*(t + torch.randn_like(t) for t in student[:3]), torch.zeros(1))
    assert all(v.item() > 0 for v in self_kl(student, other, word_index).values())
