"""Stage 2 through the real launchers on 2 gloo ranks: stop and resume gives the same samples and
losses as the uninterrupted run; ZeRO-3 with the on-the-fly teacher completes; the ZeRO-3 teacher
refresh copies the student exactly."""

import json
from collections import defaultdict

import pytest

from tests.conftest import REPO, launch

STAGE2 = ["train.max_steps=8", "train.eval_every=4", "train.save_every=2", "train.log_every=1",
          "train.keep_last=10", "data.max_eval_sentences=40", "stage2.sample_log=true",
          "stage2.bucket_pool=32", "eval.head=seq", "train.lr=3.0e-3"]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, tiny_encoder):
    """A tiny stage-1 model that has learned a little (dev F1 above zero with the BIO head)."""
    run = tmp_path_factory.mktemp("stage1") / "run"
    launch("launchers/stage1.py", ["--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={run}",
                                   "train.lr=3.0e-3", "train.max_steps=40", "train.eval_every=20",
                                   "data.max_train_sentences=3000", "train.global_batch_size=32",
                                   "train.micro_batch_size=32", "eval.head=seq"])
    return run


def stage2(run_dir, init_from, ds_config, *extra):
    return launch("launchers/stage2.py", ["--config", str(REPO / "configs" / "tiny_stage2.yaml"),
                                          f"run.output_dir={run_dir}", f"stage2.init_from={init_from}",
                                          f"deepspeed.config={REPO / ds_config}", *STAGE2, *extra],
                  nproc=2)


def read_log(run_dir):
    return {e["step"]: e for e in map(json.loads, (run_dir / "losses.jsonl").read_text().splitlines())}


def samples_by_step(run_dir, rank):
    steps = defaultdict(list)
    for line in (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines():
        entry = json.loads(line)
        # the labeled source is streamed from the run folder: compare runs without their folder
        steps[entry["step"]] += [sample.replace(str(run_dir), "RUN") for sample in entry["samples"]]
    return dict(steps)


def test_stop_and_resume_repeats_the_uninterrupted_run(stage1_run, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    stage2(straight, stage1_run, "ds_configs/zero2_fp32.json")
    first = stage2(resumed, stage1_run, "ds_configs/zero2_fp32.json", "run.max_steps_per_job=3")
    assert "stopping after 3 steps" in first.stdout + first.stderr
    stage2(resumed, stage1_run, "ds_configs/zero2_fp32.json")

    for rank in (0, 1):
        assert samples_by_step(resumed, rank) == samples_by_step(straight, rank)
    consumed = [samples_by_step(straight, rank) for rank in (0, 1)]
    rank0 = {s for step in consumed[0].values() for s in step}
    rank1 = {s for step in consumed[1].values() for s in step}
    assert rank0 and rank1 and not rank0 & rank1  # ranks read disjoint sentences
    assert any("/de/" in s for s in rank0 | rank1) and any("source_labeled" in s for s in rank0 | rank1)

    expected, actual = read_log(straight), read_log(resumed)
    assert sorted(expected) == sorted(actual) == list(range(1, 9))
    for step in range(1, 9):
        for name in ("loss/total", "loss/gold_seq", "loss/pseudo_start", "loss/mse"):
            assert actual[step][name] == pytest.approx(expected[step][name], abs=1e-6), (step, name)
    assert 0.0 <= expected[8]["teacher/agreement"] <= 1.0
    assert expected[8]["teacher/refreshes"] == actual[8]["teacher/refreshes"]
    best = json.loads((straight / "results.json").read_text())
    assert best["best_score"] == pytest.approx(json.loads((resumed / "results.json").read_text())["best_score"])


def test_zero3_with_teacher_completes(stage1_run, tmp_path):
    run = tmp_path / "zero3"
    result = stage2(run, stage1_run, "ds_configs/zero3_fp32.json", "train.max_steps=6",
                    "train.eval_every=3")
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 6 and "dev" in results
    history = read_log(run)
    assert all(0.0 <= history[s]["teacher/agreement"] <= 1.0 for s in history)
    assert "ZeRO stage 3" in result.stdout + result.stderr


def test_zero3_teacher_refresh_copies_the_student(tiny_encoder):
    output = launch("tests/zero3_refresh_check.py", [], nproc=2)
    assert output.stdout.count("teacher equals student after refresh") == 2
