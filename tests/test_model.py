import pytest
import torch

from dualner.labels import IGNORE_INDEX
from dualner.losses import token_cross_entropy
from dualner.model import DualNERModel
from tests.conftest import stage1_losses


@pytest.fixture(scope="module")
def model(tiny_encoder):
    torch.manual_seed(0)
    return DualNERModel.from_pretrained_encoder(tiny_encoder, num_entity_types=3)


def test_head_shapes(model):
    ids = torch.randint(5, 100, (2, 9))
    outputs = model(ids, torch.ones_like(ids))
    assert outputs.seq_logits.shape == (2, 9, 7)
    assert outputs.start_logits.shape == (2, 9, 4) and outputs.end_logits.shape == (2, 9, 4)
    assert outputs.hidden_states.shape == (2, 9, model.encoder.config.hidden_size)


def test_cross_entropy_ignores_unlabeled_positions():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 5.0], [9.0, -9.0]]])
    labels = torch.tensor([[0, IGNORE_INDEX, 1]])
    expected = torch.nn.functional.cross_entropy(logits[0, [0, 2]], torch.tensor([0, 1]))
    assert torch.allclose(token_cross_entropy(logits, labels), expected)
    assert token_cross_entropy(logits, torch.full((1, 3), IGNORE_INDEX)).item() == 0.0


@pytest.mark.parametrize("variant, terms", [("mlt", {"seq", "start", "end"}), ("cla", {"seq"}),
                                            ("span", {"start", "end"})])
def test_variants_train_their_heads_only(model, variant, terms):
    ids = torch.randint(5, 100, (2, 6))
    labels = torch.randint(0, 4, (2, 6))
    batch = {"seq_labels": labels, "start_labels": labels, "end_labels": labels}
    model.zero_grad()
    losses = stage1_losses(model(ids, torch.ones_like(ids)), batch, variant)
    assert set(losses) == terms | {"total"}
    assert torch.allclose(losses["total"], sum(losses[t] for t in terms))
    losses["total"].backward()
    for name in ("seq", "start", "end"):
        grad = getattr(model, f"{name}_head").weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (name in terms)


def test_freeze_word_embeddings(model):
    model.freeze_word_embeddings()
    assert not model.encoder.get_input_embeddings().weight.requires_grad
    assert model.seq_head.weight.requires_grad
    model.encoder.get_input_embeddings().weight.requires_grad_(True)
