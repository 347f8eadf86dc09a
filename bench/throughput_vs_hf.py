"""Stage-1 training throughput against Hugging Face `Trainer` + `AutoModelForTokenClassification`, on
the same device (the GPU when there is one, else the CPU).

    python bench/throughput_vs_hf.py                       # e5-small, English PAN-X, batch 32, fp32 (CPU)
    python bench/throughput_vs_hf.py --encoder DIR --batch 128 --precision bf16   # a GPU
    python bench/throughput_vs_hf.py --unit tokens --batch 16384 --no-baseline    # ours alone, 16k-token steps
    python bench/throughput_vs_hf.py --smoke               # tiny random encoder, seconds (CI)

    python bench/throughput_vs_hf.py --hf both --reps 3 # interleaved repetitions, default and tuned HF

Same encoder weights, same English sentences (the first N of the train split, in order, as many
passes as the steps need), same batch, precision, trainable parameters and number of steps. Each
run is its own process started from this script; with --reps N the runs interleave (ours, HF
default, HF tuned, ours, ...) and every ratio is the median of the N paired ratios, with min and max.
Each run reports the real (non-padding) tokens of its steps after the warm-up and the wall time of
those steps, excluding start-up, evaluation and saving. Ours is the real launcher (its per-window
step timing in losses.jsonl, where every window ends with a device synchronisation); the baseline is
`Trainer.train()` timed by a callback that synchronises the GPU at the two step ends it reads, its
tokens counted at the model's forward. The baseline as the token-classification example configures
it (`--hf default`: no loader workers, random batches padded to their longest row) or tuned as a
user would (`--hf tuned`: `dataloader_num_workers`, `group_by_length` (`train_sampling_strategy` in transformers 5), SDPA attention, and
padding-free `DataCollatorWithFlattening` batches with FlashAttention-2 where flash_attn is
installed; without it a flattened row would attend across sentences). Ours also trains two more
heads and losses. MFU: 6N FLOPs per real token (N: the encoder's non-embedding parameters as
trained, no pooler) against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (SHARED_DATA, device_facts, encoder_parameters, english_run, mfu, run_launcher,  # noqa: E402
                          timed_windows, today, write_result)

DS_CONFIGS = {"fp32": "ds_configs/zero0_fp32.json", "bf16": "ds_configs/zero0.json"}


def english(args) -> tuple[list[list[str]], list[list[str]]]:
    from dualner.data.conll import read_conll
    sentences = read_conll(args.data, "en", max_sentences=args.steps * args.batch)
    return [s.words for s in sentences], [s.tags for s in sentences]


def run_hf(args) -> dict:
    """The baseline, as a user would write it from the token-classification example."""
    import torch
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments)
    from dualner.encoders import resolve_encoder
    from dualner.labels import LabelSet
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    words, tags = english(args)
    label_set = LabelSet.from_tags([tag for sentence in tags for tag in sentence])
    folder = resolve_encoder(args.encoder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForTokenClassification.from_pretrained(
        folder, num_labels=len(label_set.bio_tags), id2label=dict(enumerate(label_set.bio_tags)),
        label2id={t: i for i, t in enumerate(label_set.bio_tags)})
    if args.freeze_word_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    rows = []
    for sentence_words, sentence_tags in zip(words, tags):
        encoded = tokenizer(sentence_words, is_split_into_words=True, truncation=True, max_length=args.max_length)
        labels, previous = [], None
        for word in encoded.word_ids():
            labels.append(-100 if word is None or word == previous else label_set.tag_id(sentence_tags[word]))
            previous = word
        rows.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels})
    tuned = args.hf_variant == "tuned"
    flatten = tuned and cuda and _flash_attention_installed()
    if tuned:  # what a user tuning Trainer on this device would set (RESULTS: throughput section)
        model = AutoModelForTokenClassification.from_pretrained(
            folder, num_labels=len(label_set.bio_tags), attn_implementation="flash_attention_2" if flatten else "sdpa")
        if args.freeze_word_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
    # Padding-free batches (one row, position ids restarting per sentence) are only right with
    # FlashAttention's variable-length kernel: with SDPA or eager attention a BERT-family encoder
    # then attends across sentences (measured on CPU: logits 0.1 off), so on CPU the tuned
    # baseline pads, grouped by length.
    collator = DataCollatorWithFlattening() if flatten else DataCollatorForTokenClassification(tokenizer)
    tokens_per_batch: list = []

    def count_tokens(_module, _args, kwargs):  # in the training process (loader workers may collate)
        mask = kwargs.get("attention_mask")
        tokens_per_batch.append(mask.sum() if mask is not None else kwargs["input_ids"].numel())
    model.register_forward_pre_hook(count_tokens, with_kwargs=True)

    step_ends: list[float] = []

    class Clock(TrainerCallback):
        """Host time at the step ends the timing reads, after the GPU finished (else only the
        launches would be timed)."""

        def on_train_begin(self, *_, **__):
            step_ends.append(time.perf_counter())

        def on_step_end(self, _args, state, *_, **__):
            if cuda and state.global_step in (args.warmup, args.steps):
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as output:
        training_args = TrainingArguments(
            output_dir=output, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4,
            warmup_steps=0, save_strategy="no", logging_strategy="no", report_to=[], use_cpu=not cuda,
            dataloader_num_workers=(args.hf_workers if tuned else 0),
            # group_by_length=True in transformers 4; its successor in 5:
            train_sampling_strategy="group_by_length" if tuned else "random",
            bf16=args.precision == "bf16", seed=0)
        trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=collator,
                          callbacks=[Clock()])
        trainer.train()
    timed = slice(args.warmup, args.steps)
    result = {"tokens": int(sum(int(t) for t in tokens_per_batch[timed])),
              "seconds": step_ends[args.steps] - step_ends[args.warmup], "steps": args.steps - args.warmup,
              "device": str(trainer.args.device), "variant": args.hf_variant,
              "settings": {"dataloader_num_workers": training_args.dataloader_num_workers,
                           "sampling": training_args.train_sampling_strategy, "attention": model.config._attn_implementation,
                           "padding_free": flatten}}
    if cuda:
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def _flash_attention_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def run_hf_child(args, variant: str, parameters: dict, peak) -> dict:
    child = subprocess.run([sys.executable, __file__, "--role", "hf", "--hf-variant", variant, *sys.argv[1:]],
                           cwd=REPO, capture_output=True, text=True)
    if child.returncode != 0 or "RESULT " not in child.stdout:
        raise SystemExit(f"HF baseline ({variant}) failed:\n{child.stdout[-2000:]}\n{child.stderr[-4000:]}")
    hf = json.loads(child.stdout.split("RESULT ", 1)[1].splitlines()[0])
    hf.update(tokens_per_s=hf["tokens"] / hf["seconds"], step_seconds=hf["seconds"] / hf["steps"])
    hf["mfu"] = mfu(hf["tokens_per_s"], parameters, peak)
    return hf


def run_ours(args) -> dict:
    """The stage-1 launcher on the same sentences; timing from its losses.jsonl windows."""
    unit = ["train.batch_unit=tokens", f"data.pack_length={args.pack_length}"] if args.unit == "tokens" else []
    sentences = None if args.unit == "tokens" else args.steps * args.batch
    with tempfile.TemporaryDirectory() as output:
        run_launcher(1, REPO / "configs" / "tiny.yaml", [
            *english_run(f"{output}/run", args.encoder, args.data, sentences or None, args.max_length, args.batch,
                         args.steps, args.warmup, args.ds_config, micro=args.micro),
            f"model.freeze_word_embeddings={str(args.freeze_word_embeddings).lower()}", *unit, "train.lr=1e-4",
            *args.override], verbose=args.verbose)
        timed = timed_windows(Path(output, "run"), args.warmup)
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="multilingual-e5-small")
    parser.add_argument("--data", default=str(SHARED_DATA / "en" / "train.tsv"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed (also ours' log window)")
    parser.add_argument("--batch", type=int, default=32, help="sentences (or tokens with --unit tokens) per step")
    parser.add_argument("--micro", type=int, help="ours' micro batch (default: the batch)")
    parser.add_argument("--unit", choices=["sentences", "tokens"], default="sentences")
    parser.add_argument("--pack-length", type=int, default=128, help="ours' packed row length (token batches)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--ds-config", help="ours' DeepSpeed JSON (default: ZeRO-0 of the precision)")
    parser.add_argument("--freeze-word-embeddings", action="store_true")
    parser.add_argument("--no-baseline", action="store_true", help="ours alone")
    parser.add_argument("--override", action="append", default=[], help="a config override for ours")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "throughput_vs_hf.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny random encoder on the embedded sample")
    parser.add_argument("--hf", choices=["default", "tuned", "both"], default="default",
                        help="the baseline: Trainer as the example configures it, tuned (loader workers, "
                             "group_by_length, SDPA; padding-free FlashAttention batches where installed), or both")
    parser.add_argument("--hf-workers", type=int, default=2, help="the tuned baseline's dataloader_num_workers")
    parser.add_argument("--reps", type=int, default=1,
                        help="repetitions, interleaved (ours, baseline(s), ours, ...): medians and min-max")
    parser.add_argument("--role", choices=["hf"], help=argparse.SUPPRESS)
    parser.add_argument("--hf-variant", choices=["default", "tuned"], default="default", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.encoder, args.steps, args.warmup = "tiny-random", 6, 2
        args.batch = 512 if args.unit == "tokens" else 8
        args.pack_length = 64 if args.unit == "tokens" else args.pack_length
        args.data = str(REPO / "data" / "panx-sample" / "en" / "train.tsv")
    args.ds_config = args.ds_config or DS_CONFIGS[args.precision]
    if args.steps % args.warmup:
        raise SystemExit("--steps must be a multiple of --warmup (ours logs in windows of --warmup steps)")
    if args.unit == "tokens" and not args.no_baseline:
        raise SystemExit("--unit tokens measures ours alone (HF Trainer batches count sentences): add --no-baseline")
    if args.role == "hf":
        print("RESULT " + json.dumps(run_hf(args)))
        return
    facts, parameters = device_facts(), encoder_parameters(args.encoder)
    variants = [] if args.no_baseline else (["default", "tuned"] if args.hf == "both" else [args.hf])
    reps = []
    for _ in range(args.reps):  # interleaved: machine drift hits every side alike
        rep = {"load_average_1min_at_start": os.getloadavg()[0], "ours": run_ours(args)}
        rep["ours"]["mfu"] = mfu(rep["ours"]["tokens_per_s"], parameters, facts["peak_bf16_flops"])
        for variant in variants:
            rep[f"hf_{variant}"] = run_hf_child(args, variant, parameters, facts["peak_bf16_flops"])
            rep[f"speedup_{variant}"] = rep["ours"]["tokens_per_s"] / rep[f"hf_{variant}"]["tokens_per_s"]
        reps.append(rep)

    def median_run(key: str) -> dict:  # the repetition with the median rate (the lower middle one)
        ordered = sorted((rep[key] for rep in reps), key=lambda run: run["tokens_per_s"])
        return ordered[(len(ordered) - 1) // 2]

    def spread(values: list[float]) -> dict:
        ordered = sorted(values)
        return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "n": len(ordered)}

    ours = median_run("ours")
    result = {"command": "python bench/throughput_vs_hf.py " + " ".join(sys.argv[1:]), "date": today(),
              **facts, "encoder": args.encoder, "parameters": parameters, "unit": args.unit, "batch": args.batch,
              "precision": args.precision, "ds_config": args.ds_config,
              "freeze_word_embeddings": args.freeze_word_embeddings, "timed_steps": args.steps - args.warmup,
              "reps": reps, "ours": ours, "ours_tokens_per_s": spread([rep["ours"]["tokens_per_s"] for rep in reps])}
    line = f"ours {ours['tokens_per_s']:.0f} tokens/s ({1000 * ours['step_seconds']:.1f} ms/step)"
    for variant in variants:
        hf = median_run(f"hf_{variant}")
        ratio = spread([rep[f"speedup_{variant}"] for rep in reps])
        key = "hf_trainer" if variant == variants[0] else f"hf_trainer_{variant}"
        result[key] = hf
        result[f"hf_{variant}_tokens_per_s"] = spread([rep[f"hf_{variant}"]["tokens_per_s"] for rep in reps])
        result[f"speedup_{variant}"] = ratio
        if variant == variants[0]:
            result["speedup"] = ratio["median"]  # with one repetition: ours / HF of that run
        line += (f", HF Trainer ({variant}) {hf['tokens_per_s']:.0f} tokens/s on {hf['device']}: "
                 f"{ratio['median']:.2f}x [{ratio['min']:.2f}-{ratio['max']:.2f}] over {ratio['n']}")
    if ours["mfu"]:
        line += f"; MFU ours {100 * ours['mfu']['mfu']:.1f}%"
    write_result(args.output, result)
    print(f"{line} -> {args.output}")


if __name__ == "__main__":
    main()
