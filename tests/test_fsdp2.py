"""engine.kind=fsdp2 (torch's fully_shard + distributed checkpoint) through the real launchers on 2
gloo ranks against DeepSpeed ZeRO-3, fp32, same seed and data, dropout off so both draw alike: the
same per-step losses over 20 steps in stage 1 and stage 2 (teacher replica, gradient accumulation
and clipping on), the same weights exported; an FSDP2 checkpoint of 2 ranks resumes on 1 and 3
and continues with the uninterrupted run's losses; another engine's checkpoint is refused; the
teacher refresh copies the student into a sharded teacher and a replica alike."""

import json
import shutil

import pytest
import torch

from dualner.backend import consolidated_state_dict
from dualner.config import load_config
from dualner.errors import CheckpointError
from dualner.run_layout import COMPLETE_MARKER
from tests.conftest import REPO, launch

FSDP2 = "engine={kind: fsdp2}"
ZERO3 = f"engine={{kind: deepspeed, config: {REPO / 'ds_configs' / 'zero3_fp32.json'}}}"
# 24 sentences a step: micro batches of 4, 3 per rank on 2 ranks (6 on 1, 2 on 3)
COMMON = ["train.max_steps=20", "train.log_every=1", "train.keep_last=10", "train.global_batch_size=24",
          "train.micro_batch_size=4", "model.dropout=0.0", "model.encoder_dropout=0.0", "data.max_eval_sentences=16"]
STAGE1 = [*COMMON, "train.save_every=10", "train.eval_every=100", "data.max_train_sentences=256"]
STAGE2 = [*COMMON, "train.save_every=100", "train.eval_every=10", "stage2.teacher_placement=replica",
          "stage2.bucket_pool=32", "data.max_train_sentences=128"]
SAME = 1e-4  # relative: FSDP2 and ZeRO-3 reduce and clip in another order


def losses(run_dir):
    return {entry["step"]: entry["loss/total"] for entry in map(json.loads, (run_dir / "losses.jsonl").read_text().splitlines())}


def stage1(run_dir, engine, nproc=2):
    return launch("launchers/stage1.py", ["--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={run_dir}",
                                          engine, *STAGE1], nproc=nproc)


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("engines")
    runs = {"fsdp2": root / "fsdp2", "zero3": root / "zero3"}
    stage1(runs["fsdp2"], FSDP2)
    stage1(runs["zero3"], ZERO3)
    return runs


def test_stage1_fsdp2_trains_as_deepspeed_zero3(stage1_runs):
    fsdp2, zero3 = losses(stage1_runs["fsdp2"]), losses(stage1_runs["zero3"])
    assert sorted(fsdp2) == sorted(zero3) == list(range(1, 21))
    assert zero3[20] < zero3[1]  # it learns: the comparison is of training, not of a constant
    for step in range(1, 21):
        assert fsdp2[step] == pytest.approx(zero3[step], rel=SAME), step
    checkpoint = stage1_runs["fsdp2"] / "checkpoints" / "step-20"
    record = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    assert record["engine"] == "fsdp2" and record["precision"] == "fp32"
    assert (checkpoint / "engine_state" / ".metadata").is_file() and (checkpoint / "components.pt").is_file()


def test_fsdp2_export_holds_the_weights_deepspeed_trains(stage1_runs):
    """The consolidated weights (what export, predict and evaluate read) of both runs' last step."""
    fsdp2 = consolidated_state_dict(stage1_runs["fsdp2"] / "checkpoints" / "step-20")
    zero3 = consolidated_state_dict(stage1_runs["zero3"] / "checkpoints" / "step-20")
    assert fsdp2.keys() == zero3.keys()
    for name in zero3:
        assert fsdp2[name].dtype == torch.float32 and fsdp2[name].shape == zero3[name].shape, name
        assert torch.allclose(fsdp2[name], zero3[name], atol=1e-4, rtol=1e-3), name


def test_fsdp2_export_predicts_what_the_deepspeed_export_predicts(stage1_runs, tmp_path):
    """`export` of each run's last checkpoint, then `predict` on the German dev sample: the same
    tokens and entities, line by line (the weights agree to 1e-4: the test above)."""
    from dualner.model_io import export_model
    from dualner.predict import predict_file
    source = REPO / "data" / "panx-sample" / "de" / "dev.tsv"
    predicted = {}
    for name, run in stage1_runs.items():
        exported = export_model(run / "checkpoints" / "step-20", tmp_path / name)
        output = tmp_path / f"{name}.jsonl"
        assert predict_file(exported, source, output) > 100
        predicted[name] = [json.loads(line) for line in output.read_text().splitlines()]
    assert predicted["fsdp2"] == predicted["zero3"]


@pytest.mark.parametrize("nproc", [1, 3])
def test_fsdp2_checkpoint_of_2_ranks_resumes_on_another_number_of_ranks(stage1_runs, tmp_path, nproc):
    straight = stage1_runs["fsdp2"]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-20")
    (resumed / "results.json").unlink()
    result = stage1(resumed, FSDP2, nproc=nproc)
    assert "resumed from" in result.stdout + result.stderr
    expected, actual = losses(straight), losses(resumed)
    assert sorted(actual) == list(range(1, 21))
    for step in range(11, 21):  # another reduction order and sharding: within 0.1%, as DeepSpeed's elastic resume
        assert actual[step] == pytest.approx(expected[step], rel=1e-3), (nproc, step)
    assert json.loads((resumed / "results.json").read_text())["steps"] == 20


def test_another_engines_checkpoint_is_refused_before_anything_is_written(stage1_runs, tmp_path):
    from dualner.stage1 import build_stage1
    run = tmp_path / "run"
    shutil.copytree(stage1_runs["fsdp2"], run)
    before = sorted(str(path.relative_to(run)) for path in run.rglob("*"))
    with pytest.raises(CheckpointError, match=r"was written by engine.kind=fsdp2, and this job's engine is "
                                              r"engine.kind=deepspeed"):
        build_stage1(load_config(REPO / "configs" / "tiny.yaml", [f"run.output_dir={run}", ZERO3, *STAGE1,
                                                                  "train.max_steps=30"]))
    assert sorted(str(path.relative_to(run)) for path in run.rglob("*")) == before


def test_stage2_fsdp2_trains_as_deepspeed_zero3(stage1_runs, tmp_path):
    runs = {}
    for name, engine in (("fsdp2", FSDP2), ("zero3", ZERO3)):
        runs[name] = tmp_path / name
        launch("launchers/stage2.py", ["--config", str(REPO / "configs" / "tiny_stage2.yaml"),
                                       f"run.output_dir={runs[name]}", f"stage2.init_from={stage1_runs['zero3']}",
                                       engine, *STAGE2], nproc=2)
    fsdp2, zero3 = losses(runs["fsdp2"]), losses(runs["zero3"])
    assert sorted(fsdp2) == sorted(zero3) == list(range(1, 21))
    for step in range(1, 21):
        assert fsdp2[step] == pytest.approx(zero3[step], rel=SAME), step


def test_fsdp2_teacher_refresh_copies_the_student(tiny_encoder):
    output = launch("tests/teacher_refresh_check.py", ["fsdp2"], nproc=2)
    assert (output.stdout + output.stderr).count("teacher equals student after refresh") == 2
