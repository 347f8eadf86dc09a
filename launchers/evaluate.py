"""Test F1 per language of a trained model, from a checkpoint folder of any ZeRO stage.

    python launchers/evaluate.py --checkpoint runs/x [--head seq] --data de=de/test.tsv ... --output f1.json
    torchrun --nproc_per_node 2 launchers/evaluate.py ...   (predictions gathered across ranks)
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from dualner.evaluate_checkpoint import evaluate_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a step-N folder, or a run/checkpoints folder (its best checkpoint)")
    parser.add_argument("--data", nargs="+", required=True, metavar="LANG=PATH")
    parser.add_argument("--output", help="JSON file for {per_language, average}")
    parser.add_argument("--head", choices=["span", "seq"], default="span")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-sentences", type=int, default=None, help="first N sentences per file")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = {}
    for item in args.data:
        language, separator, path = item.partition("=")
        if not separator or not language or not path:
            sys.exit(f"--data {item!r}: expected LANG=PATH")
        data[language] = path
    evaluate_checkpoint(args.checkpoint, data, args.output, args.head, args.batch_size, args.max_sentences)


if __name__ == "__main__":
    main()
