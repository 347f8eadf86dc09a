"""Packed rows against one window per row on the device at hand (the CPU tests prove it in fp32; this
runs the GPU's kernels): encoder outputs through each attention path, fp32 and bf16, and the
device-built pseudo labels.

    python bench/packing_check.py --encoder /tmp/enc/xlmr-base --output check.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import SHARED_DATA, device_facts, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="tiny-random")
    parser.add_argument("--data", default=str(SHARED_DATA / "en" / "train.tsv"))
    parser.add_argument("--sentences", type=int, default=96)
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "packing_check.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer
    from dualner import attention
    from dualner.backend.comm import accelerator_device
    from dualner.backend.placement import to_device
    from dualner.data.conll import read_conll
    from dualner.data.encoding import WindowTokenizer
    from dualner.data.packing import Collator, model_inputs
    from dualner.encoders import resolve_encoder
    from dualner.labels import LabelSet
    from dualner.model import DualNERModel
    from dualner.teacher import build_pseudo_labels

    device = accelerator_device(0)
    folder = resolve_encoder(args.encoder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    labels = LabelSet(("LOC", "ORG", "PER"))
    windows = WindowTokenizer(tokenizer, labels, 128).encode(
        read_conll(args.data, "en", max_sentences=args.sentences)).to_list()
    torch.manual_seed(0)
    model = DualNERModel.from_pretrained_encoder(folder, 3).to(device).eval()
    with torch.no_grad():
        for head in (model.seq_head, model.start_head, model.end_head):
            head.weight.normal_(std=0.5)  # decided predictions, so pseudo labels are not all "O"
    padded = to_device(Collator(tokenizer.pad_token_id, packed=False)(windows), device)
    packed = to_device(Collator(tokenizer.pad_token_id, row_length=128, position_offset=model.position_offset)(windows),
                       device)

    def per_window(batch, values):
        segments = batch["segment_ids"]
        return {(batch["meta"]["sentence_id"][s], batch["meta"]["word_offset"][s]): values[segments == s].float()
                for s in range(batch["num_segments"])}

    def max_difference(a, b):
        first, second = per_window(packed, a), per_window(padded, b)
        return max(float((first[k] - second[k]).abs().max()) for k in second)

    result = {"command": "python bench/packing_check.py " + " ".join(sys.argv[1:]), **device_facts(),
              "encoder": args.encoder, "windows": len(windows), "varlen_available": attention.varlen_available(),
              "packed_shape": list(packed["input_ids"].shape), "padded_shape": list(padded["input_ids"].shape),
              "max_abs_difference": {}}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        with torch.no_grad():
            reference = model(**model_inputs(padded))
            for mode in ("sdpa", "varlen"):
                if mode == "varlen" and (dtype == torch.float32 or not attention.varlen_available()):
                    continue  # FlashAttention has no fp32 kernel
                model.attention_mode = mode
                name = f"{str(dtype).removeprefix('torch.')}_{mode}"
                started = time.perf_counter()
                try:
                    outputs = model(**model_inputs(packed))
                except Exception as error:  # noqa: BLE001 (recorded: the GPU check goes on)
                    result.setdefault("errors", {})[name] = repr(error)
                    continue
                result["max_abs_difference"][name] = {
                    field: max_difference(getattr(outputs, field), getattr(reference, field))
                    for field in ("hidden_states", "seq_logits", "start_logits", "end_logits")}
                pseudo = [build_pseudo_labels(o, b["word_index"], b["segment_ids"], b["num_segments"], labels)
                          for o, b in ((outputs, packed), (reference, padded))]
                # bf16 logits of near-ties may flip an argmax between layouts; fp32 must agree exactly
                result[f"pseudo_label_mismatches_{name}"] = sum(
                    int((torch.cat(list(per_window(packed, getattr(pseudo[0], f)).values()))
                         != torch.cat([per_window(padded, getattr(pseudo[1], f))[k]
                                       for k in per_window(packed, getattr(pseudo[0], f))])).sum())
                    for f in ("seq_labels", "start_labels", "end_labels"))
                result[f"pseudo_entities_{name}"] = float(pseudo[0].entities_per_segment.sum())
                result.setdefault("forward_ms", {})[name] = 1000 * (time.perf_counter() - started)
        model.attention_mode = "auto"
    write_result(args.output, result)
    print({k: v for k, v in result.items() if k.startswith(("max_abs", "pseudo_label_mismatches", "varlen", "errors"))})


if __name__ == "__main__":
    main()
