import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import stage1_losses  # noqa: F401  (re-exported to the tests: the benchmarks' one copy)
from dualner.backend.comm import free_port  # noqa: F401  (re-exported to the tests)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "panx-sample"
# The test hooks the package does not carry (tests/hooks/install.py): in this process now, in every
# launched job through sitecustomize.py there (child_env puts the folder first on PYTHONPATH).
HOOKS = REPO / "tests" / "hooks"
sys.path.insert(0, str(HOOKS))
from install import install_hooks  # noqa: E402

install_hooks(os.environ)


@pytest.fixture(scope="session")
def tiny_encoder() -> str:
    from dualner.encoders import resolve_encoder
    return resolve_encoder("tiny-random")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_encoder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_encoder)


# The files that start the most launchers, longest first (the last CI run's --durations). scripts/test.sh
# hands whole files to two workers in collection order (--no-loadscope-reorder): the long files start
# first and the many short ones fill the end. xdist's own order (most tests first) left these, which
# have few tests, for last: one worker ran the quickstart or the fault tests alone at the end.
LONGEST_FILES_FIRST = ("test_faults.py", "test_elastic.py", "test_stage2_distributed.py", "test_fsdp2.py", "test_bench.py",
                       "test_quickstart.py", "test_reproduce.py", "test_slurm.py", "test_stage1_distributed.py",
                       "test_hardening.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DUALNER_FAULT")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a launched job: without this process's rendezvous variables (an
    in-process test may have set them, and their port is taken)."""
    env = {key: value for key, value in os.environ.items() if key not in DISTRIBUTED_VARIABLES}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    # Every launched job audits its collectives' devices (tests/hooks/collective_audit.py, tests/test_backend.py).
    launched = {**env, "OMP_NUM_THREADS": "1", "DUALNER_STRICT_COLLECTIVES": "1", **extra}
    launched["PYTHONPATH"] = os.pathsep.join(filter(None, (str(HOOKS), launched.get("PYTHONPATH"))))
    return launched


def launch(script: str, args: list[str], nproc: int = 1, timeout: int = 600,
           cwd: Path = REPO, expect: int = 0) -> subprocess.CompletedProcess:
    """Run a real launcher: torchrun with `nproc` ranks (gloo on CPU), or plain python for one;
    `expect` is its exit code (75: stopped before the last step, resumable)."""
    env = child_env(PYTHONPATH=str(REPO))
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   f"--master_port={free_port()}", str(REPO / script), *args]
    else:
        command = [sys.executable, str(REPO / script), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != expect and not (nproc > 1 and expect != 0 and result.returncode != 0):
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result
