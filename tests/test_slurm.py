"""slurm/submit.sh and slurm/dualner.sbatch under a real Slurm (a private one-node slurmctld +
slurmd started here, see slurm_cluster.py): a 2-task stage-1 job completes, and a job sent the
time-limit signal checkpoints, requeues itself and finishes from its checkpoint with the
uninterrupted job's losses."""

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, child_env
from tests.slurm_cluster import ClusterUnavailable, start_cluster

STEPS = 40
OVERRIDES = [f"train.max_steps={STEPS}", "train.eval_every=100", "train.save_every=100", "train.log_every=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        running = start_cluster(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as reason:
        pytest.skip(f"Slurm cannot be started on this machine: {reason}")
    yield running
    running.stop()


def submit(cluster, run_dir, logs, overrides=OVERRIDES) -> int:
    env = {**child_env(PYTHON=sys.executable, STAGE="1", CONFIG="configs/tiny.yaml", NODES="1",
                       GPUS_PER_NODE="0", TASKS_PER_NODE="2", CPUS_PER_TASK="1", TIME="20",
                       LOG_DIR=str(logs)), "SLURM_CONF": cluster.env["SLURM_CONF"]}
    result = subprocess.run(["bash", "slurm/submit.sh", f"run.output_dir={run_dir}", *overrides], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return int(result.stdout.split()[-1])  # "Submitted batch job N"


def job_log(logs, job_id) -> str:
    return "\n".join(path.read_text() for path in logs.glob(f"*-{job_id}.out"))


def losses_by_step(run_dir) -> dict[int, float]:
    entries = {}
    for line in (run_dir / "losses.jsonl").read_text().splitlines():  # a resumed run re-logs steps
        entry = json.loads(line)
        entries[entry["step"]] = entry["loss/total"]
    return entries


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("uninterrupted")
    job_id = submit(cluster, root / "run", root / "logs")
    job = cluster.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    return job, root / "run", job_log(root / "logs", job_id)


def test_two_task_stage1_job_completes(uninterrupted):
    job, run_dir, log = uninterrupted
    assert job["JobState"] == "COMPLETED", log
    assert "2 task(s) on 1 node(s)" in log and "finished:" in log, log
    assert "world 2" in log  # both srun tasks joined one process group
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == STEPS and set(results["test"]["per_language"]) == {"en", "de"}
    assert sorted(losses_by_step(run_dir)) == list(range(1, STEPS + 1))


def test_refused_config_ends_the_job_with_exit_2_before_any_rank_starts(cluster, tmp_path):
    """`dualner config --check --stage 1 --world-size 2` in the batch script: a global batch that two
    ranks cannot share is refused with its line and exit 2, and srun never runs."""
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    job_id = submit(cluster, run_dir, logs, [*OVERRIDES, "train.global_batch_size=15"])
    job = cluster.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
    log = job_log(logs, job_id)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", (job, log)
    assert "train.global_batch_size=15 is not divisible by the world size 2" in log, log
    assert "task(s) on" not in log and not run_dir.exists(), log  # the job stopped before the ranks


def test_signaled_job_requeues_and_finishes_from_its_checkpoint(cluster, uninterrupted, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    job_id = submit(cluster, run_dir, logs)
    deadline = time.time() + 240
    while time.time() < deadline:  # the ranks are in the training loop (signal handlers installed)
        losses = run_dir / "losses.jsonl"
        if losses.exists() and len(losses.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the job never started training:\n{job_log(logs, job_id)}\n{cluster.logs()}")
    # What Slurm sends before the time limit (#SBATCH --signal=USR1@...): to every task of the job.
    cluster.command("scancel", "--signal=USR1", str(job_id))
    job = cluster.wait_for(job_id, {"PENDING", "COMPLETED", "FAILED"}, timeout=180)
    log = job_log(logs, job_id)
    assert job["JobState"] == "PENDING" and job["Restarts"] == "1", log
    assert "signal SIGUSR1" in log and "requeueing job" in log, log
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")
                         if (p / "COMPLETE").is_file())
    assert checkpoints and 3 <= checkpoints[-1] < STEPS, (checkpoints, log)
    assert not (run_dir / "results.json").exists()
    # Slurm holds a requeued job for about two minutes (its BeginTime); release it now, once the node
    # is done with its first run (under load, released earlier it is killed as non-startable).
    cluster.wait_for_idle_node(timeout=120)
    cluster.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    job = cluster.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
    log = job_log(logs, job_id)
    assert job["JobState"] == "COMPLETED", log
    assert "(restart 1)" in log and f"at step {checkpoints[-1]}" in log and "finished:" in log, log
    _, reference_dir, _ = uninterrupted
    expected, actual = losses_by_step(reference_dir), losses_by_step(run_dir)
    assert sorted(actual) == sorted(expected) == list(range(1, STEPS + 1))
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], abs=1e-6), step
