"""Packed rows against one window per row on the device at hand (the CPU tests prove it in fp32; this
runs the GPU's kernels), as a check that fails: exit status 1 and the failed checks listed when a
tolerance is exceeded, 0 when every check passes.

    python bench/packing_check.py --encoder /tmp/enc/xlmr-base --output check.json
    python bench/packing_check.py --inject attention     # a real packing bug: the check must fail

Checked (fp32, packed vs unpacked, window by window):
- forward in eval mode: hidden states and the three heads' logits, max |difference| <= 1e-4;
  the device-built pseudo labels agree exactly;
- train mode without dropout (`model.dropout=0`, `model.encoder_dropout=0`): the three stage-1 loss
  terms (|difference| <= 1e-4) and the gradient of every parameter (max |difference| <= 1e-4 x
  max(1, max |gradient|) per parameter).
Recorded, not asserted: bf16 through each attention path (bf16 logits of near-ties may flip an argmax
between layouts). `--inject` (or DUALNER_PACKING_CHECK_INJECT) plants a bug in the packed path only,
so the tests can prove the check fails: `attention` lets each pair of neighbouring segments of a row
attend to each other, `positions` stops position ids restarting at each segment.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import SHARED_DATA, device_facts, stage1_losses, write_result  # noqa: E402

FP32_TOLERANCE = 1e-4
INJECTIONS = ("none", "attention", "positions")


def inject(kind: str, packed: dict) -> None:
    """Plant a packing bug in the packed path (never in the unpacked reference)."""
    if kind == "attention":
        from dualner import attention
        correct = attention.block_diagonal_mask

        def leaky(segment_ids):  # segments 2k and 2k+1 see each other: attention crosses windows
            return correct(segment_ids.div(2, rounding_mode="floor"))
        attention.block_diagonal_mask = leaky
    elif kind == "positions":
        packed["position_ids"] = packed["position_ids"] + (packed["segment_ids"] % 2 == 1).long()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="tiny-random")
    parser.add_argument("--data", default=str(SHARED_DATA / "en" / "train.tsv"))
    parser.add_argument("--sentences", type=int, default=96)
    parser.add_argument("--inject", choices=INJECTIONS, default=os.environ.get("DUALNER_PACKING_CHECK_INJECT", "none"))
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "packing_check.json"))
    args = parser.parse_args(argv)

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
    model = DualNERModel.from_pretrained_encoder(folder, 3, dropout=0.0, encoder_dropout=0.0).to(device).eval()
    with torch.no_grad():
        for head in (model.seq_head, model.start_head, model.end_head):
            head.weight.normal_(std=0.5)  # decided predictions, so pseudo labels are not all "O"
    padded = to_device(Collator(tokenizer.pad_token_id, packed=False)(windows), device)
    packed = to_device(Collator(tokenizer.pad_token_id, row_length=128, position_offset=model.position_offset)(windows),
                       device)
    inject(args.inject, packed)

    def per_window(batch, values):
        segments = batch["segment_ids"]
        return {(batch["meta"]["sentence_id"][s], batch["meta"]["word_offset"][s]): values[segments == s].float()
                for s in range(batch["num_segments"])}

    def max_difference(a, b):
        first, second = per_window(packed, a), per_window(padded, b)
        return max(float((first[k] - second[k]).abs().max()) for k in second)

    failures: list[str] = []
    result = {"command": "python bench/packing_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
              **device_facts(), "encoder": args.encoder, "windows": len(windows), "inject": args.inject,
              "varlen_available": attention.varlen_available(), "tolerance_fp32": FP32_TOLERANCE,
              "packed_shape": list(packed["input_ids"].shape), "padded_shape": list(padded["input_ids"].shape),
              "max_abs_difference": {}}
    # first, while the weights are still the fp32 ones (the bf16 pass below rounds them)
    failures += train_mode_gradients(model, packed, padded, result, torch, stage1_losses, model_inputs)
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
                    if dtype == torch.float32:
                        failures.append(f"{name}: the packed forward failed: {error!r}")
                    continue
                differences = {field: max_difference(getattr(outputs, field), getattr(reference, field))
                               for field in ("hidden_states", "seq_logits", "start_logits", "end_logits")}
                result["max_abs_difference"][name] = differences
                pseudo = [build_pseudo_labels(o, b["word_index"], b["segment_ids"], b["num_segments"], labels)
                          for o, b in ((outputs, packed), (reference, padded))]
                mismatches = sum(
                    int((torch.cat(list(per_window(packed, getattr(pseudo[0], f)).values()))
                         != torch.cat([per_window(padded, getattr(pseudo[1], f))[k]
                                       for k in per_window(packed, getattr(pseudo[0], f))])).sum())
                    for f in ("seq_labels", "start_labels", "end_labels"))
                result[f"pseudo_label_mismatches_{name}"] = mismatches
                result[f"pseudo_entities_{name}"] = float(pseudo[0].entities_per_segment.sum())
                result.setdefault("forward_ms", {})[name] = 1000 * (time.perf_counter() - started)
                if dtype == torch.float32:
                    failures += [f"{name} forward (eval): {field} differ by {value:.2e} > {FP32_TOLERANCE:.0e}"
                                 for field, value in differences.items() if not value <= FP32_TOLERANCE]
                    if mismatches:
                        failures.append(f"{name} forward (eval): {mismatches} pseudo labels differ (fp32 must agree)")
        model.attention_mode = "auto"
    result["failures"] = failures
    result["passed"] = not failures
    write_result(args.output, result)
    print({k: v for k, v in result.items()
           if k.startswith(("max_abs", "train_mode", "pseudo_label_mismatches", "varlen", "errors"))})
    if failures:
        print(f"packing check FAILED ({len(failures)}):\n  " + "\n  ".join(failures[:20]), file=sys.stderr)
        return 1
    print("packing check passed")
    return 0


def train_mode_gradients(model, packed, padded, result, torch, stage1_losses, model_inputs) -> list[str]:
    """fp32, train mode, no dropout (the model was built with none): the stage-1 loss terms and the
    gradient of every parameter, packed against unpacked."""
    model.to(torch.float32).train()
    model.attention_mode = "sdpa"  # fp32: the mask path (FlashAttention has no fp32 kernel)
    computed = []
    for batch in (packed, padded):
        model.zero_grad(set_to_none=True)
        losses = stage1_losses(model(**model_inputs(batch)), batch)
        losses["total"].backward()
        computed.append(({name: float(value) for name, value in losses.items()},
                         {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}))
    model.zero_grad(set_to_none=True)
    model.eval()
    model.attention_mode = "auto"
    (packed_losses, packed_grads), (padded_losses, padded_grads) = computed
    failures, worst = [], {"parameter": None, "difference": 0.0, "allowed": 0.0}
    loss_differences = {name: abs(packed_losses[name] - value) for name, value in padded_losses.items()}
    failures += [f"fp32 train mode: loss/{name} differs by {value:.2e} > {FP32_TOLERANCE:.0e}"
                 for name, value in loss_differences.items() if not value <= FP32_TOLERANCE]
    missing = sorted(set(padded_grads) ^ set(packed_grads))
    if missing:
        failures.append(f"fp32 train mode: gradients present in one layout only: {missing[:5]}")
    for name, reference in padded_grads.items():
        if name not in packed_grads:
            continue
        difference = float((packed_grads[name] - reference).abs().max())
        allowed = FP32_TOLERANCE * max(1.0, float(reference.abs().max()))
        if difference / allowed > worst["difference"] / max(worst["allowed"], 1e-30) or worst["parameter"] is None:
            worst = {"parameter": name, "difference": difference, "allowed": allowed}
        if not difference <= allowed:
            failures.append(f"fp32 train mode: gradient of {name} differs by {difference:.2e} > {allowed:.1e}")
    result["train_mode_fp32"] = {"loss_abs_difference": loss_differences, "parameters_compared": len(padded_grads),
                                 "worst_gradient": worst}
    return failures


if __name__ == "__main__":
    sys.exit(main())
