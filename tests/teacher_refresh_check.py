"""Run under torchrun on 2 ranks by tests/test_stage2_distributed.py (`deepspeed`: ZeRO-3) and
tests/test_fsdp2.py (`fsdp2`): the teacher refresh copies the trained student exactly, for both
placements: sharded like the student (each rank copies its own shards or partition) and a whole
replica on every rank (each parameter gathered in turn)."""

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dualner.backend import deepspeed_config, fsdp2  # noqa: E402
from dualner.backend.comm import init_distributed  # noqa: E402
from dualner.backend.teacher import ReplicaTeacher  # noqa: E402
from dualner.config import TrainConfig  # noqa: E402
from dualner.data.batching import BatchLayout  # noqa: E402
from dualner.encoders import resolve_encoder  # noqa: E402
from dualner.model import DualNERModel  # noqa: E402

kind = sys.argv[1]
info = init_distributed()
encoder = resolve_encoder("tiny-random")
layout = BatchLayout(4, 2, 1, 2)
if kind == "deepspeed":
    settings = deepspeed_config.DeepSpeedSettings(config=str(REPO / "ds_configs" / "zero3_fp32.json"))
    setup = deepspeed_config.prepare(settings, layout, torch.device("cpu"), "auto")
else:
    setup = fsdp2.prepare(fsdp2.FSDP2Settings(), layout, torch.device("cpu"), "auto")
torch.manual_seed(info.rank)  # the ranks draw different heads: what each rank holds must still agree
student = setup.build(DualNERModel.from_pretrained_encoder(encoder, 3), TrainConfig(lr=1e-2, warmup_steps=0), 10)
sharded = setup.build_teacher(DualNERModel.from_pretrained_encoder(encoder, 3), "partitioned")
replica = setup.build_teacher(DualNERModel.from_pretrained_encoder(encoder, 3), "replica")
assert isinstance(replica, ReplicaTeacher) and not isinstance(sharded, ReplicaTeacher)
assert not any(hasattr(p, "ds_tensor") for p in replica.module.parameters())  # whole, not partitioned
if kind == "deepspeed":  # a tiny model fits: auto places a replica
    assert isinstance(setup.build_teacher(DualNERModel.from_pretrained_encoder(encoder, 3), "auto"), ReplicaTeacher)
ids = torch.randint(5, 200, (2, 7))
mask = torch.ones_like(ids)
for _ in range(2):
    loss = student(ids, attention_mask=mask).seq_logits.logsumexp(-1).mean()
    student.backward(loss)
    student.optimizer_step()
student.eval()
with torch.no_grad():
    before = sharded(ids, attention_mask=mask).seq_logits
    expected = student(ids, attention_mask=mask).seq_logits
assert not torch.allclose(before, expected), "training should have moved the student"
sharded.copy_from(student)
replica.copy_from(student)
with torch.no_grad():
    after = sharded(ids, attention_mask=mask).seq_logits
    replicated = replica(ids, attention_mask=mask).seq_logits
assert torch.allclose(after, expected, atol=1e-6), (after - expected).abs().max()
assert torch.allclose(replicated, expected, atol=1e-6), (replicated - expected).abs().max()
print(f"rank {info.rank}: teacher equals student after refresh")
