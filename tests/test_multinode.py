"""Two "nodes" on one machine: two launcher invocations with node ranks 0 and 1 train together,
with torchrun and with `deepspeed --no_ssh` (each node reads the same hostfile, no ssh)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env, free_port


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_train_together(tmp_path, tiny_encoder, launcher):
    port = free_port()
    output = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only label the nodes with --no_ssh
    processes = []
    for node_rank in (0, 1):
        if launcher == "torchrun":
            start = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
                     "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
        else:
            start = [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}", "--no_ssh",
                     f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        command = [*start, str(REPO / "launchers" / "stage1.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
                   f"run.output_dir={output}", "train.max_steps=4", "train.eval_every=4",
                   "data.max_eval_sentences=16", f"engine.config={REPO / 'ds_configs' / 'zero2_fp32.json'}"]
        processes.append(subprocess.Popen(command, cwd=REPO, env=child_env(PYTHONPATH=str(REPO)),
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "accumulation 1 x world 2" in logs[0]  # one job over both nodes, global batch kept
    results = json.loads((output / "results.json").read_text())
    assert results["steps"] == 4
