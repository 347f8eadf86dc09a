"""bf16 on a CPU is chosen by what the CPU can do (hardening round 4, item 1): a bf16 engine config
runs in fp32 on a CPU without bf16 instructions (torch's reference kernel there is tens of times
slower), says so in the log, and a resumed run keeps the precision it was trained in."""

import json

import pytest
import torch

from dualner.backend import deepspeed_engine, placement
from dualner.backend.deepspeed_engine import load_deepspeed_config, precision_of, resume_precision
from dualner.data.batching import BatchLayout
from dualner.errors import CheckpointError
from dualner.run_layout import COMPLETE_MARKER
from dualner.stage1 import run_stage1
from tests.conftest import REPO
from tests.test_hardening import config

LAYOUT = BatchLayout(global_batch_size=16, micro_batch_size=8, accumulation_steps=2, world_size=1)
CPU = torch.device("cpu")
BF16_JSON = REPO / "ds_configs" / "zero0.json"
AUTOCAST_JSON = REPO / "ds_configs" / "zero2_autocast.json"


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) bf16 instructions."""
    def pretend(has: bool):
        monkeypatch.setattr(placement, "cpu_has_bf16", lambda: has)
    return pretend


@pytest.mark.parametrize("path", [BF16_JSON, AUTOCAST_JSON])
def test_auto_trains_in_fp32_on_a_cpu_without_bf16_and_says_why(path, cpu_bf16, capfd):
    cpu_bf16(False)
    ds_config = load_deepspeed_config(path, LAYOUT, CPU, "auto")
    assert precision_of(ds_config) == "fp32"
    logged = capfd.readouterr().out
    assert "precision: fp32 instead of the bf16" in logged and "no bf16 instructions" in logged
    assert precision_of(json.loads(path.read_text())) == "bf16"  # the file itself is not rewritten


def test_auto_keeps_bf16_on_a_cpu_with_it_and_the_explicit_choices_win(cpu_bf16):
    cpu_bf16(True)
    assert precision_of(load_deepspeed_config(BF16_JSON, LAYOUT, CPU, "auto")) == "bf16"
    assert precision_of(load_deepspeed_config(BF16_JSON, LAYOUT, CPU, "fp32")) == "fp32"
    cpu_bf16(False)
    assert precision_of(load_deepspeed_config(BF16_JSON, LAYOUT, CPU, "bf16")) == "bf16"
    # a GPU's precision is the JSON's whatever the choice (no CPU question there)
    gpu_config = deepspeed_engine.cpu_precision(json.loads(BF16_JSON.read_text()), BF16_JSON,
                                                torch.device("cuda", 0), "fp32")
    assert precision_of(gpu_config) == "bf16"


def test_this_machines_answer_matches_onednn():
    # the check the choice rests on: oneDNN's bf16 path, which is what torch's CPU matmuls use
    assert placement.cpu_has_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_a_resumed_run_keeps_its_precision_or_is_refused(tmp_path, cpu_bf16):
    cpu_bf16(False)
    now = load_deepspeed_config(BF16_JSON, LAYOUT, CPU, "auto")  # fp32 here
    checkpoint = tmp_path / "step-2"
    kept = resume_precision(now, BF16_JSON, CPU, "auto", checkpoint, "bf16")
    assert precision_of(kept) == "bf16"  # a bf16 run continues in bf16 (its optimizer state is bf16's)
    cpu_bf16(True)
    bf16_now = load_deepspeed_config(BF16_JSON, LAYOUT, CPU, "auto")
    assert precision_of(resume_precision(bf16_now, BF16_JSON, CPU, "auto", checkpoint, "fp32")) == "fp32"
    with pytest.raises(CheckpointError, match=r"trained in fp32, but this job would train in bf16"):
        resume_precision(bf16_now, BF16_JSON, CPU, "bf16", checkpoint, "fp32")
    # checkpoints from before the precision was recorded load as they are
    assert resume_precision(bf16_now, BF16_JSON, CPU, "auto", checkpoint, None) is bf16_now


def test_a_run_records_its_precision_and_resumes_in_it(tmp_path, tiny_encoder, capfd):
    """Stage 1 with the quickstart's bf16 JSON, then resumed under auto: the checkpoint's COMPLETE
    record names what ran, and the resumed run continues in it (a bf16 run switched to fp32 would
    fail to load DeepSpeed's optimizer state)."""
    output = tmp_path / "run"
    bf16 = f"engine.config={BF16_JSON}"
    run_stage1(config(output, bf16, "train.max_steps=2", "train.cpu_bf16=fp32"))
    record = json.loads((output / "checkpoints" / "step-2" / COMPLETE_MARKER).read_text())
    assert record["precision"] == "fp32"
    capfd.readouterr()
    run_stage1(config(output, bf16, "train.max_steps=4"))  # auto: keeps fp32 whatever this CPU has
    assert json.loads((output / "checkpoints" / "step-4" / COMPLETE_MARKER).read_text())["precision"] == "fp32"
    assert json.loads((output / "results.json").read_text())
