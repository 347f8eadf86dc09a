"""Fault injection for the hardening tests: `DUALNER_FAULT` makes a rank fail at a chosen point.

    DUALNER_FAULT=kill:rank=1:step=5           SIGKILL rank 1 as it starts step 5
    DUALNER_FAULT=kill_in_save:rank=0:step=4   SIGKILL rank 0 after the step-4 checkpoint's files are
                                               written and before it is marked complete
    DUALNER_FAULT=nan:rank=0:step=3            make rank 0's loss NaN in step 3
    DUALNER_FAULT=enospc_in_save:rank=0:step=4 the step-4 checkpoint's write fails: no space left

Unset (always, outside tests) every hook is a no-op.
"""

from __future__ import annotations

import os
import signal
from functools import lru_cache


@lru_cache(maxsize=1)
def _planned() -> tuple[str, int, int] | None:
    spec = os.environ.get("DUALNER_FAULT", "")
    if not spec:
        return None
    kind, *fields = spec.split(":")
    values = dict(field.split("=", 1) for field in fields)
    return kind, int(values["rank"]), int(values["step"])


def _due(kind: str, rank: int, step: int) -> bool:
    planned = _planned()
    return planned is not None and planned == (kind, rank, step)


def kill_if_due(kind: str, rank: int, step: int) -> None:
    if _due(kind, rank, step):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_if_due(rank: int, step: int) -> bool:
    return _due("nan", rank, step)


def disk_full_if_due(rank: int, step: int, path) -> None:
    if _due("enospc_in_save", rank, step):
        import errno
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
