"""DeepSpeed's checkpoint files outside a training engine: how many ranks wrote one, its universal
form (what a resume on another number of ranks loads) and its consolidated fp32 weights, read
weights-only. The engine: dualner.backend.deepspeed_engine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from dualner.backend import comm
from dualner.errors import CheckpointError
from dualner.run_layout import COMPLETE_MARKER

UNIVERSAL = "universal"


def written_by_ranks(path: Path) -> int | None:
    """How many data-parallel ranks wrote a ZeRO (1-3) checkpoint; None for ZeRO-0 (whole states)."""
    optimizer_files = list(path.glob("*zero_pp_rank_*_optim_states.pt"))
    return len(optimizer_files) or None


def to_universal(path: Path) -> Path:
    """DeepSpeed's universal checkpoint (optimizer state included) of `path`, made once, inside it:
    what a run resumed on another number of ranks loads."""
    target = path / UNIVERSAL
    if comm.is_main_process() and not (target / COMPLETE_MARKER).is_file():
        shutil.rmtree(target, ignore_errors=True)
        # our client state lacks Megatron's universal_checkpoint_info: DeepSpeed injects a default
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(path), "--output_folder", str(target), "--num_extract_workers", "1",
                   "--num_merge_workers", "1", "--inject_missing_state"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise CheckpointError(f"{path}: cannot convert to a universal checkpoint for a resume on "
                                  f"another number of ranks:\n{result.stderr[-2000:]}")
        (target / COMPLETE_MARKER).write_text(json.dumps({"from": path.name}), encoding="utf-8")
    comm.barrier()
    return target


def _safe_deepspeed_globals() -> list:
    """The plain data holders DeepSpeed pickles into its checkpoint files (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on every ZeRO stage and precision)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def _weights_only_loads():
    """Make every torch.load inside (DeepSpeed's zero_to_fp32 hard-codes weights_only=False) a
    weights-only load that refuses to run code, with DeepSpeed's data holders allowed."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(_safe_deepspeed_globals()):
            yield
    finally:
        torch.load = original


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights from a checkpoint of any ZeRO stage, in one process. Files are read
    weights-only: a checkpoint cannot run code here (DeepSpeed's own resume, which needs its optimizer
    objects, still unpickles fully: resume checkpoints are trusted input)."""
    with _weights_only_loads():
        if list(checkpoint.glob("*zero_pp_rank_*optim_states.pt")) or list(
                checkpoint.glob("zero_pp_rank_*model_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        else:  # ZeRO-0: the module's own state dict sits in the model-states file
            files = sorted(checkpoint.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise CheckpointError(f"{checkpoint}: no DeepSpeed model states file")
            state = torch.load(files[0], map_location="cpu")["module"]
    return {name: tensor.float() for name, tensor in state.items()}
