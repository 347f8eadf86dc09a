"""Stage 1: train the dual-head model on labeled source data.

    deepspeed launchers/stage1.py --config configs/quickstart.yaml [key=value ...]
    torchrun --nproc_per_node 2 launchers/stage1.py --config configs/tiny.yaml
    python launchers/stage1.py --config configs/tiny.yaml train.max_steps=20
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dualner.cli import parse_training_args
from dualner.stage1 import run_stage1

if __name__ == "__main__":
    run_stage1(parse_training_args(__doc__.splitlines()[0]))
