"""Stage 2: dual teaching from a stage-1 model over streamed unlabeled target text.

    deepspeed launchers/stage2.py --config configs/quickstart_stage2.yaml [key=value ...]
    torchrun --nproc_per_node 2 launchers/stage2.py --config configs/tiny_stage2.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dualner.cli import parse_training_args
from dualner.stage2 import run_stage2

if __name__ == "__main__":
    run_stage2(parse_training_args(__doc__.splitlines()[0]))
