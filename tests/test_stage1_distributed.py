"""2-rank gloo runs of the real stage-1 launcher: stop, resume=auto, identical losses; distributed
evaluation equal to single-process evaluation on the same checkpoint."""

import json

import pytest

from tests.conftest import REPO, SAMPLE, launch

COMMON = [
    "train.max_steps=8", "train.eval_every=4", "train.save_every=2", "train.log_every=1",
    "train.keep_last=10", "data.max_train_sentences=256", "data.max_eval_sentences=40",
]


def read_losses(run_dir):
    lines = (run_dir / "losses.jsonl").read_text().splitlines()
    return {entry["step"]: entry for entry in map(json.loads, lines)}


def stage1(run_dir, ds_config, *extra, expect=0):
    return launch("launchers/stage1.py", ["--config", str(REPO / "configs" / "tiny.yaml"),
                                          f"run.output_dir={run_dir}", f"engine.config={ds_config}",
                                          *COMMON, *extra], nproc=2, expect=expect)


# ZeRO-3 only: resuming under ZeRO-2 is covered by the kill tests (tests/test_faults.py) and the
# stage-2 stop/resume test, which run ZeRO-2.
@pytest.fixture(scope="module", params=["ds_configs/zero3_fp32.json"], ids=["zero3"])
def uninterrupted_and_resumed(request, tmp_path_factory, tiny_encoder):
    ds_config = str(REPO / request.param)
    root = tmp_path_factory.mktemp(request.node.callspec.id if hasattr(request.node, "callspec")
                                   else "run")
    straight, resumed = root / "straight", root / "resumed"
    stage1(straight, ds_config)
    first = stage1(resumed, ds_config, "run.max_steps_per_job=3", expect=75)
    assert "stopping after 3 steps" in first.stdout + first.stderr
    assert not (resumed / "results.json").exists()
    second = stage1(resumed, ds_config, "run.resume=auto")
    assert "resumed from" in second.stdout + second.stderr and "at step 3" in second.stdout + second.stderr
    return straight, resumed


def test_resume_reproduces_uninterrupted_losses(uninterrupted_and_resumed):
    straight, resumed = uninterrupted_and_resumed
    expected, actual = read_losses(straight), read_losses(resumed)
    assert sorted(expected) == sorted(actual) == list(range(1, 9))
    for step in range(1, 9):
        for term in ("loss/total", "loss/seq", "loss/start", "loss/end"):
            assert actual[step][term] == pytest.approx(expected[step][term], abs=1e-6), (step, term)
    assert json.loads((straight / "results.json").read_text())["best_score"] == pytest.approx(
        json.loads((resumed / "results.json").read_text())["best_score"], abs=1e-9)


def test_checkpoints_are_complete_and_pruned(uninterrupted_and_resumed):
    straight, _ = uninterrupted_and_resumed
    checkpoints = straight / "checkpoints"
    steps = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
    assert steps == [2, 4, 6, 8]
    assert all((checkpoints / f"step-{s}" / "COMPLETE").is_file() for s in steps)
    best = json.loads((checkpoints / "best.json").read_text())
    assert best["path"] in {f"step-{s}" for s in steps} and "per_language" in best


def test_distributed_evaluation_equals_single_process(uninterrupted_and_resumed, tmp_path):
    straight, _ = uninterrupted_and_resumed
    data = ["--data", f"en={SAMPLE / 'en' / 'dev.tsv'}", f"de={SAMPLE / 'de' / 'dev.tsv'}"]
    outputs = {}
    for nproc in (1, 2):
        output = tmp_path / f"eval{nproc}.json"
        launch("launchers/evaluate.py", ["--checkpoint", str(straight / "checkpoints" / "step-8"),
                                         *data, "--output", str(output)], nproc=nproc)
        outputs[nproc] = json.loads(output.read_text())
    assert set(outputs[1]["per_language"]) == {"en", "de"}
    assert outputs[1] == outputs[2]
