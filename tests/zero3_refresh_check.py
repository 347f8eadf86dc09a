"""Run by tests/test_stage2_distributed.py under torchrun: under ZeRO-3 on 2 ranks, the teacher
refresh copies the trained student exactly, for both placements: partitioned like the student
(each rank copies its own partition) and a whole replica on every rank (each parameter gathered in
turn); the two teachers give the same outputs."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualner.backend.comm import init_distributed  # noqa: E402
from dualner.backend.deepspeed_engine import (DeepSpeedTeacher, DeepSpeedTrainingEngine,  # noqa: E402
                                              ReplicaTeacher, build_teacher, load_deepspeed_config)
from dualner.config import TrainConfig  # noqa: E402
from dualner.data.batching import BatchLayout  # noqa: E402
from dualner.encoders import resolve_encoder  # noqa: E402
from dualner.model import DualNERModel  # noqa: E402

info = init_distributed()
encoder = resolve_encoder("tiny-random")
ds_config = load_deepspeed_config(Path(__file__).resolve().parents[1] / "ds_configs" / "zero3_fp32.json",
                                  BatchLayout(4, 2, 1, 2))
torch.manual_seed(0)
student = DeepSpeedTrainingEngine(DualNERModel.from_pretrained_encoder(encoder, 3), ds_config,
                                  TrainConfig(lr=1e-2, warmup_steps=0), total_steps=10)
teacher = DeepSpeedTeacher(DualNERModel.from_pretrained_encoder(encoder, 3), ds_config)
replica = build_teacher(DualNERModel.from_pretrained_encoder(encoder, 3), ds_config, "auto")
assert isinstance(replica, ReplicaTeacher)  # a tiny model fits: auto places a replica
assert not any(hasattr(p, "ds_tensor") for p in replica.module.parameters())
ids = torch.randint(5, 200, (2, 7))
mask = torch.ones_like(ids)
for _ in range(2):
    loss = student(ids, attention_mask=mask).seq_logits.logsumexp(-1).mean()
    student.backward(loss)
    student.optimizer_step()
student.eval()
with torch.no_grad():
    before = teacher(ids, attention_mask=mask).seq_logits
    expected = student(ids, attention_mask=mask).seq_logits
assert not torch.allclose(before, expected), "training should have moved the student"
teacher.copy_from(student)
replica.copy_from(student)
with torch.no_grad():
    after = teacher(ids, attention_mask=mask).seq_logits
    replicated = replica(ids, attention_mask=mask).seq_logits
assert torch.allclose(after, expected, atol=1e-6), (after - expected).abs().max()
assert torch.allclose(replicated, expected, atol=1e-6), (replicated - expected).abs().max()
print(f"rank {info.rank}: teacher equals student after refresh")
