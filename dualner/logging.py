"""One rank-0 logger and one rank-0 TensorBoard writer; other ranks stay quiet."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from dualner.backend.comm import is_main_process

_LOGGER_NAME = "dualner"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record is emitted (not when the logger was made)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def get_logger() -> logging.Logger:
    logger = logging.getLogger(_LOGGER_NAME)
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s dualner %(levelname)s %(message)s",
                                               "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    return logger


class ScalarWriter:
    """TensorBoard scalars from rank 0; a no-op elsewhere or when disabled."""

    def __init__(self, log_dir: Path, enabled: bool = True, first_step: int = 1):
        """`first_step`: a resumed job's first step; TensorBoard hides the events an earlier job
        wrote from that step on (a crash's or a rewind's), so each step shows once."""
        self._writer = None
        if enabled and is_main_process():
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_step if first_step > 1 else None)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
