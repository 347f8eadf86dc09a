"""Stage-1 step time of multilingual-e5-small on CPU with and without frozen word embeddings.

Both settings run in this one process on the same batches (quickstart data, micro batch 32, fp32 and
bf16 autocast), so the ratio is what the measurement reports.

    python bench/freeze_embeddings.py --steps 8
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoTokenizer

from dualner.data.conll import read_conll
from dualner.data.encoding import SentenceEncoder, collate
from dualner.encoders import resolve_encoder
from dualner.engine import build_optimizer
from dualner.config import TrainConfig
from dualner.labels import LabelSet
from dualner.losses import supervised_losses
from dualner.model import DualNERModel

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "panx-sample"


def seconds_per_step(encoder: str, batches, freeze: bool, dtype, steps: int) -> float:
    torch.manual_seed(0)
    model = DualNERModel.from_pretrained_encoder(encoder, 3)
    if freeze:
        model.freeze_word_embeddings()
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4))
    model.train()
    timings = []
    for step in range(steps + 1):
        batch = batches[step % len(batches)]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = supervised_losses(model(batch["input_ids"], batch["attention_mask"]), batch)["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step pays one-off allocation costs
            timings.append(time.perf_counter() - started)
    return sum(timings) / len(timings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--encoder", default="multilingual-e5-small")
    args = parser.parse_args()
    encoder = resolve_encoder(args.encoder)
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    sentences = read_conll(SAMPLE / "en" / "train.tsv", "en", max_sentences=32 * 4)
    rows = SentenceEncoder(tokenizer, LabelSet(("LOC", "ORG", "PER")), 128).encode(sentences).to_list()
    batches = [collate(rows[i:i + 32], tokenizer.pad_token_id) for i in range(0, len(rows), 32)]
    print(f"| precision | trainable embeddings s/step | frozen embeddings s/step | speed-up |")
    print("|---|---|---|---|")
    for name, dtype in (("fp32", torch.float32), ("bf16 autocast", torch.bfloat16)):
        full = seconds_per_step(encoder, batches, False, dtype, args.steps)
        frozen = seconds_per_step(encoder, batches, True, dtype, args.steps)
        print(f"| {name} | {full:.3f} | {frozen:.3f} | {full / frozen:.2f}x |")


if __name__ == "__main__":
    main()
