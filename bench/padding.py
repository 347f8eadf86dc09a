"""Padding efficiency (real tokens / tokens computed): packed rows, length bucketing, neither.

    python bench/padding.py            # the e5-small tokenizer on the English train split and 19 targets
    python bench/padding.py --smoke    # tiny tokenizer on the embedded sample (CI)

Stage 1: one epoch of the English training windows cut into micro batches by the trainer's
BatchPlan: packed (random micro batches, each packed into rows of 128 tokens, the default), padded
with bucketing (sorted within pools of 50 micro batches) and padded without (random batches, what a
plain shuffled DataLoader gives); and token batches (fixed 16 x 128 rows). Stage 2: the streaming
loader's micro batches over English + the target languages: packed, padded with length pools of
2,048 sentences, padded in stream order. A padded micro batch computes rows x its longest row, a
packed one rows x 128.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import SHARED_DATA, mixed_stream, write_result  # noqa: E402

ROW = 128


def efficiency(batches_lengths: list[list[int]], packed: bool = False, rows: int | None = None) -> dict:
    from dualner.data.packing import pack_rows
    real = sum(sum(lengths) for lengths in batches_lengths)
    if packed:  # the shape the Collator makes
        shapes = [pack_rows(lengths, ROW, rows) for lengths in batches_lengths]
        computed = sum(len(bins) * width for bins, width in shapes)
    else:
        computed = sum(len(lengths) * max(lengths) for lengths in batches_lengths)
    return {"micro_batches": len(batches_lengths), "real_tokens": real, "computed_tokens": computed,
            "efficiency": real / computed}


def stream_efficiency(stream, batches: int) -> dict:
    real = computed = 0
    for _ in range(batches):
        batch = stream.next_batch()
        real += batch["real_tokens"]
        computed += batch["input_ids"].numel()
    return {"micro_batches": batches, "real_tokens": real, "computed_tokens": computed, "efficiency": real / computed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="multilingual-e5-small")
    parser.add_argument("--data-root", default=str(SHARED_DATA))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--stream-batches", type=int, default=500)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "padding.json"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.encoder, args.data_root, args.stream_batches = "tiny-random", str(REPO / "data" / "panx-sample"), 20

    from transformers import AutoTokenizer
    from dualner.config import Stage2Config
    from dualner.data.batching import bucketed_micro_batches, token_micro_batches
    from dualner.data.packing import Collator
    from dualner.data.stream_spec import STREAM_META
    from dualner.data.conll import read_conll
    from dualner.data.encoding import WindowTokenizer
    from dualner.encoders import resolve_encoder
    from dualner.labels import LabelSet

    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder(args.encoder))
    encoder = WindowTokenizer(tokenizer, LabelSet(("LOC", "ORG", "PER")), 128)
    root = Path(args.data_root)
    rows = encoder.encode(read_conll(root / "en" / "train.tsv", "en"))
    lengths = [len(ids) for ids in rows["input_ids"]]
    stage1 = {}
    for name, pool_batches, packed in (("packed", 1, True), ("bucketed", 50, False), ("random", 1, False)):
        batches = bucketed_micro_batches(lengths, args.batch, seed=0, epoch=0, pool_batches=pool_batches)
        stage1[name] = efficiency([[lengths[i] for i in batch] for batch in batches], packed)
    token_batches = token_micro_batches(lengths, ROW, 16, seed=0, epoch=0)
    stage1["token_batches_16x128"] = efficiency([[lengths[i] for i in batch] for batch in token_batches], True, 16)

    stage2 = {}
    pad = tokenizer.pad_token_id
    for name, pool, collate in (
            ("packed", Stage2Config().bucket_pool, Collator(pad, row_length=ROW, meta_columns=STREAM_META)),
            ("pooled", Stage2Config().bucket_pool, Collator(pad, packed=False, meta_columns=STREAM_META)),
            ("unpooled", 0, Collator(pad, packed=False, meta_columns=STREAM_META))):
        languages, stream = mixed_stream(root, encoder, args.batch, pool, collate)
        stage2[name] = stream_efficiency(stream, args.stream_batches)
    result = {"command": "python bench/padding.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "encoder": args.encoder, "batch": args.batch, "stage1_english_epoch": stage1,
              "stage2_stream": {**stage2, "languages": languages}}
    write_result(args.output, result)
    print("stage 1: " + ", ".join(f"{k} {v['efficiency']:.3f}" for k, v in stage1.items()) + "; stage 2: "
          + ", ".join(f"{k} {v['efficiency']:.3f}" for k, v in stage2.items()))


if __name__ == "__main__":
    main()
