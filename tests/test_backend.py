"""The backend boundary and the collectives' devices.

CI has no GPU, so device mistakes must fail here: the multi-process tests run with
DUALNER_STRICT_COLLECTIVES=1 (tests/conftest.py), which installs tests/hooks/collective_audit.py: a
collective issued from project code outside dualner.backend.comm, or with a buffer that module did
not place, is refused the way NCCL refuses a CPU tensor. The first GPU run failed on exactly that (a CPU tensor sent by a helper that
did not place it)."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dualner.backend.comm import process_group_backend
from tests.conftest import REPO, child_env, free_port

LIBRARY = REPO / "dualner"
DISTRIBUTED_MODULES = ("deepspeed", "torch.distributed")
# model, losses, labels, pseudo labels, attention and data know nothing of devices or ranks
PLAIN_MODULES = ["model.py", "losses.py", "labels.py", "teacher.py", "attention.py", "data"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def python_files(*relative: str) -> list[Path]:
    files = []
    for name in relative:
        path = LIBRARY / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_only_the_backend_imports_deepspeed_or_torch_distributed():
    offenders = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        if path.is_relative_to(LIBRARY / "backend"):
            continue
        found = {name for name in imported_modules(path)
                 if any(name == m or name.startswith(m + ".") for m in DISTRIBUTED_MODULES)}
        if found:
            offenders[str(path.relative_to(REPO))] = sorted(found)
    assert offenders == {}


def test_model_losses_and_data_know_no_backend():
    offenders = {str(p.relative_to(REPO)): sorted(n for n in imported_modules(p) if n.startswith("dualner.backend"))
                 for p in python_files(*PLAIN_MODULES)}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_accelerator_process_group_serves_host_and_device_tensors():
    assert process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"


_WORKER = textwrap.dedent('''
    import os, sys, types, torch
    sys.path.insert(0, {repo!r})
    from dualner.backend import comm
    info = comm.init_distributed()
    # the helper the first GPU run failed in (dualner/distributed.py at 85b3f97), verbatim
    legacy = types.ModuleType("dualner.distributed")
    exec(
        "import torch\\n"
        "import torch.distributed as dist\\n"
        "def all_reduce_sum(tensor):\\n"
        "    if dist.is_initialized():\\n"
        "        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)\\n"
        "    return tensor\\n", legacy.__dict__)
    audited = os.environ["DUALNER_STRICT_COLLECTIVES"] == "1"
    assert ("collective_audit" in sys.modules) == audited  # a run without the switch never loads it
    if audited:
        from collective_audit import CollectiveDeviceError
    else:
        class CollectiveDeviceError(Exception):
            pass
    try:
        legacy.all_reduce_sum(torch.cat([torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)]))
        print("LEGACY accepted")
    except CollectiveDeviceError as error:
        print("LEGACY refused:", error)
    try:  # inside comm, but with a tensor none of its buffer builders made
        exec("dist.all_reduce(torch.zeros(2))", comm.__dict__)
        print("UNPLACED accepted")
    except CollectiveDeviceError as error:
        print("UNPLACED refused:", error)
    assert comm.host_all_reduce([info.rank + 1.0], "sum") == [3.0]
    reduced = comm.device_all_reduce([torch.tensor(float(info.rank)), torch.ones(2)], torch.device("cpu"))
    assert reduced.tolist() == [1.0, 2.0, 2.0], reduced
    pending = comm.PendingHostReduce([float(info.rank)], "max")
    assert pending.result() == [1.0]
    assert comm.all_gather_objects(info.rank) == [0, 1]
    print("COMM ok", info.rank)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a collective end: at interpreter exit gloo can abort a rank
''')


@pytest.mark.parametrize("strict", [True, False])
def test_strict_collectives_refuse_the_first_gpu_runs_bug(tmp_path, strict):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(repo=str(REPO)))
    env = child_env(**({"DUALNER_STRICT_COLLECTIVES": "1"} if strict else {"DUALNER_STRICT_COLLECTIVES": "0"}))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", str(script)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("COMM ok") == 2
    if strict:
        assert result.stdout.count("LEGACY refused") == 2 and "dualner.backend.comm" in result.stdout
        assert result.stdout.count("UNPLACED refused") == 2 and "did not place" in result.stdout
    else:  # gloo itself takes the CPU tensor: only the audit catches what NCCL would refuse
        assert result.stdout.count("LEGACY accepted") == 2 and result.stdout.count("UNPLACED accepted") == 2


_SKIP_WORKER = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, {repo!r})
    from dualner.backend import comm
    from dualner.backend.deepspeed_engine import DeepSpeedTrainingEngine, load_deepspeed_config
    from dualner.config import TrainConfig
    from dualner.data.batching import derive_batch_layout
    from dualner.encoders import resolve_encoder
    from tests.conftest import stage1_losses
    from dualner.model import DualNERModel
    comm.init_distributed()
    torch.manual_seed(0)
    train = TrainConfig(global_batch_size=4, micro_batch_size=4, lr=1e-2, warmup_steps=0)
    ds_config = load_deepspeed_config({repo!r} + "/ds_configs/{config}", derive_batch_layout(train, 1))
    engine = DeepSpeedTrainingEngine(DualNERModel.from_pretrained_encoder(resolve_encoder("tiny-random"), 3),
                                     ds_config, train, total_steps=10)
    ids = torch.randint(5, 200, (4, 12))
    labels = torch.randint(0, 4, ids.shape)
    def weights():
        return torch.cat([p.detach().float().reshape(-1).clone() for p in engine.module.parameters()])
    def step(poison):
        loss = stage1_losses(engine(ids, attention_mask=torch.ones_like(ids)),
                             dict(seq_labels=labels, start_labels=labels, end_labels=labels))["total"]
        bad = engine.backward(loss * float("nan") if poison else loss)
        engine.optimizer_step()
        return bad.item(), engine.last_step_flag.item()
    before = weights()
    print("FINITE", step(False), bool((weights() != before).any()))
    before = weights()
    print("NAN", step(True), bool(torch.equal(weights(), before)), bool(torch.isfinite(weights()).all()))
    before = weights()
    print("AFTER", step(False), bool((weights() != before).any()), bool(torch.isfinite(weights()).all()))
''')


@pytest.mark.parametrize("config", ["zero0_fp32.json", "zero2_fp32.json", "zero0.json"])
def test_a_nonfinite_step_is_skipped_on_the_device(tmp_path, tiny_encoder, config):
    """The fused optimizer skips the step whose loss was not finite (weights bit-for-bit unchanged),
    with no host synchronisation to decide it, and the next step trains again."""
    script = tmp_path / "skip.py"
    script.write_text(_SKIP_WORKER.format(repo=str(REPO), config=config))
    result = subprocess.run([sys.executable, str(script)], env=child_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "FINITE (0.0, 0.0) True" in result.stdout
    assert "NAN (1.0, 1.0) True True" in result.stdout
    assert "AFTER (0.0, 0.0) True True" in result.stdout
