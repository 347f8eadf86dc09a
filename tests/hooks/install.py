"""The test hooks, installed into the pytest process (tests/conftest.py) and into every launched job
(sitecustomize.py here), each as the module it wraps is imported:

    DUALNER_STRICT_COLLECTIVES=1       the collective audit (collective_audit.py): a collective issued
                                       from project code outside dualner.backend.comm, or with a buffer
                                       comm did not place, is refused as NCCL would refuse it
    DUALNER_FAULT=KIND:rank=R:step=S   a fault injected into the training run (fault_injection.py)

The hooks import the package only once it is being imported: at interpreter start-up it may not be
on the path yet (a launched script that puts it there itself).
"""

from __future__ import annotations

from types import ModuleType
from typing import Mapping

from after_import import after_import


def _audit(comm: ModuleType) -> None:
    from collective_audit import install_strict_audit
    install_strict_audit(comm)


def _check_faults(plan: ModuleType) -> None:
    from fault_injection import check_before_the_folder_plan
    check_before_the_folder_plan(plan)


def _inject_faults(train: ModuleType) -> None:
    from fault_injection import instrument_on_resume
    instrument_on_resume(train)


def install_hooks(environ: Mapping[str, str]) -> None:
    if environ.get("DUALNER_STRICT_COLLECTIVES") == "1":
        after_import("dualner.backend.comm", _audit)
    after_import("dualner.run_folder.plan", _check_faults)
    after_import("dualner.train", _inject_faults)
