"""Test F1 per language of a trained model, from a checkpoint folder of any ZeRO stage.

    python launchers/evaluate.py --checkpoint runs/x [--head seq] --data de=de/test.tsv ... --output f1.json
    torchrun --nproc_per_node 2 launchers/evaluate.py ...   (predictions gathered across ranks)
"""

import sys
from pathlib import Path

try:
    import dualner  # noqa: F401  (installed: `pip install -e .`)
except ImportError:  # run from a clone without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualner.cli import launch

if __name__ == "__main__":
    launch("evaluate")
