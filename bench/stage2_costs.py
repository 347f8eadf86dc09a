"""What stage 2 costs on top of stage 1, and whether its loader keeps up.

    python bench/stage2_costs.py                 # multilingual-e5-small, batch 32, bf16 ZeRO-0
    python bench/stage2_costs.py --smoke         # tiny random encoder, seconds (CI)

1. Step time: the stage-1 launcher runs N steps on English; the stage-2 launcher then runs N steps
   from it on the *same* English sentences (stage2.target={}, so every row is the same kind of
   labeled sentence) at the same batch. Stage 2 adds the teacher's forward pass, three pseudo-label
   losses and the MSE term to stage 1's forward + backward: about 1.33x is the bound.
   Both timings come from the launchers' losses.jsonl (seconds per step after the warm-up window).
2. Loader: the streaming stage-2 loader alone (tokenizing, sharding, mixing the 19 target languages'
   train text plus labeled English, length pooling, batching) in sentences/s, against the sentences/s a
   stage-2 training step consumes (batch / step seconds of a TRGGold run).
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

TARGETS = ["ar", "de", "es", "et", "fa", "fi", "fr", "he", "hi", "id", "it", "ja", "ko", "nl", "pt", "ru", "tr",
           "vi", "zh"]


def timed_windows(run_dir: Path, warmup: int) -> dict:
    """Steps, seconds and real tokens a launcher logged after its first window (the warm-up; the
    runs log every `warmup` steps), from its losses.jsonl."""
    windows = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    timed = [w for w in windows if w["step"] > warmup]
    steps = warmup * len(timed)
    seconds = sum(w["throughput/step_seconds"] * warmup for w in timed)
    tokens = sum(w["throughput/tokens_per_step"] * warmup for w in timed)
    return {"steps": steps, "seconds": seconds, "tokens": tokens, "step_seconds": seconds / steps,
            "tokens_per_step": tokens / steps, "seconds_per_1k_tokens": 1000 * seconds / tokens}


def launch(stage: int, args, output: Path, *overrides: str) -> None:
    command = [sys.executable, str(REPO / "launchers" / f"stage{stage}.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
               f"run.output_dir={output}", f"model.encoder={args.encoder}", "model.freeze_word_embeddings=true",
               f"data.train.en={args.data_root}/en/train.tsv", f"data.max_train_sentences={args.sentences}",
               "data.dev={}", "data.test={}", "data.max_length=128",
               f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
               f"train.max_steps={args.steps}", f"train.log_every={args.warmup}", f"train.eval_every={args.steps}",
               "train.warmup_steps=0", f"deepspeed.config={args.ds_config}", "logging.tensorboard=false", *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def mixed_stream(root: Path, encoder, batch: int, pool: int):
    """The stage-2 loader over labeled English and every target language's train text, weighted as
    stage 2 weights them (source 1, the targets sharing 1)."""
    from dualner.data.streaming import KIND_SOURCE, KIND_TARGET, Stage2Stream, make_shards
    targets = [lang for lang in TARGETS if (root / lang / "train.tsv").is_file()]
    sources = [(make_shards([str(root / "en" / "train.tsv")], "en", KIND_SOURCE, 1, 0), 1.0)]
    sources += [(make_shards([str(root / lang / "train.tsv")], lang, KIND_TARGET, 1, 0), 1.0 / len(targets))
                for lang in targets]
    return ["en", *targets], Stage2Stream(sources, encoder, batch, seed=0, rank=0, pool=pool, workers=0)


def write_result(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def loader_rate(args, batches: int) -> dict:
    from transformers import AutoTokenizer
    from dualner.config import Stage2Config
    from dualner.data.encoding import SentenceEncoder
    from dualner.encoders import resolve_encoder
    from dualner.labels import LabelSet
    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder(args.encoder))
    encoder = SentenceEncoder(tokenizer, LabelSet(("LOC", "ORG", "PER")), 128)
    languages, stream = mixed_stream(Path(args.data_root), encoder, args.batch, pool=Stage2Config().bucket_pool)
    stream.next_batch()  # opens files and fills the first pool
    sentences, started = 0, time.perf_counter()
    for _ in range(batches):
        sentences += stream.next_batch()["meta"]["word_offset"].count(0)
    elapsed = time.perf_counter() - started
    return {"languages": languages, "sentences": sentences, "seconds": elapsed,
            "sentences_per_s": sentences / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="multilingual-e5-small")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "panx"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=2000, help="English sentences both stages train on")
    parser.add_argument("--loader-batches", type=int, default=300)
    parser.add_argument("--ds-config", default="ds_configs/zero0.json")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "stage2_costs.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny random encoder on the embedded sample")
    args = parser.parse_args()
    if args.smoke:
        args.encoder, args.steps, args.warmup, args.batch, args.loader_batches = "tiny-random", 6, 2, 8, 20
        args.data_root, args.ds_config, args.sentences = str(REPO / "data" / "panx-sample"), "ds_configs/zero0_fp32.json", 200
    with tempfile.TemporaryDirectory() as folder:
        stage1_dir, stage2_dir, trggold_dir = Path(folder, "stage1"), Path(folder, "stage2"), Path(folder, "trggold")
        launch(1, args, stage1_dir)
        launch(2, args, stage2_dir, f"stage2.init_from={stage1_dir}", "stage2.target={}")
        root = Path(args.data_root)
        targets = ",".join(f"{lang}: {root / lang / 'train.tsv'}" for lang in TARGETS if (root / lang / "train.tsv").is_file())
        launch(2, args, trggold_dir, f"stage2.init_from={stage1_dir}", f"stage2.target={{{targets}}}")
        stage1, stage2, trggold = (timed_windows(d, args.warmup) for d in (stage1_dir, stage2_dir, trggold_dir))
    loader = loader_rate(args, args.loader_batches)
    consumed = args.batch / trggold["step_seconds"]
    result = {"command": "python bench/stage2_costs.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "encoder": args.encoder, "batch": args.batch, "ds_config": args.ds_config,
              "stage1": stage1, "stage2_same_sentences": stage2, "stage2_trggold": trggold,
              "step_ratio": stage2["step_seconds"] / stage1["step_seconds"],
              "per_token_ratio": stage2["seconds_per_1k_tokens"] / stage1["seconds_per_1k_tokens"],
              "loader": loader, "training_consumes_sentences_per_s": consumed,
              "loader_over_consumption": loader["sentences_per_s"] / consumed}
    write_result(args.output, result)
    print(f"stage 2 / stage 1 step time {result['step_ratio']:.2f}x (per token {result['per_token_ratio']:.2f}x); "
          f"loader {loader['sentences_per_s']:.0f} sentences/s vs {consumed:.1f} consumed: "
          f"{result['loader_over_consumption']:.0f}x -> {args.output}")


if __name__ == "__main__":
    main()
