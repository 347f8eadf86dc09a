"""Stage 1: train the dual-head model on labeled source data.

    deepspeed launchers/stage1.py --config configs/quickstart.yaml [key=value ...]
    torchrun --nproc_per_node 2 launchers/stage1.py --config configs/tiny.yaml
    python launchers/stage1.py --config configs/tiny.yaml train.max_steps=20
"""

import sys
from pathlib import Path

try:
    import dualner  # noqa: F401  (installed: `pip install -e .`)
except ImportError:  # run from a clone without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualner.cli import launch

if __name__ == "__main__":
    launch("stage1")
