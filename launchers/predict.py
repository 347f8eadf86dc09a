"""Entities for new text: plain text (one pre-tokenized sentence per line), CoNLL or JSONL in,
JSONL with word offsets, type and score out. CPU or GPU, batched, span head by default.

    python launchers/predict.py --model exported/ --input sentences.txt --output entities.jsonl
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dualner.predict import predict_file

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an exported folder, or a run / step-N folder")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--head", choices=["span", "seq"], default="span")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    args = parser.parse_args()
    count = predict_file(args.model, args.input, args.output, args.head, args.batch_size, args.device)
    print(f"{count} sentences -> {args.output}")
