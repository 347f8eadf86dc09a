"""Fault injection on 2 gloo ranks (tiny encoder): a rank SIGKILLed at random steps of stage 1 and
stage 2, a crash in the middle of a checkpoint save, non-finite losses. After `resume=auto` the
losses equal the uninterrupted run's and the streamed samples have no repeat and no gap."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env, free_port

STEPS = 8
COMMON = [f"train.max_steps={STEPS}", "train.eval_every=4", "train.save_every=2", "train.log_every=1",
          "train.keep_last=10", "data.max_train_sentences=256", "data.max_eval_sentences=24",
          "stage2.sample_log=true", "stage2.bucket_pool=32",
          f"engine.config={REPO / 'ds_configs' / 'zero2_fp32.json'}"]
# Two kill points: between checkpoints (step 3: the resumed run redoes it from step-2) and at a
# checkpointed, evaluated step (step 4 is both), where the save may be cut short.
KILL_POINTS = [3, 4]


def run(script, config, output, *extra, fault=None, check=True):
    env = child_env(PYTHONPATH=str(REPO), **({"DUALNER_FAULT": fault} if fault else {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(REPO / script), "--config",
               str(REPO / "configs" / config), f"run.output_dir={output}", *COMMON, *extra]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(result.stdout[-3000:] + result.stderr[-5000:])
    return result


def last_entry_per_step(path):
    entries = {}
    for line in path.read_text().splitlines():  # a resumed run re-logs the steps after its checkpoint
        entry = json.loads(line)
        entries[entry["step"]] = entry
    return entries


def assert_same_losses(expected_dir, actual_dir):
    expected = last_entry_per_step(expected_dir / "losses.jsonl")
    actual = last_entry_per_step(actual_dir / "losses.jsonl")
    assert sorted(actual) == sorted(expected) == list(range(1, STEPS + 1))
    for step, entry in expected.items():
        for name, value in entry.items():
            if name.startswith("loss/"):
                assert actual[step][name] == pytest.approx(value, abs=1e-6), (step, name)


def stream_log(run_dir, rank):
    """The samples each step consumed; where a resumed job repeated a step, its record wins."""
    jobs: list[dict[int, list]] = []
    for line in (run_dir / f"samples_rank{rank}.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "job_starts_after_step" in entry:
            jobs.append({})
            continue
        jobs[-1].setdefault(entry["step"], []).extend(
            sample.replace(str(run_dir), "RUN") for sample in entry["samples"])
    merged: dict[int, list] = {}
    for job in jobs:
        merged.update(job)
    return merged


@pytest.fixture(scope="module")
def stage1_reference(tmp_path_factory, tiny_encoder):
    output = tmp_path_factory.mktemp("faults") / "stage1"
    run("launchers/stage1.py", "tiny.yaml", output)
    return output


def test_stage1_survives_killed_ranks_and_a_crash_while_saving(stage1_reference, tmp_path):
    """One run through every stage-1 fault, each job resuming what the one before left: a rank killed
    at each kill point, then rank 0 killed inside the step-4 save (one run instead of one per fault:
    each job is a launch, the suite's main cost). The finished run has the uninterrupted losses."""
    output = tmp_path / "run"
    for kill_step in KILL_POINTS:
        killed = run("launchers/stage1.py", "tiny.yaml", output, fault=f"kill:rank=1:step={kill_step}",
                     check=False)
        assert killed.returncode != 0 and not (output / "results.json").exists(), kill_step

    crashed = run("launchers/stage1.py", "tiny.yaml", output, fault="kill_in_save:rank=0:step=4",
                  check=False)
    assert crashed.returncode != 0
    checkpoints = output / "checkpoints"
    assert (checkpoints / "step-4").is_dir() and not (checkpoints / "step-4" / "COMPLETE").exists()
    assert (checkpoints / "step-2" / "COMPLETE").is_file()
    resumed = run("launchers/stage1.py", "tiny.yaml", output)
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert "step-2 at step 2" in resumed.stdout + resumed.stderr  # not the half-written step-4
    assert (checkpoints / "step-4" / "COMPLETE").is_file()
    assert_same_losses(stage1_reference, output)


@pytest.fixture(scope="module")
def stage2_reference(stage1_reference, tmp_path_factory):
    output = tmp_path_factory.mktemp("faults2") / "stage2"
    run("launchers/stage2.py", "tiny_stage2.yaml", output, f"stage2.init_from={stage1_reference}")
    return output


def test_stage2_survives_killed_ranks(stage1_reference, stage2_reference, tmp_path):
    """Rank 0 killed at each kill point in turn, each job resuming the one before; the finished run
    read the uninterrupted run's sentences at every step and has its losses."""
    output = tmp_path / "run"
    for kill_step in KILL_POINTS:
        killed = run("launchers/stage2.py", "tiny_stage2.yaml", output, f"stage2.init_from={stage1_reference}",
                     fault=f"kill:rank=0:step={kill_step}", check=False)
        assert killed.returncode != 0 and not (output / "results.json").exists(), kill_step
    run("launchers/stage2.py", "tiny_stage2.yaml", output, f"stage2.init_from={stage1_reference}")
    assert_same_losses(stage2_reference, output)
    for rank in (0, 1):
        expected, actual = stream_log(stage2_reference, rank), stream_log(output, rank)
        assert sorted(actual) == list(range(1, STEPS + 1))
        assert actual == expected  # every step read the same sentences: no repeat, no gap
        consumed = [sample for step in sorted(actual) for sample in actual[step]]
        assert len(consumed) == len(set(consumed))  # 8 steps read far less than one pass


@pytest.mark.parametrize("policy, engine", [("stop", "engine.config=ds_configs/zero2_fp32.json"),
                                            ("skip", "engine.config=ds_configs/zero3_fp32.json"),
                                            ("skip", "engine={kind: fsdp2}")], ids=["zero2", "zero3", "fsdp2"])
def test_nonfinite_loss_is_detected_on_every_rank(tmp_path, tiny_encoder, policy, engine):
    """NaN on rank 1 in step 3: the optimizer skips step 3 on both ranks (on the device); the flag is
    read one step later, so a stop happens after step 4 with a checkpoint of that state."""
    output = tmp_path / "run"
    result = run("launchers/stage1.py", "tiny.yaml", output, f"train.nonfinite_loss={policy}", engine,
                 fault="nan:rank=1:step=3", check=False)
    log = result.stdout + result.stderr
    if policy == "stop":
        assert result.returncode != 0
        assert "non-finite loss at step 3, micro batch 0 (rank 1" in log and "train.nonfinite_loss=stop" in log
        # both ranks stopped at the same point: rank 0, whose loss was finite, raised too
        assert log.count("dualner: error: non-finite loss at step 3") == 1  # rank 0
        assert log.count("dualner: error (rank 1): non-finite loss at step 3") == 1
        assert "non-finite loss at step 3 (on another rank)" in log
        assert (output / "checkpoints" / "step-4" / "COMPLETE").is_file()
        assert "the step was skipped and training stopped" in log
    else:
        assert result.returncode == 0, log[-3000:]
        entries = last_entry_per_step(output / "losses.jsonl")
        # counted when read, one step later (after step 4's log line)
        assert entries[4]["nonfinite/skipped_steps"] == 0 and entries[5]["nonfinite/skipped_steps"] == 1
        assert all(entry["loss/total"] == entry["loss/total"] for entry in entries.values())  # no NaN
        assert "the step was skipped on every rank" in log


def test_nonfinite_stop_resumes_past_the_skipped_step(tmp_path, stage1_reference, stage2_reference):
    """Stage 2, NaN in step 3: the stop checkpoints step 4 (step 3 skipped by the optimizer), and
    the resumed run reads on from there: every step's samples once, none repeated, none skipped."""
    output = tmp_path / "run"
    stopped = run("launchers/stage2.py", "tiny_stage2.yaml", output, f"stage2.init_from={stage1_reference}",
                  "train.save_every=4", fault="nan:rank=0:step=3", check=False)
    assert stopped.returncode != 0 and "dualner: error: non-finite loss at step 3" in stopped.stdout + stopped.stderr
    assert (output / "checkpoints" / "step-4" / "COMPLETE").is_file()
    resumed = run("launchers/stage2.py", "tiny_stage2.yaml", output, f"stage2.init_from={stage1_reference}",
                  "train.save_every=4")
    assert "resumed from" in resumed.stdout + resumed.stderr and (output / "results.json").is_file()
    for rank in (0, 1):
        # the data position is the uninterrupted run's (saved every 2 steps: saving moves no data)
        assert stream_log(output, rank) == stream_log(stage2_reference, rank)
    losses = last_entry_per_step(output / "losses.jsonl")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(entry["loss/total"] == entry["loss/total"] for entry in losses.values())


def test_preemption_signal_checkpoints_and_resumes(tmp_path, tiny_encoder):
    """SIGTERM to the launcher (what a scheduler sends before preempting): the ranks agree on a
    step, checkpoint it and exit; resume=auto then finishes with the uninterrupted run's losses."""
    import signal
    import time
    steps = 30
    extra = [f"train.max_steps={steps}", "train.save_every=100", "train.eval_every=100"]
    reference = tmp_path / "reference"
    run("launchers/stage1.py", "tiny.yaml", reference, *extra)
    output = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", str(REPO / "launchers" / "stage1.py"), "--config",
               str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={output}", *COMMON, *extra]
    process = subprocess.Popen(command, cwd=REPO, env=child_env(PYTHONPATH=str(REPO)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        losses = output / "losses.jsonl"
        if losses.exists() and len(losses.read_text().splitlines()) >= 4:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    log = process.communicate(timeout=300)[0]
    assert "stopping after" in log and "signal SIGTERM" in log, log[-3000:]
    assert process.returncode != 0 and (output / "stopped.json").is_file()  # ranks exit 75: resumable
    saved = sorted(int(p.name.split("-")[1]) for p in (output / "checkpoints").glob("step-*")
                   if (p / "COMPLETE").is_file())
    assert saved and 4 <= saved[-1] < steps
    assert last_entry_per_step(output / "losses.jsonl").keys() == set(range(1, saved[-1] + 1))
    run("launchers/stage1.py", "tiny.yaml", output, *extra)
    expected = last_entry_per_step(reference / "losses.jsonl")
    actual = last_entry_per_step(output / "losses.jsonl")
    assert sorted(actual) == sorted(expected) == list(range(1, steps + 1))
    for step in expected:
        assert actual[step]["loss/total"] == pytest.approx(expected[step]["loss/total"], abs=1e-6), step
