"""Padding efficiency (real tokens / tokens computed) with and without length bucketing.

    python bench/padding.py            # the e5-small tokenizer on the English train split and 19 targets
    python bench/padding.py --smoke    # tiny tokenizer on the embedded sample (CI)

Stage 1: one epoch of the English training windows cut into micro batches by the trainer's
BatchPlan, with bucketing (sorted within pools of 50 micro batches, the default) and without (pools
of one micro batch: random batches, what a plain shuffled DataLoader gives). Stage 2: the streaming
loader's micro batches over English + the target languages, length pools of 2,048 sentences (default)
against no pooling. A micro batch computes rows x its longest row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stage2_costs import mixed_stream, write_result  # noqa: E402


def efficiency(batches_lengths: list[list[int]]) -> dict:
    real = sum(sum(lengths) for lengths in batches_lengths)
    computed = sum(len(lengths) * max(lengths) for lengths in batches_lengths)
    return {"micro_batches": len(batches_lengths), "real_tokens": real, "computed_tokens": computed,
            "efficiency": real / computed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="multilingual-e5-small")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "panx"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--stream-batches", type=int, default=500)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "padding.json"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.encoder, args.data_root, args.stream_batches = "tiny-random", str(REPO / "data" / "panx-sample"), 20

    from transformers import AutoTokenizer
    from dualner.config import Stage2Config
    from dualner.data.batching import bucketed_micro_batches
    from dualner.data.conll import read_conll
    from dualner.data.encoding import SentenceEncoder
    from dualner.encoders import resolve_encoder
    from dualner.labels import LabelSet

    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder(args.encoder))
    encoder = SentenceEncoder(tokenizer, LabelSet(("LOC", "ORG", "PER")), 128)
    root = Path(args.data_root)
    rows = encoder.encode(read_conll(root / "en" / "train.tsv", "en"))
    lengths = [len(ids) for ids in rows["input_ids"]]
    stage1 = {}
    for name, pool_batches in (("bucketed", 50), ("random", 1)):
        batches = bucketed_micro_batches(lengths, args.batch, seed=0, epoch=0, pool_batches=pool_batches)
        stage1[name] = efficiency([[lengths[i] for i in batch] for batch in batches])

    stage2 = {}
    for name, pool in (("pooled", Stage2Config().bucket_pool), ("unpooled", 0)):
        languages, stream = mixed_stream(root, encoder, args.batch, pool)
        stage2[name] = efficiency([stream.next_batch()["attention_mask"].sum(1).tolist()
                                   for _ in range(args.stream_batches)])
    result = {"command": "python bench/padding.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "encoder": args.encoder, "batch": args.batch, "stage1_english_epoch": stage1,
              "stage2_stream": {**stage2, "languages": languages}}
    write_result(args.output, result)
    print(f"stage 1: bucketed {stage1['bucketed']['efficiency']:.3f} vs random {stage1['random']['efficiency']:.3f}; "
          f"stage 2: pooled {stage2['pooled']['efficiency']:.3f} vs unpooled {stage2['unpooled']['efficiency']:.3f}")


if __name__ == "__main__":
    main()
