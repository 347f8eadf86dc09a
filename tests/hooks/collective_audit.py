"""Test support: the strict collective audit, installed by `DUALNER_STRICT_COLLECTIVES=1`
(tests/hooks/install.py; tests/conftest.py sets it for every launched job) as dualner.backend.comm is
imported; the package never imports this module.

CI has no GPU, where NCCL refuses a tensor on the wrong device; the audit refuses the same mistakes on
any machine. It wraps torch.distributed's tensor collectives: DeepSpeed's and torch's own calls pass
(they place their buffers themselves); a call from a `dualner` module must come from
dualner.backend.comm, with a buffer one of comm's buffer builders returned.
"""

from __future__ import annotations

import sys
import weakref

import torch
import torch.distributed as dist


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "reduce_scatter", "broadcast", "reduce", "all_to_all_single", "gather", "scatter")
BUFFER_BUILDERS = ("_host_buffer", "_device_buffer", "_in_place_buffer")
# Buffers comm's builders returned: id -> weak reference (tensors compare elementwise, not by identity)
_PLACED: dict[int, weakref.ref] = {}


class CollectiveDeviceError(RuntimeError):
    pass


def _remember(tensor: torch.Tensor) -> torch.Tensor:
    key = id(tensor)
    _PLACED[key] = weakref.ref(tensor, lambda _ref, key=key: _PLACED.pop(key, None))
    return tensor


def _was_placed(tensor: torch.Tensor) -> bool:
    reference = _PLACED.get(id(tensor))
    return reference is not None and reference() is tensor


def install_strict_audit(comm) -> None:
    """`comm`: the dualner.backend.comm module, just imported."""
    for name in BUFFER_BUILDERS:
        builder = getattr(comm, name)
        if not getattr(builder, "_dualner_audited", False):
            def remembered(*args, __builder=builder, **kwargs):
                return _remember(__builder(*args, **kwargs))
            remembered._dualner_audited = True
            setattr(comm, name, remembered)
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None or getattr(original, "_dualner_audited", False):
            continue

        def audited(*args, __original=original, __name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("dualner"):
                tensor = args[0] if args else next(iter(kwargs.values()), None)
                if caller != comm.__name__:
                    raise CollectiveDeviceError(
                        f"torch.distributed.{__name} called from {caller}: collectives go through "
                        f"dualner.backend.comm, which places their buffers on the right device")
                if isinstance(tensor, torch.Tensor) and not _was_placed(tensor):
                    raise CollectiveDeviceError(
                        f"torch.distributed.{__name} with a {tensor.device} tensor that "
                        f"dualner.backend.comm did not place (no backend type associated with it)")
            return __original(*args, **kwargs)

        audited._dualner_audited = True
        setattr(dist, name, audited)
