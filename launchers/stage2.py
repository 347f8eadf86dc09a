"""Stage 2: dual teaching from a stage-1 model over streamed unlabeled target text.

    deepspeed launchers/stage2.py --config configs/quickstart_stage2.yaml [key=value ...]
    torchrun --nproc_per_node 2 launchers/stage2.py --config configs/tiny_stage2.yaml
"""

import sys
from pathlib import Path

try:
    import dualner  # noqa: F401  (installed: `pip install -e .`)
except ImportError:  # run from a clone without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualner.cli import launch

if __name__ == "__main__":
    launch("stage2")
