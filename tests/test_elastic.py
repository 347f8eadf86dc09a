"""A checkpoint written by 2 ranks resumes on 1 rank (through DeepSpeed's universal checkpoint,
optimizer state included) and on 2 ranks; training continues with the uninterrupted run's losses:
exactly on 2 ranks, within 0.1% on 1 (float reduction order; dropout off so both draw alike)."""

import json
import shutil

import pytest

from tests.conftest import REPO, launch

ARGS = ["train.max_steps=8", "train.save_every=4", "train.eval_every=100", "train.log_every=1",
        "train.keep_last=10", "model.dropout=0.0", "model.encoder_dropout=0.0", "data.max_eval_sentences=16"]


def losses(run_dir):
    entries = {}
    for line in (run_dir / "losses.jsonl").read_text().splitlines():
        entry = json.loads(line)
        entries[entry["step"]] = entry["loss/total"]
    return entries


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_resume_on_another_number_of_ranks(tmp_path, tiny_encoder, zero):
    config = ["--config", str(REPO / "configs" / "tiny.yaml"),
              f"deepspeed.config={REPO / 'ds_configs' / f'{zero}_fp32.json'}", *ARGS]
    straight = tmp_path / "straight"
    launch("launchers/stage1.py", [*config, f"run.output_dir={straight}"], nproc=2)
    expected = losses(straight)
    for nproc in (1, 2):
        resumed = tmp_path / f"resumed-on-{nproc}"
        shutil.copytree(straight, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step-8")
        (resumed / "results.json").unlink()
        result = launch("launchers/stage1.py", [*config, f"run.output_dir={resumed}"], nproc=nproc)
        assert "resumed from" in result.stdout + result.stderr
        actual = losses(resumed)
        for step in range(5, 9):
            if nproc == 2:
                assert actual[step] == pytest.approx(expected[step], abs=1e-6), (nproc, step)
            else:  # another reduction order (and, under ZeRO-3, partitioning) on 1 rank
                assert actual[step] == pytest.approx(expected[step], rel=1e-3), (nproc, step)
    assert (tmp_path / "resumed-on-1" / "checkpoints" / "step-4" / "universal" / "COMPLETE").is_file()
