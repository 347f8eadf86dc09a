"""A private one-node Slurm cluster for the tests: Debian's slurm-wlm and munge (installed with
apt-get when missing), one munged, one slurmctld and one slurmd, all with their sockets, state, logs
and ports in a temporary folder, so nothing on the machine is touched or required beforehand.

`start_cluster(folder)` returns a `Cluster`, or raises `ClusterUnavailable` with the reason (no
root, no apt, a daemon that does not come up), which the tests turn into a skip that says so."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dualner.backend.comm import free_port

PROGRAMS = ("sbatch", "scontrol", "slurmctld", "slurmd", "munged")


class ClusterUnavailable(RuntimeError):
    pass



def _run(command: list[str], env: dict | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def ensure_installed() -> None:
    def missing() -> list[str]:
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        return [name for name in PROGRAMS if shutil.which(name, path=search) is None]
    if not missing():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"{missing()} not installed and no root apt-get to install slurm-wlm and munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        result = _run(command, env=env, timeout=900)
        if result.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(command)} failed: {result.stderr[-1500:]}")
    if missing():
        raise ClusterUnavailable(f"{missing()} still missing after installing slurm-wlm and munge")


@dataclass
class Cluster:
    folder: Path
    env: dict  # what sbatch/scontrol and the jobs need (SLURM_CONF)

    def command(self, *args: str, timeout: int = 60) -> str:
        result = _run(list(args), env=self.env, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result.stdout

    def job(self, job_id: int) -> dict[str, str]:
        text = self.command("scontrol", "show", "job", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}\n"
                           f"{self.logs()}")

    def wait_for_idle_node(self, timeout: float) -> None:
        """Until the node has finished with every job it ran (State=IDLE, not COMPLETING): a job
        released onto a node still tearing down its last run is killed ("Job credential revoked")."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if "State=IDLE" in self.command("scontrol", "show", "node", "-o"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"the node is not idle after {timeout} s: {self.command('scontrol', 'show', 'node', '-o')}")

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{(self.folder / name).read_text(errors='replace')[-3000:]}"
                         for name in ("slurmctld.log", "slurmd.log") if (self.folder / name).exists())

    def stop(self) -> None:
        _run(["scontrol", "shutdown"], env=self.env)
        time.sleep(1)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            path = self.folder / pid_file
            if path.exists():
                try:
                    os.kill(int(path.read_text().strip()), 15)
                except (ValueError, ProcessLookupError):
                    pass


def start_cluster(folder: Path, cpus: int = 4) -> Cluster:
    ensure_installed()
    os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # munge's socket must be reachable by every user
    for name in ("state", "spool"):
        (folder / name).mkdir(exist_ok=True)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = folder / "munge.socket"
    munged = _run(["munged", "--force", f"--socket={socket_path}", f"--key-file={key}",
                   f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
                   f"--seed-file={folder / 'munged.seed'}"])
    if munged.returncode != 0:
        raise ClusterUnavailable(f"munged did not start: {munged.stderr[-1500:]}")
    node = socket.gethostname().split(".")[0]
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
    config = folder / "slurm.conf"
    config.write_text(f"""\
ClusterName=dualner-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.pid'}
SlurmctldLogFile={folder / 'slurmctld.log'}
SlurmdLogFile={folder / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
InactiveLimit=0
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""", encoding="utf-8")
    env = {**os.environ, "SLURM_CONF": str(config)}
    cluster = Cluster(folder, env)
    for daemon in (["slurmctld", "-f", str(config)], ["slurmd", "-f", str(config), "-N", node]):
        result = _run(daemon, env=env)
        if result.returncode != 0:
            cluster.stop()
            raise ClusterUnavailable(f"{daemon[0]} did not start: {result.stderr[-1500:]}\n{cluster.logs()}")
    deadline = time.time() + 60
    while time.time() < deadline:
        state = _run(["sinfo", "-h", "-o", "%t"], env=env).stdout.strip()
        if state == "idle":
            return cluster
        time.sleep(1)
    cluster.stop()
    raise ClusterUnavailable(f"the node did not become idle (state {state!r})\n{cluster.logs()}")
