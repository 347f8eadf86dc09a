"""Entities for new text: plain text (one pre-tokenized sentence per line), CoNLL or JSONL in,
JSONL with word offsets, type and score out. CPU or GPU, batched, span head by default.

    python launchers/predict.py --model exported/ --input sentences.txt --output entities.jsonl
"""

import sys
from pathlib import Path

try:
    import dualner  # noqa: F401  (installed: `pip install -e .`)
except ImportError:  # run from a clone without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualner.cli import launch

if __name__ == "__main__":
    launch("predict")
