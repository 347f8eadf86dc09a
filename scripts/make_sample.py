"""Cut the embedded data sample (data/panx-sample) from a full PAN-X layout, reproducibly.

    python scripts/make_sample.py --source ../shared/data/panx --output data/panx-sample
"""

import argparse
import random
from pathlib import Path

SIZES = {"en": {"train": 6000, "dev": 1000, "test": 1000}}
TARGET_SIZES = {"train": 2000, "dev": 500, "test": 500}
TARGETS = ["de", "es", "fr", "ru", "ar", "zh"]


def read_blocks(path: Path) -> list[str]:
    blocks = path.read_text(encoding="utf-8").split("\n\n")
    return [block.strip("\n") for block in blocks if block.strip()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    for language in ["en", *TARGETS]:
        for split, size in SIZES.get(language, TARGET_SIZES).items():
            blocks = read_blocks(args.source / language / f"{split}.tsv")
            chosen = sorted(random.Random(f"{args.seed}-{language}-{split}").sample(range(len(blocks)), size))
            out = args.output / language / f"{split}.tsv"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("\n\n".join(blocks[i] for i in chosen) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
