"""What stage 2 costs on top of stage 1, and whether its loader keeps up.

    python bench/stage2_costs.py                 # multilingual-e5-small, batch 32, bf16 ZeRO-0, CPU recipe
    python bench/stage2_costs.py --encoder DIR --batch 128 --train-embeddings --steps 30   # a GPU
    python bench/stage2_costs.py --smoke         # tiny random encoder, seconds (CI)

1. Step time: the stage-1 launcher runs N steps on English; the stage-2 launcher then runs N steps
   from it on the *same* English sentences (stage2.target={}, so every row is the same kind of
   labeled sentence) at the same batch. Stage 2 adds the teacher's forward pass, three pseudo-label
   losses and the MSE term to stage 1's forward + backward: about 1.33x is the bound.
   Both timings come from the launchers' losses.jsonl (seconds per step after the warm-up window).
2. Loader: the streaming stage-2 loader alone (tokenizing, sharding, mixing the 19 target languages'
   train text plus labeled English, pooling, packing, batching; with the loader workers training
   uses, pinned where there is a GPU) in sentences/s, against the sentences/s a stage-2 training step
   consumes (windows per step / step seconds of a TRGGold run), and the share of that run's step time
   spent waiting for data.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (SHARED_DATA, TARGETS, device_facts, english_run, mixed_stream,  # noqa: E402
                          run_launcher, timed_windows, today, write_result)


def launch(stage: int, args, output: Path, *overrides: str) -> None:
    run_launcher(stage, REPO / "configs" / "tiny.yaml", [
        *english_run(output, args.encoder, f"{args.data_root}/en/train.tsv", args.sentences, 128, args.batch,
                     args.steps, args.warmup, args.ds_config),
        f"model.freeze_word_embeddings={str(not args.train_embeddings).lower()}", *overrides])


def loader_rate(args, batches: int) -> dict:
    from transformers import AutoConfig, AutoTokenizer
    from dualner.attention import position_offset
    from dualner.backend.comm import accelerator_device
    from dualner.config import Stage2Config
    from dualner.data.encoding import WindowTokenizer
    from dualner.data.loader import default_workers
    from dualner.data.packing import Collator
    from dualner.data.stream_spec import STREAM_META
    from dualner.encoders import resolve_encoder
    from dualner.labels import LabelSet
    folder = resolve_encoder(args.encoder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = WindowTokenizer(tokenizer, LabelSet(("LOC", "ORG", "PER")), 128)
    device = accelerator_device(0)
    workers = default_workers(args.loader_workers, device, 1)
    offset = position_offset(AutoConfig.from_pretrained(folder))
    collate = Collator(tokenizer.pad_token_id, packed=offset is not None, row_length=128,
                       position_offset=offset or 0, meta_columns=STREAM_META,
                       languages=("en", *TARGETS))
    languages, stream = mixed_stream(Path(args.data_root), encoder, args.batch, Stage2Config().bucket_pool,
                                     collate, workers=workers, pin_memory=device.type == "cuda")
    for _ in range(max(2, 2 * workers)):  # opens files, starts workers, fills the first pools
        stream.next_batch()
    windows, started = 0, time.perf_counter()
    for _ in range(batches):
        windows += stream.next_batch()["num_segments"]
    elapsed = time.perf_counter() - started
    del stream
    return {"languages": languages, "workers": workers, "pinned": device.type == "cuda", "windows": windows,
            "seconds": elapsed, "windows_per_s": windows / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="multilingual-e5-small")
    parser.add_argument("--data-root", default=str(SHARED_DATA))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sentences", type=int, default=2000, help="English sentences both stages train on")
    parser.add_argument("--loader-batches", type=int, default=300)
    parser.add_argument("--loader-workers", type=int, help="default: what training uses on this machine")
    parser.add_argument("--ds-config", default="ds_configs/zero0.json")
    parser.add_argument("--train-embeddings", action="store_true", help="train every parameter (GPU runs)")
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
    consumed = trggold["windows_per_step"] / trggold["step_seconds"]  # windows (~sentences) per second
    result = {"command": "python bench/stage2_costs.py " + " ".join(sys.argv[1:]), "date": today(),
              **device_facts(), "encoder": args.encoder, "batch": args.batch, "ds_config": args.ds_config,
              "train_embeddings": args.train_embeddings,
              "stage1": stage1, "stage2_same_sentences": stage2, "stage2_trggold": trggold,
              "step_ratio": stage2["step_seconds"] / stage1["step_seconds"],
              "per_token_ratio": stage2["seconds_per_1k_tokens"] / stage1["seconds_per_1k_tokens"],
              "loader": loader, "training_consumes_windows_per_s": consumed,
              "loader_over_consumption": loader["windows_per_s"] / consumed,
              "trggold_data_wait_share": trggold["data_wait_share"]}
    write_result(args.output, result)
    print(f"stage 2 / stage 1 step time {result['step_ratio']:.2f}x (per token {result['per_token_ratio']:.2f}x); "
          f"loader {loader['windows_per_s']:.0f} windows/s ({loader['workers']} workers) vs {consumed:.1f} "
          f"consumed: {result['loader_over_consumption']:.1f}x; TRGGold waited for data "
          f"{100 * trggold['data_wait_share']:.1f}% of its steps -> {args.output}")


if __name__ == "__main__":
    main()
