"""Export a trained model (checkpoint of any ZeRO stage) to one Hugging Face model folder.

    python launchers/export.py --checkpoint runs/quickstart_stage2 --output exported/
"""

import sys
from pathlib import Path

try:
    import dualner  # noqa: F401  (installed: `pip install -e .`)
except ImportError:  # run from a clone without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualner.cli import launch

if __name__ == "__main__":
    launch("export")
