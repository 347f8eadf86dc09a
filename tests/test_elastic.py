"""A checkpoint written by 2 ranks resumes on 1 rank (through DeepSpeed's universal checkpoint,
optimizer state included); training continues with the uninterrupted run's losses within 0.1%
(float reduction order; dropout off so both draw alike)."""

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


# Resuming on the same 2 ranks (exact losses) is proved by tests/test_stage1_distributed.py (ZeRO-3) and
# tests/test_faults.py (ZeRO-2); here only the change of world size, each launch being the main cost.
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_resume_on_another_number_of_ranks(tmp_path, tiny_encoder, zero):
    config = ["--config", str(REPO / "configs" / "tiny.yaml"),
              f"engine.config={REPO / 'ds_configs' / f'{zero}_fp32.json'}", *ARGS]
    straight = tmp_path / "straight"
    launch("launchers/stage1.py", [*config, f"run.output_dir={straight}"], nproc=2)
    expected = losses(straight)
    resumed = tmp_path / "resumed-on-1"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-8")
    (resumed / "results.json").unlink()
    result = launch("launchers/stage1.py", [*config, f"run.output_dir={resumed}"], nproc=1)
    assert "resumed from" in result.stdout + result.stderr
    actual = losses(resumed)
    for step in range(5, 9):  # another reduction order (and, under ZeRO-3, partitioning) on 1 rank
        assert actual[step] == pytest.approx(expected[step], rel=1e-3), step
    assert (resumed / "checkpoints" / "step-4" / "universal" / "COMPLETE").is_file()


def test_stage1_resumed_on_fewer_ranks_finishes_with_a_loadable_best(tmp_path, tiny_encoder):
    """The best checkpoint was written by 2 ranks, the run finishes on 1: the final test evaluation
    loads it through the universal checkpoint (it used to crash: "DP world size of 2 but the current
    world size is 1"), and the best stays loadable by any number of ranks."""
    run = tmp_path / "run"
    # a learning rate too small to change a prediction: step 3 stays the best, written by 2 ranks
    config = ["--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={run}", "train.max_steps=6",
              "train.eval_every=3", "train.lr=1e-12", "data.max_eval_sentences=16",
              f"engine.config={REPO / 'ds_configs' / 'zero2_fp32.json'}"]
    launch("launchers/stage1.py", [*config, "run.max_steps_per_job=3"], nproc=2, expect=75)
    launch("launchers/stage1.py", config, nproc=1)
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 6 and results["best_step"] == 3 and "test" in results
    evaluated = tmp_path / "f1.json"
    launch("launchers/evaluate.py", ["--checkpoint", str(run), "--data", f"de={REPO / 'data/panx-sample/de/test.tsv'}",
                                     "--max-sentences", "16", "--output", str(evaluated)])
    assert "de" in json.loads(evaluated.read_text())["per_language"]


STAGE2_ELASTIC = """\
run: {{output_dir: {run}, seed: 5}}
model: {{encoder: tiny-random}}
data:
  train: {{en: {repo}/data/panx-sample/en/train.tsv}}
  dev: {{en: {repo}/data/panx-sample/en/dev.tsv}}
  max_length: 64
  packing: true
  max_train_sentences: 24
  max_eval_sentences: 8
stage2:
  init_from: {init}
  target: {{de: {target}}}
  bucket_pool: 8
  sample_log: true
train: {{global_batch_size: 12, micro_batch_size: 2, lr: 1.0e-4, warmup_steps: 0, max_steps: 16,
        eval_every: 100, log_every: 4, keep_last: 2}}
engine: {{kind: deepspeed, config: {repo}/ds_configs/zero0_fp32.json}}
logging: {{progress_bar: false}}
"""


def test_stage2_resumes_on_2_1_2_3_ranks_using_every_sentence_once_per_pass(tmp_path, tiny_encoder):
    """One stage-2 run in four jobs on 2, 1, 2 and 3 ranks (2->1, 1->2, 2->3): within each pass every
    sentence of every stream is trained exactly once, across the changes of world size."""
    stage1 = tmp_path / "stage1"
    launch("launchers/stage1.py", ["--config", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={stage1}",
                                   "train.max_steps=2", "train.eval_every=2", "data.max_eval_sentences=8",
                                   f"engine.config={REPO / 'ds_configs' / 'zero0_fp32.json'}"])
    target = tmp_path / "de.txt"
    target.write_text("".join(f"Satz {i} in Berlin .\n" for i in range(40)))
    run = tmp_path / "stage2"
    config = tmp_path / "stage2.yaml"
    config.write_text(STAGE2_ELASTIC.format(run=run, repo=REPO, init=stage1, target=target))
    for nproc, expect in ((2, 75), (1, 75), (2, 75), (3, 0)):
        output = launch("launchers/stage2.py", ["--config", str(config), "run.max_steps_per_job=4"], nproc=nproc,
                        expect=expect)
        if nproc != 2:
            assert "resumed from" in output.stdout + output.stderr
    trained = []  # (sample id, pass) of every window trained, every rank, every job
    for log in run.glob("samples_rank*.jsonl"):
        for entry in map(json.loads, log.read_text().splitlines()):
            if "samples" in entry:
                trained += list(zip(entry["samples"], entry["passes"]))
    assert len(trained) >= 16 * 12  # 12 windows a step (a long sentence's windows stay together: a few more)
    assert len(trained) == len(set(trained))  # no window twice within a pass
    first_pass = {sample for sample, passes in trained if passes == 0}
    target_ids = {f"{target}@{sum(len(f'Satz {j} in Berlin .') + 1 for j in range(i))}" for i in range(40)}
    assert target_ids <= first_pass  # every target sentence in the first pass
    assert len({s.split("+")[0] for s in first_pass if "source_labeled" in s}) == 24  # and every labeled one
    assert max(passes for _, passes in trained) >= 1  # the run went on into further passes
