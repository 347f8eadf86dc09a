"""Stage-1 training throughput against Hugging Face `Trainer` + `AutoModelForTokenClassification`.

    python bench/throughput_vs_hf.py                       # e5-small, 1,600 English sentences, fp32
    python bench/throughput_vs_hf.py --smoke               # tiny random encoder, seconds (CI)

Same encoder weights, same sentences (the first N of the English train split, one pass), same
batch, precision, trainable parameters and number of steps. Both run in their own process started
from this script, one after the other; each reports the real (non-padding) tokens of its steps after
the warm-up and the wall time of those steps, excluding start-up, evaluation and saving. Ours is the
real launcher (its per-window step timing in losses.jsonl); the baseline is `Trainer.train()` timed
by a callback, its tokens counted in its data collator. Ours also trains two more heads and losses.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stage2_costs import timed_windows, write_result  # noqa: E402


def english(args) -> tuple[list[list[str]], list[list[str]]]:
    from dualner.data.conll import read_conll
    sentences = read_conll(args.data, "en", max_sentences=args.steps * args.batch)
    return [s.words for s in sentences], [s.tags for s in sentences]


def run_hf(args) -> dict:
    """The baseline, as a user would write it from the token-classification example."""
    import torch
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, TrainerCallback, TrainingArguments)
    from dualner.encoders import resolve_encoder
    from dualner.labels import LabelSet
    torch.manual_seed(0)
    words, tags = english(args)
    label_set = LabelSet.from_tags([tag for sentence in tags for tag in sentence])
    folder = resolve_encoder(args.encoder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForTokenClassification.from_pretrained(
        folder, num_labels=label_set.num_bio_tags, id2label=dict(enumerate(label_set.bio_tags)),
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
    collator = DataCollatorForTokenClassification(tokenizer)
    tokens_per_batch: list[int] = []

    def counting_collator(features):
        batch = collator(features)
        tokens_per_batch.append(int(batch["attention_mask"].sum()))
        return batch

    step_ends: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            step_ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as output:
        training_args = TrainingArguments(
            output_dir=output, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-4,
            warmup_steps=0, save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, bf16=args.precision == "bf16", seed=0)
        Trainer(model=model, args=training_args, train_dataset=rows, data_collator=counting_collator,
                callbacks=[Clock()]).train()
    timed = slice(args.warmup, args.steps)
    return {"tokens": sum(tokens_per_batch[timed]), "seconds": step_ends[args.steps] - step_ends[args.warmup],
            "steps": args.steps - args.warmup}


def run_ours(args) -> dict:
    """The stage-1 launcher on the same sentences; timing from its losses.jsonl windows."""
    config = {"fp32": "ds_configs/zero0_fp32.json", "bf16": "ds_configs/zero0.json"}[args.precision]
    with tempfile.TemporaryDirectory() as output:
        command = [sys.executable, str(REPO / "launchers" / "stage1.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
                   f"run.output_dir={output}/run", f"model.encoder={args.encoder}",
                   f"model.freeze_word_embeddings={str(args.freeze_word_embeddings).lower()}",
                   f"data.train.en={args.data}", f"data.max_train_sentences={args.steps * args.batch}",
                   "data.dev={}", "data.test={}", f"data.max_length={args.max_length}",
                   f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
                   f"train.max_steps={args.steps}", f"train.log_every={args.warmup}", "train.lr=1e-4",
                   "train.warmup_steps=0", f"train.eval_every={args.steps}", f"deepspeed.config={config}",
                   "logging.tensorboard=false"]
        subprocess.run(command, cwd=REPO, check=True, capture_output=not args.verbose)
        timed = timed_windows(Path(output, "run"), args.warmup)
    return {"tokens": timed["tokens"], "seconds": timed["seconds"], "steps": timed["steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="multilingual-e5-small")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "panx" / "en" / "train.tsv"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed (also ours' log window)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--freeze-word-embeddings", action="store_true")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "throughput_vs_hf.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny random encoder on the embedded sample")
    parser.add_argument("--role", choices=["hf"], help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.encoder, args.steps, args.warmup, args.batch = "tiny-random", 6, 2, 8
        args.data = str(REPO / "data" / "panx-sample" / "en" / "train.tsv")
    if args.steps % args.warmup:
        raise SystemExit("--steps must be a multiple of --warmup (ours logs in windows of --warmup steps)")
    if args.role == "hf":
        print("RESULT " + json.dumps(run_hf(args)))
        return
    ours = run_ours(args)
    child = subprocess.run([sys.executable, __file__, "--role", "hf", *sys.argv[1:]], cwd=REPO, check=True,
                           capture_output=True, text=True)
    hf = json.loads(child.stdout.split("RESULT ", 1)[1])
    result = {"command": "python bench/throughput_vs_hf.py " + " ".join(sys.argv[1:]),
              "encoder": args.encoder, "sentences": args.steps * args.batch, "batch": args.batch,
              "precision": args.precision, "freeze_word_embeddings": args.freeze_word_embeddings,
              "timed_steps": args.steps - args.warmup, "date": time.strftime("%Y-%m-%d"),
              "ours": {**ours, "tokens_per_s": ours["tokens"] / ours["seconds"]},
              "hf_trainer": {"tokens": hf["tokens"], "seconds": hf["seconds"], "steps": hf["steps"],
                             "tokens_per_s": hf["tokens"] / hf["seconds"]}}
    result["speedup"] = result["ours"]["tokens_per_s"] / result["hf_trainer"]["tokens_per_s"]
    write_result(args.output, result)
    print(f"ours {result['ours']['tokens_per_s']:.0f} tokens/s, HF Trainer {result['hf_trainer']['tokens_per_s']:.0f} "
          f"tokens/s: {result['speedup']:.2f}x -> {args.output}")


if __name__ == "__main__":
    main()
