"""Token budgets (`train.batch_unit=tokens`) give every training micro batch the same shape, rows x
pack_length, padding rows included and masked, so torch.compile keeps one graph (and CUDA graphs
apply); that shape computes the same losses and gradients as one window per row (fp32)."""

import pytest
import torch

from dualner.config import load_config
from dualner.data.batching import BatchPlan
from dualner.data.packing import Collator, first_fit_decreasing, model_inputs
from tests.conftest import REPO, stage1_losses
from tests.test_packing import by_window, tiny_model, windows_of

SHAPED = ("input_ids", "position_ids", "segment_ids", "word_index", "seq_labels", "start_labels", "end_labels")


def test_every_token_budget_micro_batch_has_one_shape(tiny_tokenizer):
    """The launcher's own collator and plan (dualner.job.training_collator, BatchPlan) over an epoch."""
    from dualner.job import training_collator
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.batch_unit=tokens", "data.pack_length=64",
                                                       "train.micro_batch_size=512", "train.global_batch_size=1024"])
    collate = training_collator(cfg, torch.device("cpu"), tiny_tokenizer.pad_token_id, 2)
    windows, _ = windows_of(tiny_tokenizer, "en", count=300, max_length=64)
    plan = BatchPlan([len(w["input_ids"]) for w in windows], 512, 2, 1, seed=0, pool_batches=1, row_length=64)
    shapes = set()
    for indices in plan.micro_batches(0):
        batch = collate([windows[i] for i in indices])
        shapes |= {tuple(batch[name].shape) for name in SHAPED}
    assert len(plan.micro_batches(0)) > 5 and shapes == {(8, 64)}


def test_fixed_shape_with_padding_rows_equals_one_window_per_row(tiny_tokenizer):
    """Train mode without dropout: a micro batch packed into a fixed rows x 48 shape (three rows
    wholly padding) against the same windows one per row, padded: every loss term and the gradient
    of every parameter."""
    model = tiny_model("xlm-roberta").train()  # the tiny config has no dropout modules active
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.encoder.config.attention_probs_dropout_prob = 0.0
    windows, _ = windows_of(tiny_tokenizer, "en", count=24)
    rows = len(first_fit_decreasing([len(w["input_ids"]) for w in windows], 48)) + 3
    fixed = Collator(tiny_tokenizer.pad_token_id, row_length=48, position_offset=model.position_offset, rows=rows)(windows)
    unpadded = Collator(tiny_tokenizer.pad_token_id, packed=False)(windows)
    assert fixed["input_ids"].shape == (rows, 48)
    assert (fixed["segment_ids"] == -1).all(dim=1).sum() >= 3  # whole rows of padding, masked
    computed = []
    for batch in (fixed, unpadded):
        model.zero_grad(set_to_none=True)
        outputs = model(**model_inputs(batch))
        losses = stage1_losses(outputs, batch)
        losses["total"].backward()
        computed.append((outputs, losses, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_f, losses_f, grads_f), (out_u, losses_u, grads_u) = computed
    for name in ("total", "seq", "start", "end"):
        assert losses_f[name].item() == pytest.approx(losses_u[name].item(), abs=1e-5), name
    expected, actual = by_window(unpadded, out_u.seq_logits), by_window(fixed, out_f.seq_logits)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=0)
    assert grads_f.keys() == grads_u.keys() and len(grads_u) > 40
    for name, grad in grads_u.items():
        torch.testing.assert_close(grads_f[name], grad, atol=1e-5, rtol=1e-4, msg=name)
