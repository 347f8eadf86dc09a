"""The backend's own gradient work at ZeRO-0 (dualner.backend.deepspeed_engine): clipping with torch's
foreach norm and, at world size 1, no all-reduce, against DeepSpeed's per-parameter path
(DUALNER_DEEPSPEED_GRADIENTS=deepspeed): the same losses, the same clipped gradients reaching the
optimizer and the same updated weights, in fp32, through gradient accumulation and a parameter that
receives no gradient."""

import pytest
import torch

from dualner.backend.comm import init_distributed
from dualner.backend.deepspeed_engine import DeepSpeedTrainingEngine, load_deepspeed_config
from dualner.config import TrainConfig
from dualner.data.batching import derive_batch_layout
from dualner.data.packing import Collator, model_inputs
from dualner.losses import token_cross_entropy
from tests.conftest import REPO
from tests.test_packing import tiny_model, windows_of

CLIP = 0.05  # small enough that every step is clipped


def train(path: str, micro_batches, monkeypatch) -> dict:
    monkeypatch.setenv("DUALNER_DEEPSPEED_GRADIENTS", path)
    init_distributed()
    model = tiny_model("xlm-roberta").train()
    model.dropout.p = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    train_cfg = TrainConfig(global_batch_size=16, micro_batch_size=8, lr=1e-2, weight_decay=0.1, warmup_steps=0)
    ds_config = load_deepspeed_config(REPO / "ds_configs" / "zero0_fp32.json", derive_batch_layout(train_cfg, 1))
    ds_config["gradient_clipping"] = CLIP
    engine = DeepSpeedTrainingEngine(model, ds_config, train_cfg, total_steps=10)
    optimizer = engine.engine.optimizer
    seen = {"losses": [], "grads": [], "weights": []}
    original_step = optimizer.step

    def recording_step(*args, **kwargs):  # the gradients the optimizer is given: clipped, reduced
        seen["grads"].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return original_step(*args, **kwargs)
    optimizer.step = recording_step
    for batch in micro_batches:
        outputs = engine(**model_inputs(batch))
        # the span heads get no gradient: DeepSpeed's reduction gives them zeros (AdamW decays them)
        loss = token_cross_entropy(outputs.seq_logits, batch["seq_labels"])
        seen["losses"].append(loss.item())
        engine.backward(loss)
        if len(seen["losses"]) % engine.accumulation_steps == 0:
            engine.optimizer_step()
        if len(seen["grads"]) > len(seen["weights"]):  # an optimizer step happened
            seen["weights"].append({n: p.detach().clone() for n, p in model.named_parameters()})
    seen["path"] = engine.gradient_path
    seen["allreduce"] = engine.engine.enable_backward_allreduce
    return seen


def test_direct_gradient_path_equals_deepspeeds(tiny_tokenizer, monkeypatch):
    windows, _ = windows_of(tiny_tokenizer, "en", count=48)
    collate = Collator(tiny_tokenizer.pad_token_id, row_length=48, position_offset=2)
    micro_batches = [collate(windows[i:i + 8]) for i in range(0, 48, 8)]  # 3 steps of 2 micro batches
    reference = train("deepspeed", micro_batches, monkeypatch)
    direct = train("direct", micro_batches, monkeypatch)
    assert (reference["path"], reference["allreduce"]) == ("deepspeed", True)
    assert (direct["path"], direct["allreduce"]) == ("direct", False)
    assert len(direct["grads"]) == len(reference["grads"]) == 3
    assert direct["losses"] == pytest.approx(reference["losses"], abs=1e-6)
    for step, (ours, theirs) in enumerate(zip(direct["grads"], reference["grads"])):
        assert ours.keys() == theirs.keys() and any("start_head" in name for name in theirs)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in theirs.values()]))
        assert norm.item() == pytest.approx(CLIP, rel=1e-3), "clipping must have engaged"
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], atol=1e-7, rtol=1e-5, msg=f"step {step} {name}")
    for ours, theirs in zip(direct["weights"], reference["weights"]):
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)
    # the span heads saw only zero gradients, and weight decay moved them the same way on both paths
    assert not torch.equal(direct["weights"][-1]["start_head.weight"], tiny_model("xlm-roberta").start_head.weight)
