"""The run lock: one live run per output folder (`.dualner.lock`, dualner.run_layout)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from dualner.backend import comm
from dualner.errors import RunLockedError
from dualner.run_layout import RunLayout


@dataclass
class RunLock:
    """One live run per output folder. Rank 0 holds an exclusive lock on `.dualner.lock` (released by
    the kernel when the process dies, so a lock left by a killed run is stale and is taken over); the
    file names the holder (host, pid, start time, job). The ranks of one job are one run."""

    run_dir: Path
    _handle: object = None

    @property
    def path(self) -> Path:
        return RunLayout(self.run_dir).lock

    def acquire(self) -> str | None:
        """Take the lock; returns a message when a stale one was taken over; RunLockedError when a
        live run holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "{}"
            handle.close()
            raise self._locked(holder) from None
        handle.seek(0)
        previous = handle.read().strip()
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "job": os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")}))
        handle.flush()
        self._handle = handle
        return f"took over the lock of a run that ended without releasing it ({_describe(previous)})" if previous else None

    def probe(self) -> None:
        """RunLockedError when a live run holds the folder; reads only (creates nothing)."""
        try:
            handle = open(self.path, encoding="utf-8")
        except OSError:
            return  # no lock file: no live run
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise self._locked(handle.read().strip() or "{}") from None
            fcntl.flock(handle, fcntl.LOCK_UN)

    def _locked(self, holder: str) -> RunLockedError:
        return RunLockedError(f"run.output_dir={self.run_dir} is in use by another run ({_describe(holder)}); "
                              f"wait for it to finish, stop it, or choose another run.output_dir")

    def release(self) -> None:
        if self._handle is not None:
            self.path.unlink(missing_ok=True)
            self._handle.close()
            self._handle = None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
    except json.JSONDecodeError:
        return "unknown holder"
    return f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')}" + (
        f", job {info['job']}" if info.get("job") else "")


def take_lock(lock: RunLock, log=None) -> None:
    """Collective: rank 0 takes the run lock, every rank learns the outcome (and raises the same error)."""
    outcome = None
    if comm.current().is_main:
        try:
            outcome = ("ok", lock.acquire())
        except RunLockedError as error:
            outcome = ("locked", str(error))
    outcome = comm.broadcast_object(outcome)
    if outcome[0] == "locked":
        raise RunLockedError(outcome[1])
    if outcome[1] and log is not None:
        log.warning("%s: %s", lock.path, outcome[1])


def release_lock(lock: RunLock) -> None:
    """Every rank may call it; rank 0 holds the lock."""
    if comm.current().is_main:
        lock.release()
