"""Export a trained model (checkpoint of any ZeRO stage) to one Hugging Face model folder.

    python launchers/export.py --checkpoint runs/quickstart_stage2 --output exported/
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dualner.export import export_model

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run folder (its best) or a step-N folder")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    print(export_model(args.checkpoint, args.output))
