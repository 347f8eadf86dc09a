"""Fault injection for the hardening tests: `DUALNER_FAULT` makes a rank fail at a chosen point.

    DUALNER_FAULT=kill:rank=1:step=5           SIGKILL rank 1 as it starts step 5
    DUALNER_FAULT=kill_in_save:rank=0:step=4   SIGKILL rank 0 after the step-4 checkpoint's files are
                                               written and before it is marked complete
    DUALNER_FAULT=nan:rank=0:step=3            make rank 0's loss NaN in step 3
    DUALNER_FAULT=enospc_in_save:rank=0:step=4 the step-4 checkpoint's write fails: no space left

Only a test reaches it (tests/hooks/install.py): the package never reads `DUALNER_FAULT`. Installed,
its value is checked before the job decides anything about its folder, so before anything is
written (`check`), and the assembled run is instrumented as it starts (`instrument`: its engine and
recipe wrapped).
"""

from __future__ import annotations

import os
import re
import signal
from functools import lru_cache

from dualner.errors import ConfigError
from dualner.run_layout import step_name

KINDS = ("kill", "kill_in_save", "nan", "enospc_in_save")
_SPEC = re.compile(r"^(?P<kind>[a-z_]+):rank=(?P<rank>\d+):step=(?P<step>\d+)$")


def parse(spec: str) -> tuple[str, int, int]:
    """`KIND:rank=R:step=S` -> (kind, rank, step); anything else is refused naming the variable."""
    match = _SPEC.match(spec.strip())
    if match is None or match["kind"] not in KINDS:
        raise ConfigError(f"DUALNER_FAULT={spec!r}: expected KIND:rank=R:step=S with KIND one of "
                          f"{', '.join(KINDS)} (a test hook)")
    return match["kind"], int(match["rank"]), int(match["step"])


@lru_cache(maxsize=1)
def planned() -> tuple[str, int, int] | None:
    spec = os.environ.get("DUALNER_FAULT", "")
    if not spec:
        return None
    return parse(spec)


def check() -> None:
    """Before anything is written: a fault asked for must be well formed."""
    planned.cache_clear()
    planned()


def check_before_the_folder_plan(plan_module) -> None:
    """dualner.run_folder.plan: `check` first whenever a job plans its folder."""
    plan_folder = plan_module.plan_folder

    def checked_plan_folder(*args, **kwargs):
        check()
        return plan_folder(*args, **kwargs)
    plan_module.plan_folder = checked_plan_folder


def instrument_on_resume(train_module) -> None:
    """dualner.train: the assembled run is instrumented as it starts (`Trainer.resume`)."""
    resume = train_module.Trainer.resume

    def instrumented_resume(trainer) -> None:
        instrument(trainer)
        resume(trainer)
    train_module.Trainer.resume = instrumented_resume


def instrument(trainer) -> None:
    """Wrap the assembled run's engine and recipe so the planned fault happens at its point. The
    training code itself carries no fault hooks."""
    fault = planned()
    if fault is None:
        return
    kind, rank, step = fault
    if rank != trainer.job.info.rank:
        return
    engine, recipe, progress = trainer.engine, trainer.recipe, trainer.progress
    if kind == "kill":  # as the rank starts step `step`
        begin_step = recipe.begin_step

        def killing_begin_step(starting: int) -> None:
            if starting == step:
                os.kill(os.getpid(), signal.SIGKILL)
            begin_step(starting)
        recipe.begin_step = killing_begin_step
    elif kind == "nan":  # every micro batch of step `step` has a NaN loss on this rank
        backward = engine.backward

        def poisoned_backward(loss):
            return backward(loss * float("nan") if progress.step + 1 == step else loss)
        engine.backward = poisoned_backward
    else:  # the checkpoint of step `step`: its files written, then the fault
        save = engine.save

        def failing_save(root, tag, client_state):
            save(root, tag, client_state)
            if tag != step_name(step):
                return
            if kind == "enospc_in_save":
                import errno
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / tag))
            os.kill(os.getpid(), signal.SIGKILL)  # kill_in_save: before the checkpoint is marked complete
        engine.save = failing_save
